"""End to end: the real operator and the real engine against the Kubernetes API emulator.

1. apply examples/cpu.yaml: the status moves forward along Pending -> Loading -> Ready, url set;
2. an OpenAI chat request through the Service (the API server's service proxy) gets an answer;
3. a new engine arg changes the pod template hash and the pod is replaced;
4. a Deployment deleted by hand comes back; deleting the InferenceService takes everything with it;
5. an invalid spec ends in phase Failed / InvalidSpec with a message that says what to fix.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from kubernetes import watch as kube_watch
from kubernetes.dynamic.exceptions import ApiException

from tests.e2e.conftest import (NAMESPACE, REPO, RESYNC_SECONDS, Cluster, OperatorProcess, running_operator,
                                wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

IS = ("kubeinfer.io/v1alpha1", "InferenceService")
DEPLOYMENT = ("apps/v1", "Deployment")
HASH_LABEL = "kubeinfer.io/template-hash"
NAME = "smollm2"
SELECTOR = f"kubeinfer.io/inferenceservice={NAME}"
PHASE_ORDER = ("Pending", "Loading", "Ready")


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    start = time.monotonic()
    print(f"\n--- {title}", flush=True)
    yield
    print(f"    done in {time.monotonic() - start:.1f} s", flush=True)


class PhaseRecorder(threading.Thread):
    """Watches one InferenceService (a real watch, from a resourceVersion) and records each new
    status.phase, until Ready."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        super().__init__(daemon=True)
        self.kubectl, self.name = cluster.kubectl, name
        self.rsc = self.kubectl.resource(*IS)
        self.since = self.kubectl.dyn.get(self.rsc, namespace=NAMESPACE).metadata.resourceVersion
        self.watcher = kube_watch.Watch()
        self.phases: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event in self.kubectl.dyn.watch(self.rsc, namespace=NAMESPACE, watcher=self.watcher, timeout=240,
                                                field_selector=f"metadata.name={self.name}",
                                                resource_version=self.since):
                phase = (event["raw_object"].get("status") or {}).get("phase")
                if phase and (not self.phases or self.phases[-1] != phase):
                    self.phases.append(phase)
                if phase == "Ready":
                    return
        except BaseException as e:  # reported by the test
            self.error = e


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def ready_is(cluster: Cluster, generation: int) -> dict[str, Any] | None:
    obj = cluster.kubectl.get(*IS, NAME)
    status = (obj or {}).get("status") or {}
    if status.get("phase") == "Ready" and status.get("observedGeneration") == generation:
        return obj
    return None


def engine_pods(cluster: Cluster) -> list[dict[str, Any]]:
    return [p for p in cluster.kubectl.list("v1", "Pod", SELECTOR) if not p["metadata"].get("deletionTimestamp")]


def is_ready(pod: dict[str, Any]) -> bool:
    return condition(pod, "Ready").get("status") == "True"


def deployment_uid_of(cluster: Cluster, pod: dict[str, Any]) -> str | None:
    """The uid of the Deployment that owns the ReplicaSet that owns the pod."""
    rs = cluster.kubectl.get("apps/v1", "ReplicaSet", pod["metadata"]["ownerReferences"][0]["name"])
    return rs["metadata"]["ownerReferences"][0]["uid"] if rs else None


def chat(cluster: Cluster) -> Any:
    """An OpenAI chat request to the Service, through the API server's service proxy."""
    client = openai.OpenAI(base_url=cluster.emu.proxy_url(NAMESPACE, f"{NAME}:http") + "/v1",
                           api_key=cluster.emu.token, timeout=60, max_retries=0)
    return client.chat.completions.create(model=NAME, max_tokens=12, temperature=0,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])


