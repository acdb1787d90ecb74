"""status: pods and workloads -> phase, counts and conditions with reasons a user can act on."""
from __future__ import annotations

import pytest

from kubeinfer.operator.spec import InvalidSpec, Problem
from kubeinfer.operator.status import compute_status, invalid_status, transition_events
from tests.operator.helpers import make_settings, make_spec

NOW, LATER = "2025-01-01T00:00:00Z", "2025-01-01T00:05:00Z"


def pod(name="llm-abc", phase="Running", ready=False, scheduled=True, waiting=None, last=None,
        terminated=None, labels=None, restarts=0, unschedulable=None):
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if unschedulable:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                           "message": unschedulable})
    elif scheduled:
        conditions.append({"type": "PodScheduled", "status": "True"})
    state = {"running": {}} if phase == "Running" and not (waiting or terminated) else {}
    if waiting:
        state = {"waiting": waiting}
    if terminated:
        state = {"terminated": terminated}
    status = {"phase": phase, "conditions": conditions}
    if scheduled and not unschedulable:
        status["containerStatuses"] = [{"name": "engine", "image": "img:1", "ready": ready,
                                        "restartCount": restarts, "state": state,
                                        "lastState": {"terminated": last} if last else {}}]
    return {"metadata": {"name": name, "labels": labels or {}}, "status": status}


def status_of(pods, spec=None, workloads=(), previous=None, now=NOW, **kwargs):
    return compute_status(make_spec(spec or {}), list(pods), list(workloads), generation=3,
                          previous=previous, now=now, settings=make_settings(), **kwargs)


def cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


GPU_MSG = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available"
LOAD_FAIL = ("INFO loading model x\nerror: could not load model 'Qwen/Nope': 404 Client Error. "
             "Repository Not Found for url: https://huggingface.co/api/models/Qwen/Nope")
# what the engine writes to /dev/termination-log (the kubelet's terminated.message wins over the logs)
MISSING_HUB_MODEL = ("kubeinfer serve: start-up failed\nmodel 'no-such-org/no-such-model' was not found on "
                     "the Hugging Face Hub\n(401 Client Error)\n")
