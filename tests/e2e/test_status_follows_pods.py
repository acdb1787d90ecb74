"""The status follows the pods at once, not at the next resync.

The real operator (`kubeinfer operator`, resyncing only every hour) against the Kubernetes API emulator
without its kubelet: the emulator's controllers make the Deployment's pods, and the test plays the
kubelet, writing the pods' status itself. Nothing but pod (and workload) events can move the
InferenceService's status here:

1. a pod turning Running, then Ready, moves the phase to Loading, then Ready, within seconds;
2. a pod in CrashLoopBackOff moves it to Degraded with a CrashLoop warning event, then (all pods)
   to Failed;
3. a burst of pod events that change nothing the status depends on patches nothing, and costs a
   refresh or two, not one per event; one real change after them is exactly one status PATCH.

Every read here goes straight to the emulator's store, so the API server's request log holds only the
operator's requests.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import (NAMESPACE, REPO, Cluster, OperatorProcess, running_cluster, running_operator,
                                wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

RESYNC_SECONDS = "3600"   # the timer never fires during these tests
# Seconds from a pod's change to the status that says so: a deadline, not the expected time (that is
# printed, well under a second when idle). Anything far below the resync proves the status follows the
# pods, and a loaded machine must not fail the test.
FOLLOW_WITHIN = 30.0
# kopf's annotations on a handled InferenceService; any other kubeinfer.io/ one is a handler's progress.
KOPF_DONE_ANNOTATIONS = {"kubeinfer.io/last-handled-configuration", "kubeinfer.io/kopf-managed"}
IS_PATH = f"/apis/kubeinfer.io/v1alpha1/namespaces/{NAMESPACE}/inferenceservices"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster"), with_kubelet=False) as c:
        c.emu.server.requests = collections.deque(maxlen=100_000)   # count every request
        yield c


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[OperatorProcess]:
    with running_operator(cluster, RESYNC_SECONDS) as process:
        yield process


def rt(cluster: Cluster, group: str, version: str, plural: str) -> Any:
    return cluster.emu.store.registry.lookup(group, version, plural)


def inference_service(cluster: Cluster, name: str) -> dict[str, Any]:
    return cluster.emu.store.get(rt(cluster, "kubeinfer.io", "v1alpha1", "inferenceservices"), NAMESPACE, name)


def pods(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return cluster.emu.store.list(rt(cluster, "", "v1", "pods"), NAMESPACE,
                                  f"kubeinfer.io/inferenceservice={name}")["items"]


def events(cluster: Cluster, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in cluster.emu.store.items(rt(cluster, "", "v1", "events"), NAMESPACE)
            if e.get("reason") == reason and e["involvedObject"]["name"] == name]


def operator_requests(cluster: Cluster, method: str, path: str) -> int:
    return sum(1 for line in list(cluster.emu.server.requests)
               if line.startswith(f"{method} ") and line.split(" ")[1].split("?")[0] == path)


def apply(cluster: Cluster, operator: OperatorProcess, name: str, replicas: int) -> list[dict[str, Any]]:
    """Create the InferenceService; wait for the operator's reconcile and for its pods; return the pods."""
    manifest = yaml.safe_load((REPO / "examples" / "cpu.yaml").read_text())
    manifest["metadata"].update(name=name, namespace=NAMESPACE)
    manifest["spec"]["replicas"] = replicas
    cluster.kubectl.apply(manifest)
    wait_for("the create handler's status", lambda: (inference_service(cluster, name).get("status") or {})
             .get("observedGeneration") == 1, 60, operator)
    return wait_for(f"{replicas} pods", lambda: len(p := pods(cluster, name)) == replicas and p, 30, operator)


def set_pod(cluster: Cluster, pod: dict[str, Any], state: str) -> None:
    """Write the pod's status as a kubelet would: running (not ready), ready, or crash-looping."""
    container: dict[str, Any] = {"name": "engine", "image": "kubeinfer", "ready": state == "ready",
                                 "started": state != "crashing", "restartCount": 0,
                                 "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}}
    if state == "crashing":
        container.update(restartCount=3, state={"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                         lastState={"terminated": {"exitCode": 1, "reason": "Error",
                                                   "message": "Error: engine exited"}})
    ready = "True" if state == "ready" else "False"
    status = {"phase": "Running", "containerStatuses": [container], "conditions": [
        {"type": "PodScheduled", "status": "True"}, {"type": "Initialized", "status": "True"},
        {"type": "ContainersReady", "status": ready}, {"type": "Ready", "status": ready}]}
    cluster.emu.store.update(rt(cluster, "", "v1", "pods"), NAMESPACE, pod["metadata"]["name"],
                             lambda p: {**p, "status": status}, "status")


def touch(cluster: Cluster, pod: dict[str, Any], n: int) -> None:
    """A pod event that changes nothing the status depends on."""
    def annotate(p: dict[str, Any]) -> dict[str, Any]:
        p["metadata"].setdefault("annotations", {})["test/touched"] = str(n)
        return p
    cluster.emu.store.update(rt(cluster, "", "v1", "pods"), NAMESPACE, pod["metadata"]["name"], annotate)


def follows(cluster: Cluster, operator: OperatorProcess, name: str, what: str, check: Any) -> dict[str, Any]:
    """Wait (at most FOLLOW_WITHIN s) for the InferenceService's status to satisfy `check`."""
    start = time.monotonic()
    status = wait_for(what, lambda: check(s := inference_service(cluster, name).get("status") or {}) and s,
                      FOLLOW_WITHIN, operator, interval=0.05)
    print(f"    {what}: {time.monotonic() - start:.2f} s")
    return status