def test_inference_service_lifecycle(cluster: Cluster, operator: OperatorProcess) -> None:
    kubectl = cluster.kubectl
    manifest = yaml.safe_load((REPO / "examples" / "cpu.yaml").read_text())
    manifest["metadata"]["namespace"] = NAMESPACE
    assert manifest["metadata"]["name"] == NAME

    with step("1. apply examples/cpu.yaml; watch the phase move forward to Ready"):
        recorder = PhaseRecorder(cluster, NAME)
        recorder.start()
        created = kubectl.apply(manifest)
        obj = wait_for("the InferenceService to become Ready", lambda: ready_is(cluster, 1), 150, operator)
        recorder.join(60)   # it stops at the Ready event, which the GET above has already seen
        assert recorder.error is None, recorder.error
        assert not recorder.is_alive(), f"the watch never delivered phase Ready; phases seen: {recorder.phases}"
        # A pod that starts fast can skip Pending or Loading between two status writes (under load the
        # watch saw only ['Loading', 'Ready']), so no transient phase is required. What must hold: the
        # phase only moves forward along Pending -> Loading -> Ready, through nothing else, and ends Ready.
        assert recorder.phases[-1] == "Ready", f"phases seen: {recorder.phases}"
        assert set(recorder.phases) <= set(PHASE_ORDER), f"phases seen: {recorder.phases}"
        ranks = [PHASE_ORDER.index(p) for p in recorder.phases]
        assert ranks == sorted(ranks), f"the phase went backwards: {recorder.phases}"
        status = obj["status"]
        assert status["url"] == f"http://{NAME}.{NAMESPACE}.svc:8000/v1"
        assert status["readyReplicas"] == 1 and condition(obj, "Ready")["status"] == "True"
        uid = created["metadata"]["uid"]
        for api_version, kind in (DEPLOYMENT, ("v1", "Service"), ("policy/v1", "PodDisruptionBudget")):
            child = kubectl.get(api_version, kind, NAME)
            assert child is not None, f"{kind} {NAME} missing"
            [owner] = child["metadata"]["ownerReferences"]
            assert owner["uid"] == uid and owner["controller"] is True, owner
        [pod] = engine_pods(cluster)
        assert is_ready(pod)

    with step("2. OpenAI chat request through the Service"):
        reply = chat(cluster)
        assert reply.choices[0].message.content.strip(), reply
        assert reply.usage.completion_tokens > 0 and reply.model == NAME

    with step("3. edit the spec (a new engine arg): new template hash, pod replaced"):
        old_hash = kubectl.get(*DEPLOYMENT, NAME)["spec"]["template"]["metadata"]["labels"][HASH_LABEL]
        edited = kubectl.patch(*IS, NAME, {"spec": {"engine": {"args": ["--max-num-seqs", "8"]}}})
        assert edited["metadata"]["generation"] == 2
        new_hash = wait_for("a new pod template hash", lambda: (h := kubectl.get(*DEPLOYMENT, NAME)["spec"][
            "template"]["metadata"]["labels"][HASH_LABEL]) != old_hash and h, 30, operator)
        new_pod = wait_for("the replacement pod to be the only one, and ready", lambda: (
            pods := engine_pods(cluster)) and len(pods) == 1 and pods[0]["metadata"]["labels"][HASH_LABEL] == new_hash
            and is_ready(pods[0]) and pods[0], 120, operator)
        assert new_pod["metadata"]["name"] != pod["metadata"]["name"]
        args = new_pod["spec"]["containers"][0]["args"]
        assert args[args.index("--max-num-seqs") + 1] == "8"
        wait_for("the old pod to be gone", lambda: kubectl.get("v1", "Pod", pod["metadata"]["name"]) is None, 30)
        wait_for("the InferenceService Ready at generation 2", lambda: ready_is(cluster, 2), 30, operator)
        assert chat(cluster).choices[0].message.content.strip()

    with step("4a. delete the Deployment by hand: it comes back"):
        old_uid = kubectl.get(*DEPLOYMENT, NAME)["metadata"]["uid"]
        kubectl.delete(*DEPLOYMENT, NAME)
        back = wait_for("the Deployment to come back", lambda: (d := kubectl.get(*DEPLOYMENT, NAME)) and
                        d["metadata"]["uid"] != old_uid and d, 30, operator)
        assert back["metadata"]["ownerReferences"][0]["uid"] == uid
        wait_for("a ready pod of the new Deployment", lambda: any(
            is_ready(p) and deployment_uid_of(cluster, p) == back["metadata"]["uid"] for p in engine_pods(cluster)),
            120, operator)
        wait_for("the InferenceService Ready again", lambda: ready_is(cluster, 2), 30, operator)

    with step("4b. delete the InferenceService: everything goes"):
        kubectl.delete(*IS, NAME)
        kinds = (DEPLOYMENT, ("apps/v1", "ReplicaSet"), ("v1", "Service"), ("policy/v1", "PodDisruptionBudget"),
                 ("v1", "Pod"))
        wait_for("the InferenceService and all its children to be gone", lambda: kubectl.get(*IS, NAME) is None
                 and not any(kubectl.list(*kind) for kind in kinds), 60, operator)
        kubelet = cluster.emu.kubelet
        wait_for("every engine process to end", lambda: not kubelet.runtimes and not kubelet.pids, 30)


