"""End to end, the operator's hardening, against the API emulator with a stand-in engine
(tests/e2e/fake_engine.py: starts at once, reports the load it is given), so these test the
operator and not the engine:

1. API errors: with 30% of the operator's API calls failing a spec change is still applied and the
   status follows; with all of them failing, a change made meanwhile is applied within seconds of
   the recovery;
2. autoscaling: requests in flight drive spec.replicas up; idle drives it back down (the operator
   reads /metrics through the API server's pods proxy, --scrape-via apiserver);
3. leader election holds the Lease, and the operator serves its Prometheus metrics.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import NAMESPACE, Cluster, OperatorProcess, running_cluster, running_operator, wait_for
from tests.k8s_emulator.faults import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

IS = ("kubeinfer.io/v1alpha1", "InferenceService")
DEPLOYMENT = ("apps/v1", "Deployment")
FAKE_ENGINE = Path(__file__).with_name("fake_engine.py")
TEST_AGENT = "e2e-kubectl"   # the test's own calls are never failed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The emulator with the stand-in engine as `kubeinfer` in pods."""
    options = {"max_grace": 2.0, "crash_backoff": (0.5, 2.0),
               "command_map": {"kubeinfer": [sys.executable, str(FAKE_ENGINE)]}}
    with running_cluster(tmp_path_factory.mktemp("hardening"), kubelet_options=options) as c:
        c.kubectl.api_client.user_agent = TEST_AGENT
        yield c


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[OperatorProcess]:
    env = {"KUBEINFER_SCRAPE_VIA": "apiserver", "KUBEINFER_METRICS_PORT": str(METRICS_PORT),
           "KUBEINFER_LEADER_ELECTION_NAMESPACE": NAMESPACE}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)   # running_operator passes the environment on
    try:
        with running_operator(cluster, "1") as process:
            yield process
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": IS[0], "kind": IS[1], "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"model": {"uri": "default"}, "accelerator": "none", "replicas": 1,
                     "probes": {"startup": {"periodSeconds": 1}, "readiness": {"periodSeconds": 1}},
                     "terminationGracePeriodSeconds": 4, **spec}}


def ready(cluster: Cluster, name: str, replicas: int) -> dict[str, Any] | None:
    obj = cluster.kubectl.get(*IS, name)
    status = (obj or {}).get("status") or {}
    done = (status.get("phase") == "Ready" and status.get("readyReplicas") == replicas
            and status.get("observedGeneration") == obj["metadata"]["generation"])
    return obj if done else None


def test_leader_lease_and_metrics(cluster: Cluster, operator: OperatorProcess) -> None:
    lease = wait_for("the operator to hold its Lease", lambda: cluster.kubectl.get(
        "coordination.k8s.io/v1", "Lease", "kubeinfer-operator"), 60, operator)
    assert lease["spec"]["holderIdentity"] and lease["spec"]["leaseDurationSeconds"] == 15
    cluster.kubectl.apply(manifest("metered"))
    wait_for("metered to be Ready", lambda: ready(cluster, "metered", 1), 60, operator)

    def scraped() -> str | None:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
        except OSError:
            return None

    text = wait_for("the operator's /metrics", scraped, 30, operator)
    assert 'kubeinfer_operator_reconciles_total{result="ok",trigger="change"}' in text
    assert 'kubeinfer_operator_leader 1.0' in text
    cluster.kubectl.delete(*IS, "metered")


