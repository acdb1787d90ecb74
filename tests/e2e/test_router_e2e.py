"""End to end, the operator and the router together on the API emulator, with the stand-in engine
(tests/e2e/fake_engine.py), whose pods the emulator's EndpointSlice controller lists:

1. two InferenceServices behind one router answer by model name, and prefix-hash keeps one
   conversation on one replica;
2. an InferenceService with minReplicas 0 serves its first request after scaling from zero: the
   router holds the request, the operator reads the held count (--router-url) and scales up, the
   request is forwarded once the new pod is ready; idle, it scales back down to zero.

`kubeinfer router` and `kubeinfer operator` run as processes, as a user runs them.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import (NAMESPACE, REPO, Cluster, OperatorProcess, _stop, running_cluster,
                                running_operator, wait_for)
from tests.e2e.test_hardening_e2e import FAKE_ENGINE, free_port
from tests.k8s_emulator.podenv import default_command_map

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

IS = ("kubeinfer.io/v1alpha1", "InferenceService")
ROUTER_PORT = free_port()
ROUTER = f"http://127.0.0.1:{ROUTER_PORT}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    options = {"max_grace": 2.0, "command_map": {"kubeinfer": [sys.executable, str(FAKE_ENGINE)]}}
    with running_cluster(tmp_path_factory.mktemp("router"), kubelet_options=options) as c:
        yield c


@pytest.fixture(scope="module")
def router(cluster: Cluster) -> Iterator[Path]:
    """`kubeinfer router` watching the test namespace; its log's path."""
    log_path = cluster.workdir / "router.log"
    command = default_command_map()["kubeinfer"] + [
        "router", "--namespace", NAMESPACE, "--kubeconfig", str(cluster.kubeconfig), "--host", "127.0.0.1",
        "--port", str(ROUTER_PORT), "--max-queue-wait", "60"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("the router's first table", lambda: _get("/health") == 200 or process.poll() is not None, 30)
        assert process.poll() is None, log_path.read_text()
        yield log_path
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def operator(cluster: Cluster, router: Path) -> Iterator[OperatorProcess]:
    saved = os.environ.get("KUBEINFER_ROUTER_URL")
    os.environ["KUBEINFER_ROUTER_URL"] = ROUTER   # running_operator passes the environment on
    try:
        with running_operator(cluster, "1") as process:
            yield process
    finally:
        if saved is None:
            os.environ.pop("KUBEINFER_ROUTER_URL", None)
        else:
            os.environ["KUBEINFER_ROUTER_URL"] = saved


@pytest.fixture(autouse=True)
def router_log_on_failure(request: pytest.FixtureRequest, router: Path) -> Iterator[None]:
    yield
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        tail = "\n".join(router.read_text(errors="replace").splitlines()[-60:])
        print(f"\n===== router log, last lines =====\n{tail}")


def _get(path: str) -> int:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(ROUTER + path, timeout=2).status_code
    return 0


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": IS[0], "kind": IS[1], "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"model": {"uri": "default"}, "accelerator": "none", "replicas": 1,
                     "probes": {"startup": {"periodSeconds": 1}, "readiness": {"periodSeconds": 1}},
                     "terminationGracePeriodSeconds": 2, **spec}}


def ready_replicas(model: str) -> int:
    with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
        return httpx.get(f"{ROUTER}/v1/models/{model}", timeout=2).json()["ready_replicas"]
    return 0


def chat(model: str, text: str = "hello") -> dict[str, Any]:
    r = httpx.post(f"{ROUTER}/v1/chat/completions", timeout=90,
                   json={"model": model, "hold": 0, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    return r.json()


def test_two_inference_services_answer_by_model_name(cluster: Cluster, operator: OperatorProcess):
    kubectl = cluster.kubectl
    kubectl.apply(manifest("alpha", model={"uri": "default", "servedName": "chat-a"}))
    kubectl.apply(manifest("beta", replicas=2, loadBalancing={"strategy": "prefix-hash",
                                                              "prefixHash": {"prefixChars": 16}}))
    wait_for("both models to have ready replicas in the router",
             lambda: ready_replicas("chat-a") == 1 and ready_replicas("beta") == 2, 60, operator)
    # the slices the router reads come from the emulator's EndpointSlice controller
    slices = kubectl.list("discovery.k8s.io/v1", "EndpointSlice", "kubernetes.io/service-name=beta")
    assert sum(1 for s in slices for e in s["endpoints"] if e["conditions"]["ready"]) == 2
    assert all(s["metadata"]["labels"]["kubeinfer.io/inferenceservice"] == "beta" for s in slices)
    models = {m["id"] for m in httpx.get(f"{ROUTER}/v1/models", timeout=5).json()["data"]}
    assert {"chat-a", "beta"} <= models
    a, b = chat("chat-a"), chat("beta")
    assert (a["model"], b["model"]) == ("chat-a", "beta")
    assert a["served_by"].startswith("alpha-") and b["served_by"].startswith("beta-")
    # prefix-hash: each conversation keeps its replica while the load stays low
    for conversation in ("first conversation", "second conversation", "third conversation"):
        homes = {chat("beta", f"{conversation}: turn {i}")["served_by"] for i in range(4)}
        assert len(homes) == 1, (conversation, homes)
    kubectl.delete(*IS, "alpha")
    kubectl.delete(*IS, "beta")


def test_scale_from_zero_serves_the_first_request_and_scales_back_down(cluster: Cluster,
                                                                      operator: OperatorProcess):
    kubectl = cluster.kubectl
    kubectl.apply(manifest("sleepy", replicas=0, autoscaling={
        "minReplicas": 0, "maxReplicas": 2, "targetRequests": 4, "scaleDownDelaySeconds": 3,
        "intervalSeconds": 1}))
    wait_for("the router to know the model", lambda: _get("/v1/models/sleepy") == 200, 30, operator)
    assert ready_replicas("sleepy") == 0
    assert kubectl.list("v1", "Pod", "kubeinfer.io/inferenceservice=sleepy") == []
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(chat, "sleepy")
        # held by the router, not failed, while the operator scales up and the pod starts
        wait_for("the operator to scale up from zero",
                 lambda: kubectl.get(*IS, "sleepy")["spec"]["replicas"] >= 1 or first.done(), 30, operator)
        answer = first.result(timeout=90)
    assert answer["model"] == "sleepy" and answer["served_by"].startswith("sleepy-")
    events = kubectl.list("v1", "Event")
    assert any(e["reason"] == "ScaledUp" and e["involvedObject"]["name"] == "sleepy"
               and "held by the router" in e["message"] for e in events)
    # idle for scaleDownDelaySeconds: back to zero, and the pod goes
    wait_for("the scale down to zero", lambda: kubectl.get(*IS, "sleepy")["spec"]["replicas"] == 0, 30, operator)
    wait_for("the pod to go", lambda: not kubectl.list("v1", "Pod", "kubeinfer.io/inferenceservice=sleepy"),
             30, operator)
    assert kubectl.get(*IS, "sleepy")["status"]["phase"] in ("Pending", "Ready")
    kubectl.delete(*IS, "sleepy")
