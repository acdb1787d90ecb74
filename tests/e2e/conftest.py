"""The end-to-end rig: the Kubernetes API emulator (tests/k8s_emulator) with its stand-in kubelet, the real
operator as a subprocess (`kubeinfer operator`, logging in through a kubeconfig like any client), and a
small kubectl built on the official client's DynamicClient. Every process started here is ended by the
fixtures' finalizers, failed test or not; a failed test prints the operator's log, the cluster's objects,
the pods' logs and the last API requests."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import config as kube_config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ApiException, NotFoundError

from tests.k8s_emulator import Emulator
from tests.k8s_emulator.podenv import default_command_map

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "e2e"
RESYNC_SECONDS = "1"  # drift correction within a second; the status follows pod events anyway


class Kubectl:
    """What the test does with a cluster, through the official client as kubectl would."""

    def __init__(self, kubeconfig: Path, cache_file: Path) -> None:
        self.api_client = kube_config.new_client_from_config(config_file=str(kubeconfig))
        self.dyn = DynamicClient(self.api_client, cache_file=str(cache_file))

    def resource(self, api_version: str, kind: str) -> Any:
        return self.dyn.resources.get(api_version=api_version, kind=kind)

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create, or merge-patch what exists (kubectl apply without the last-applied bookkeeping)."""
        rsc = self.resource(manifest["apiVersion"], manifest["kind"])
        namespace = manifest["metadata"].get("namespace") if rsc.namespaced else None
        try:
            return self.dyn.create(rsc, body=manifest, namespace=namespace).to_dict()
        except ApiException as e:
            if e.status != 409:
                raise
        return self.dyn.patch(rsc, body=manifest, name=manifest["metadata"]["name"], namespace=namespace,
                              content_type="application/merge-patch+json").to_dict()

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = NAMESPACE) -> dict[str, Any] | None:
        rsc = self.resource(api_version, kind)
        try:
            return self.dyn.get(rsc, name=name, namespace=namespace if rsc.namespaced else None).to_dict()
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, label_selector: str | None = None,
             namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        rsc = self.resource(api_version, kind)
        return self.dyn.get(rsc, namespace=namespace, label_selector=label_selector).to_dict()["items"]

    def patch(self, api_version: str, kind: str, name: str, patch: dict[str, Any],
              namespace: str = NAMESPACE) -> dict[str, Any]:
        return self.dyn.patch(self.resource(api_version, kind), body=patch, name=name, namespace=namespace,
                              content_type="application/merge-patch+json").to_dict()

    def delete(self, api_version: str, kind: str, name: str, namespace: str = NAMESPACE) -> None:
        self.dyn.delete(self.resource(api_version, kind), name=name, namespace=namespace,
                        body={"propagationPolicy": "Background"})


@dataclasses.dataclass
class Cluster:
    emu: Emulator
    kubectl: Kubectl
    workdir: Path
    kubeconfig: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # max_grace: the engine is asked for a 105 s graceful shutdown; nothing is in flight here
    # PYTHONPATH: pods run `python -m kubeinfer.cli` from this checkout when the package is not installed
    with running_cluster(tmp_path_factory.mktemp("cluster"), kubelet_options={
            "max_grace": 5.0, "base_env": {**os.environ, "PYTHONPATH": str(REPO)}}) as c:
        yield c


@contextlib.contextmanager
def running_cluster(workdir: Path, **emulator_options: Any) -> Iterator[Cluster]:
    """An emulator with the CRD and the test namespace, stopped on the way out."""
    emu = Emulator(workdir, **emulator_options)
    emu.start()
    try:
        kubeconfig = emu.write_kubeconfig(workdir / "kubeconfig", namespace=NAMESPACE)
        kubectl = Kubectl(kubeconfig, workdir / "discovery-cache.json")
        kubectl.apply(yaml.safe_load((REPO / "crds" / "inferenceservice.yaml").read_text()))
        kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        yield Cluster(emu, kubectl, workdir, kubeconfig)
    finally:
        emu.stop()


@dataclasses.dataclass
class OperatorProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 150) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[OperatorProcess]:
    """`kubeinfer operator` as a user runs it, watching the test namespace, resyncing every second."""
    with running_operator(cluster, RESYNC_SECONDS) as process:
        yield process


@contextlib.contextmanager
def running_operator(cluster: Cluster, resync_seconds: str) -> Iterator[OperatorProcess]:
    log_path = cluster.workdir / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "KUBEINFER_RESYNC_SECONDS": resync_seconds,
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    command = default_command_map()["kubeinfer"] + [
        "operator", "--namespace", NAMESPACE, "--liveness-port", "0", "--resync-seconds", resync_seconds,
        "--verbose"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield OperatorProcess(process, log_path)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(autouse=True)
def diagnostics(request: pytest.FixtureRequest, cluster: Cluster, operator: OperatorProcess) -> Iterator[None]:
    yield
    report = getattr(request.node, "report_call", None)
    if report is None or not report.failed:
        return
    emu = cluster.emu
    print(f"\n===== operator log (exit code {operator.process.poll()}), last lines =====\n{operator.log_tail()}")
    print(f"\n===== objects in namespace {NAMESPACE} =====\n{emu.dump(NAMESPACE)}")
    for log in sorted((cluster.workdir / "pods").glob("*.log")):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        print(f"\n===== pod log {log.name}, last lines =====\n{tail}")
    print("\n===== last API requests =====\n" + "\n".join(list(emu.server.requests)[-60:]))


def wait_for(what: str, check: Callable[[], Any], timeout: float, operator: OperatorProcess | None = None,
             interval: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds, or at
    once when the operator process has died."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if operator is not None and operator.process.poll() is not None:
            raise AssertionError(f"the operator exited ({operator.process.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