def test_api_errors_slow_the_operator_down_but_do_not_stop_it(cluster: Cluster, operator: OperatorProcess) -> None:
    kubectl, server = cluster.kubectl, cluster.emu.server
    kubectl.apply(manifest("flaky"))
    wait_for("flaky to be Ready", lambda: ready(cluster, "flaky", 1), 60, operator)

    def operator_calls(rate: float) -> Faults:
        # the Lease is spared: a leader that cannot renew for 10 s steps down and exits (the kubelet
        # would restart it), which is right, and not what this test is about
        return Faults(rate, seed=13, exempt=lambda request: request.headers.get("User-Agent") == TEST_AGENT
                      or "/leases/" in request.path)

    def deployment(replicas: int, arg: str) -> dict[str, Any] | None:
        d = kubectl.get(*DEPLOYMENT, "flaky")
        ok = d and d["spec"]["replicas"] == replicas and arg in d["spec"]["template"]["spec"]["containers"][0]["args"]
        return d if ok else None

    # 1. 30% of the operator's calls fail: the change is applied and the status follows all the same
    server.faults = faults = operator_calls(0.3)
    try:
        kubectl.patch(*IS, "flaky", {"spec": {"replicas": 2, "engine": {"args": ["--max-num-seqs=4"]}}})
        wait_for("the change to reach the Deployment under API errors",
                 lambda: deployment(2, "--max-num-seqs=4"), 45, operator)
        wait_for("flaky to be Ready with 2 replicas under API errors", lambda: ready(cluster, "flaky", 2),
                 45, operator)
        assert faults.failed > 0, (faults.failed, faults.passed)
    finally:
        server.faults = None

    # 2. every call of the operator fails: nothing can be applied; once the API answers again the
    #    change made during the outage is applied within seconds (no minute of backoff)
    server.faults = faults = operator_calls(1.0)
    try:
        kubectl.patch(*IS, "flaky", {"spec": {"replicas": 1, "engine": {"args": ["--max-num-seqs=2"]}}})
        # (ten failed calls: kopf retries a failed progress patch 7 times and throttles, then may
        # wait for the next watch event rather than call again; how many more calls it makes in
        # the outage depends on its timers, so a higher count made this test flaky)
        wait_for("the operator to keep trying through the outage", lambda: faults.failed >= 10, 60, operator)
        assert deployment(2, "--max-num-seqs=4"), "nothing should have reached the API during the outage"
    finally:
        server.faults = None
    wait_for("the change to be applied within seconds of the recovery",
             lambda: deployment(1, "--max-num-seqs=2"), 12, operator)
    wait_for("flaky to be Ready with 1 replica", lambda: ready(cluster, "flaky", 1), 30, operator)
    kubectl.delete(*IS, "flaky")


def _hold(url: str, seconds: float) -> None:
    body = json.dumps({"model": "scaler", "prompt": "x", "hold": seconds}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with contextlib.suppress(OSError):
        urllib.request.urlopen(request, timeout=seconds + 30).read()


def test_load_scales_up_and_idle_scales_down(cluster: Cluster, operator: OperatorProcess) -> None:
    kubectl = cluster.kubectl
    kubectl.apply(manifest("scaler", autoscaling={"minReplicas": 1, "maxReplicas": 2, "targetRequests": 1,
                                                   "scaleDownDelaySeconds": 2, "intervalSeconds": 1}))
    wait_for("scaler to be Ready", lambda: ready(cluster, "scaler", 1), 60, operator)
    url = cluster.emu.service_url(NAMESPACE, "scaler:http")
    clients = [threading.Thread(target=_hold, args=(url, 12), daemon=True) for _ in range(3)]
    for c in clients:
        c.start()
    # 3 requests in flight, 1 per replica wanted, at most 2
    wait_for("spec.replicas to go up to 2", lambda: (kubectl.get(*IS, "scaler") or {})["spec"]["replicas"] == 2,
             30, operator)
    wait_for("the second replica to be ready", lambda: ready(cluster, "scaler", 2), 30, operator)
    for c in clients:
        c.join(40)
    wait_for("spec.replicas to come back to 1 once idle", lambda: (
        kubectl.get(*IS, "scaler") or {})["spec"]["replicas"] == 1, 30, operator)
    reasons = [e.get("reason") for e in kubectl.list("v1", "Event") if
               (e.get("involvedObject") or {}).get("name") == "scaler"]
    assert "ScaledUp" in reasons and "ScaledDown" in reasons
    kubectl.delete(*IS, "scaler")