CASES = [
    # (name, pods, spec, phase, Ready reason, words in the Ready message)
    ("engine's termination message: missing hub model",
     [pod(waiting={"reason": "CrashLoopBackOff"}, restarts=2,
          last={"exitCode": 1, "reason": "Error", "message": MISSING_HUB_MODEL})], {},
     "Failed", "ModelLoadFailed", ["the engine could not start: model 'no-such-org/no-such-model' was not found "
                                   "on the Hugging Face Hub (401 Client Error)", "spec.model.uri"]),
    ("engine's termination message, first exit, any wording",
     [pod(terminated={"exitCode": 1, "reason": "Error",
                      "message": "kubeinfer serve: start-up failed\nsomething new went wrong"})], {},
     "Failed", "ModelLoadFailed", ["something new went wrong", "spec.engine.args"]),
    ("an unmarked message with no model words is a crash",
     [pod(waiting={"reason": "CrashLoopBackOff"}, restarts=2,
          last={"exitCode": 1, "message": "Traceback ...\nRuntimeError: CUDA error: an illegal memory access"})],
     {}, "Failed", "CrashLoop", ["illegal memory access"]),
    ("no pods yet", [], {}, "Pending", "Pending", ["0/1 replicas ready"]),
    ("insufficient gpu", [pod(phase="Pending", scheduled=False, unschedulable=GPU_MSG)], {},
     "Pending", "InsufficientGPU", ["Insufficient nvidia.com/gpu", "cluster autoscaler", "spec.parallelism.tensor"]),
    ("unschedulable: node selector", [pod(phase="Pending", scheduled=False,
                                          unschedulable="0/3 nodes are available: 3 node(s) didn't match "
                                                        "Pod's node affinity/selector")], {},
     "Pending", "Unschedulable", ["spec.scheduling"]),
    ("image pull", [pod(phase="Pending", waiting={"reason": "ImagePullBackOff",
                                                  "message": "Back-off pulling image \"img:1\""})], {},
     "Failed", "ImagePullFailed", ["spec.engine.image", "img:1"]),
    ("err image pull", [pod(phase="Pending", waiting={"reason": "ErrImagePull", "message": "not found"})], {},
     "Failed", "ImagePullFailed", ["not found"]),
    ("model load failed", [pod(waiting={"reason": "CrashLoopBackOff"}, restarts=3,
                               last={"exitCode": 1, "reason": "Error", "message": LOAD_FAIL})], {},
     "Failed", "ModelLoadFailed", ["could not load model 'Qwen/Nope'", "spec.model.uri"]),
    ("model load failed, first exit", [pod(terminated={"exitCode": 1, "reason": "Error", "message": LOAD_FAIL})],
     {}, "Failed", "ModelLoadFailed", ["Repository Not Found"]),
    ("crash loop", [pod(waiting={"reason": "CrashLoopBackOff"}, restarts=5,
                        last={"exitCode": 139, "reason": "Error", "message": "Segmentation fault"})], {},
     "Failed", "CrashLoop", ["5 restarts", "exit code 139", "Segmentation fault", "kubectl logs llm-abc --previous"]),
    ("oom killed", [pod(waiting={"reason": "CrashLoopBackOff"}, restarts=2,
                        last={"exitCode": 137, "reason": "OOMKilled"})], {},
     "Failed", "CrashLoop", ["OOMKilled", "spec.resources"]),
    ("missing secret", [pod(phase="Pending", waiting={"reason": "CreateContainerConfigError",
                                                      "message": "secret \"hf-token\" not found"})], {},
     "Failed", "ContainerConfigError", ["hf-token", "credentialsSecretRef"]),
    ("crashed, running again", [pod(restarts=1, last={"exitCode": 1, "message": (
        "INFO loading\nerror: model path /m does not exist. Pass an existing folder\nINFO: Finished")})], {},
     "Failed", "ModelLoadFailed", ["error: model path /m does not exist"]),
    ("loading", [pod()], {}, "Loading", "Loading", ["loading the model"]),
    ("ready", [pod(ready=True)], {}, "Ready", "Ready", ["1/1 replicas ready"]),
    ("degraded: one ready, one crashing", [pod("a", ready=True), pod("b", waiting={"reason": "CrashLoopBackOff"},
                                                                   last={"exitCode": 1, "message": "boom"})],
     {"replicas": 2}, "Degraded", "CrashLoop", ["1/2 replicas ready", "boom"]),
    ("degraded: scaling up without GPUs", [pod("a", ready=True), pod("b", phase="Pending", scheduled=False,
                                                                    unschedulable=GPU_MSG)],
     {"replicas": 2}, "Degraded", "InsufficientGPU", ["1/2"]),
    ("one crashing, one loading", [pod("a"), pod("b", waiting={"reason": "CrashLoopBackOff"},
                                               last={"exitCode": 1, "message": "boom"})],
     {"replicas": 2}, "Loading", "CrashLoop", ["0/2"]),
    ("scaled to zero", [], {"replicas": 0}, "Pending", "ScaledToZero", ["spec.replicas is 0"]),
    ("scaled to zero by the autoscaler", [], {"replicas": 0, "autoscaling": {"minReplicas": 0, "maxReplicas": 1}},
     "Pending", "ScaledToZero", ["scaled to zero", "the next request through the kubeinfer router"]),
    ("cpu: insufficient cpu is not a GPU problem",
     [pod(phase="Pending", scheduled=False, unschedulable="0/1 nodes are available: 1 Insufficient cpu.")],
     {"accelerator": "none"}, "Pending", "Unschedulable", ["Insufficient cpu"]),
]