def kopf_is_done(obj: dict[str, Any]) -> bool:
    """kopf stored the handled spec and has no handler in progress on `obj`."""
    ours = {k for k in obj["metadata"].get("annotations") or {} if k.startswith("kubeinfer.io/")}
    return "kubeinfer.io/last-handled-configuration" in ours and ours <= KOPF_DONE_ANNOTATIONS


def ready_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def test_a_pod_turning_ready_makes_the_service_ready_at_once(cluster: Cluster, operator: OperatorProcess) -> None:
    [pod] = apply(cluster, operator, "follow-ready", replicas=1)
    set_pod(cluster, pod, "running")
    status = follows(cluster, operator, "follow-ready", "phase Loading", lambda s: s.get("phase") == "Loading")
    assert status["readyReplicas"] == 0 and status["replicas"] == 1
    set_pod(cluster, pod, "ready")
    status = follows(cluster, operator, "follow-ready", "phase Ready",
                     lambda s: s.get("phase") == "Ready" and s.get("readyReplicas") == 1)
    assert ready_condition(status)["status"] == "True" and status["observedGeneration"] == 1
    wait_for("a Ready event", lambda: events(cluster, "follow-ready", "Ready"), FOLLOW_WITHIN, operator)
    # kopf lists (and watches) only the engine pods: the label selector goes to the API server
    pod_requests = [line for line in list(cluster.emu.server.requests) if f"/namespaces/{NAMESPACE}/pods" in line]
    ours = "labelSelector=app.kubernetes.io/managed-by%3Dkubeinfer-operator"
    assert f"GET /api/v1/namespaces/{NAMESPACE}/pods?{ours} -> 200" in pod_requests, pod_requests
    assert all("labelSelector=" in line for line in pod_requests), pod_requests


def test_a_crash_loop_degrades_then_fails_the_service_at_once(cluster: Cluster, operator: OperatorProcess) -> None:
    first, second = apply(cluster, operator, "follow-crash", replicas=2)
    set_pod(cluster, first, "ready")
    set_pod(cluster, second, "ready")
    follows(cluster, operator, "follow-crash", "phase Ready", lambda s: s.get("readyReplicas") == 2)

    set_pod(cluster, second, "crashing")
    status = follows(cluster, operator, "follow-crash", "phase Degraded", lambda s: s.get("phase") == "Degraded")
    ready = ready_condition(status)
    assert (ready["status"], ready["reason"], status["readyReplicas"]) == ("False", "CrashLoop", 1), ready
    assert second["metadata"]["name"] in ready["message"] and "engine exited" in ready["message"]
    [event] = wait_for("a CrashLoop event", lambda: events(cluster, "follow-crash", "CrashLoop"),
                       FOLLOW_WITHIN, operator)
    assert event["type"] == "Warning" and second["metadata"]["name"] in event["message"]

    set_pod(cluster, first, "crashing")
    status = follows(cluster, operator, "follow-crash", "phase Failed", lambda s: s.get("phase") == "Failed")
    assert ready_condition(status)["reason"] == "CrashLoop" and status["readyReplicas"] == 0


def test_pod_events_that_change_nothing_patch_nothing(cluster: Cluster, operator: OperatorProcess) -> None:
    name = "follow-quiet"
    replicas = apply(cluster, operator, name, replicas=3)
    for pod in replicas:
        set_pod(cluster, pod, "ready")
    follows(cluster, operator, name, "phase Ready", lambda s: s.get("readyReplicas") == 3)
    # From here on a correct operator writes the InferenceService only for a status change: kopf is
    # done with the create (its diff base stored, no progress annotations left), and the status already
    # says what the pods say (a refresh still due finds nothing to change).
    wait_for("kopf to finish with the create", lambda: kopf_is_done(inference_service(cluster, name)),
             FOLLOW_WITHIN, operator)

    def counts() -> tuple[int, int, int]:
        return (operator_requests(cluster, "PATCH", f"{IS_PATH}/{name}/status"),
                operator_requests(cluster, "PATCH", f"{IS_PATH}/{name}"),
                operator_requests(cluster, "GET", f"{IS_PATH}/{name}"))   # one GET per status refresh

    patches, annotation_patches, refreshes = counts()
    for n in range(10):
        for pod in replicas:
            touch(cluster, pod, n)   # 30 pod events
    wait_for("the operator to refresh the status", lambda: counts()[2] > refreshes, FOLLOW_WITHIN, operator)
    # Then one real change, as a barrier instead of a sleep: refreshes of one InferenceService run one
    # at a time, so the one that shows the change runs after the touches' refresh has finished, and
    # that refresh's PATCH, if it made one, is counted by then. A correct operator makes exactly one
    # PATCH, however long each step takes.
    set_pod(cluster, replicas[0], "running")
    status = follows(cluster, operator, name, "readyReplicas 2", lambda s: s.get("readyReplicas") == 2)
    assert status["phase"] == "Loading"
    after = counts()
    assert after[0] - patches == 1, (f"{after[0] - patches} status PATCHes for 30 events that change "
                                     "nothing and one that does: exactly one expected")
    assert after[1] == annotation_patches, "pod events must not patch the InferenceService itself"
    print(f"    30 pod events and one change: {after[2] - refreshes} status refresh(es), one PATCH")
    # The burst's refresh or two, the change's, and one that was still due before the burst.
    assert after[2] - refreshes <= 4, f"31 events made {after[2] - refreshes} refreshes: not coalesced"