def test_invalid_spec_reports_invalid_spec(cluster: Cluster, operator: OperatorProcess) -> None:
    kubectl = cluster.kubectl
    manifest = yaml.safe_load((REPO / "examples" / "cpu.yaml").read_text())
    manifest["metadata"].update(name="broken", namespace=NAMESPACE)

    with step("5a. a spec the CRD schema rejects never gets in"):
        bad = copy.deepcopy(manifest)
        bad["spec"]["replicas"] = -1
        with pytest.raises(ApiException) as rejected:
            kubectl.apply(bad)
        assert rejected.value.status == 422 and "spec.replicas" in rejected.value.body

    with step("5b. a spec only the operator can judge: InvalidSpec with a useful message"):
        manifest["spec"]["parallelism"] = {"tensor": 2}  # on CPU (accelerator: none)
        kubectl.apply(manifest)
        obj = wait_for("phase Failed", lambda: (o := kubectl.get(*IS, "broken")) and
                       (o.get("status") or {}).get("phase") == "Failed" and o, 30, operator)
        ready = condition(obj, "Ready")
        assert ready["status"] == "False" and ready["reason"] == "InvalidSpec", ready
        assert "spec.parallelism" in ready["message"] and "accelerator" in ready["message"], ready["message"]
        events = wait_for("an InvalidSpec event", lambda: [
            e for e in kubectl.list("v1", "Event") if e.get("reason") == "InvalidSpec"
            and e["involvedObject"]["name"] == "broken"], 15, operator)
        assert "spec.parallelism" in events[0]["message"]
        assert kubectl.get(*DEPLOYMENT, "broken") is None

        kubectl.delete(*IS, "broken")
        wait_for("the broken InferenceService to go", lambda: kubectl.get(*IS, "broken") is None, 30, operator)


def test_sigterm_stops_the_operator_with_no_task_left_waiting(cluster: Cluster, operator: OperatorProcess,
                                                               tmp_path: Path) -> None:
    """kopf stopped by a signal used to leave its waiter on the operator's own stop flag running and
    give it 5 s before cancelling it (every rollout of the operator waited); the flag is now raised
    as kopf cleans up, so it finds no task left."""
    with running_operator(dataclasses.replace(cluster, workdir=tmp_path), RESYNC_SECONDS) as second:
        wait_for("the second operator to watch InferenceServices",
                 lambda: "Starting the watch-stream for inferenceservices" in second.log_path.read_text(),
                 60, second)
        os.killpg(second.process.pid, signal.SIGTERM)
        assert second.process.wait(60) == 0, second.log_tail()
        log = second.log_path.read_text()
    assert "Hung tasks stopping is skipped: no tasks given" in log, second.log_tail()
    assert "Hung tasks are" not in log, second.log_tail()