@pytest.mark.parametrize("pods,spec,phase,reason,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_status_mapping(pods, spec, phase, reason, words):
    status = status_of(pods, spec)
    ready = cond(status, "Ready")
    assert (status["phase"], ready["reason"]) == (phase, reason), ready["message"]
    for word in words:
        assert word in ready["message"], ready["message"]
    assert ready["status"] == ("True" if phase == "Ready" else "False")
    degraded = cond(status, "Degraded")
    assert degraded["status"] == ("True" if reason not in ("Ready", "Loading", "Pending", "ScaledToZero") else "False")


def test_ready_status_fields():
    status = status_of([pod(ready=True)], {"replicas": 1})
    assert status["observedGeneration"] == 3
    assert status["url"] == "http://llm.ns.svc:8000/v1"
    assert status["selector"] == "app.kubernetes.io/name=kubeinfer,kubeinfer.io/inferenceservice=llm"
    assert (status["replicas"], status["readyReplicas"]) == (1, 1)
    assert cond(status, "Progressing")["status"] == "False" and cond(status, "Progressing")["reason"] == "Complete"
    assert cond(status, "Degraded")["reason"] == "AsExpected"


def test_terminating_pods_do_not_count():
    gone = pod("old", ready=True)
    gone["metadata"]["deletionTimestamp"] = NOW
    assert status_of([gone])["readyReplicas"] == 0


def test_pipeline_group_is_ready_only_when_all_its_pods_are():
    spec = {"parallelism": {"pipeline": 2}, "replicas": 2}
    g0 = [pod(f"llm-0-{i}", ready=True, labels={"kubeinfer.io/group": "0"}) for i in range(2)]
    g1 = [pod("llm-1-0", ready=True, labels={"kubeinfer.io/group": "1"}),
          pod("llm-1-1", ready=False, labels={"kubeinfer.io/group": "1"})]
    status = status_of(g0 + g1, spec)
    assert (status["replicas"], status["readyReplicas"], status["phase"]) == (2, 1, "Loading")
    assert status["selector"].endswith("apps.kubernetes.io/pod-index=0")


def test_rollout_in_progress():
    old = pod(ready=True, labels={"kubeinfer.io/template-hash": "old"})
    status = status_of([old], template_hashes=frozenset({"new"}))
    assert status["phase"] == "Ready"
    progressing = cond(status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "RollingOut")


def test_progress_deadline_exceeded():
    dep = {"metadata": {"name": "llm"}, "status": {"conditions": [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
         "message": "ReplicaSet \"llm-1\" has timed out progressing."}]}}
    status = status_of([pod()], workloads=[dep])
    assert cond(status, "Degraded")["reason"] == "ProgressDeadlineExceeded"
    assert cond(status, "Ready")["reason"] == "ProgressDeadlineExceeded"


def test_last_transition_time_kept_while_unchanged():
    first = status_of([pod()], now=NOW)
    again = status_of([pod()], previous=first, now=LATER)
    assert cond(again, "Ready")["lastTransitionTime"] == NOW
    ready = status_of([pod(ready=True)], previous=first, now=LATER)
    assert cond(ready, "Ready")["lastTransitionTime"] == LATER
    assert again == first   # nothing changed -> nothing to patch


def test_invalid_status():
    error = InvalidSpec([Problem("spec.model.uri", "s3://x", "use hf://ORG/NAME")])
    status = invalid_status("llm", "ns", error, generation=4, previous={"readyReplicas": 1}, now=NOW,
                            settings=make_settings())
    assert status["phase"] == "Failed" and status["observedGeneration"] == 4
    assert status["readyReplicas"] == 1      # the running pods are left as they are
    ready = cond(status, "Ready")
    assert ready["reason"] == "InvalidSpec" and "spec.model.uri: got 's3://x'" in ready["message"]


def test_transition_events():
    loading = status_of([pod()])
    ready = status_of([pod(ready=True)], previous=loading)
    no_gpu = status_of([pod(phase="Pending", scheduled=False, unschedulable=GPU_MSG)])
    assert transition_events(None, loading) == [("Normal", "Loading", cond(loading, "Ready")["message"])]
    assert transition_events(loading, ready)[0][:2] == ("Normal", "Ready")
    assert "http://llm.ns.svc:8000/v1" in transition_events(loading, ready)[0][2]
    assert transition_events(loading, no_gpu)[0][:2] == ("Warning", "InsufficientGPU")
    assert transition_events(ready, ready) == []
