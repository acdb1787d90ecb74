"""End to end, pipeline parallelism: an InferenceService with `parallelism: {pipeline: 2}` on CPU,
the real operator and two real engine processes (gloo between them) on the API emulator with its
LeaderWorkerSet controller.

1. it becomes Ready: one LeaderWorkerSet group, node 0 serving HTTP and node 1 headless, sharing the
   node Secret the operator made (whose value appears in no status and no operator log line);
2. a chat completion through the Service is answered;
3. the worker pod is deleted: the whole group is recreated (RecreateGroupOnPodRestart) and serves
   again.

A tiny random Llama (2 layers, hidden 64) keeps it fast; only what must hold is asserted, polled
with deadlines.
"""
from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.e2e.conftest import NAMESPACE, REPO, Cluster, OperatorProcess, running_cluster, wait_for
from tests.k8s_emulator.leaderworkersets import install_leaderworkerset_crd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NAME = "pp"
IS = ("kubeinfer.io/v1alpha1", "InferenceService")
LWS = ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
SELECTOR = f"kubeinfer.io/inferenceservice={NAME}"
LEADER, WORKER = f"{NAME}-workers-0", f"{NAME}-workers-0-1"
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "128", "--num-gpu-blocks-override", "40"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The e2e cluster with LeaderWorkerSet installed before the operator starts (it asks once a
    minute whether the kind is served)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with running_cluster(tmp_path_factory.mktemp("pp-cluster"),
                         kubelet_options={"max_grace": 2.0, "base_env": env}) as c:
        install_leaderworkerset_crd(c.emu.store)
        yield c


def manifest(model: str) -> dict[str, Any]:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": NAME, "namespace": NAMESPACE},
            "spec": {"model": {"uri": model}, "accelerator": "none", "replicas": 1,
                     "parallelism": {"pipeline": 2},
                     "engine": {"args": ENGINE_ARGS},
                     "terminationGracePeriodSeconds": 4,   # nothing to drain: a fast group restart
                     "probes": {"startup": {"periodSeconds": 1, "failureThreshold": 120},
                                "readiness": {"periodSeconds": 1}}}}


def pods(cluster: Cluster) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in cluster.kubectl.list("v1", "Pod", SELECTOR)
            if not p["metadata"].get("deletionTimestamp")}


def is_ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in (pod.get("status") or {}).get("conditions") or [])


def serving(cluster: Cluster, not_leader_uid: str | None = None) -> dict[str, dict[str, Any]] | None:
    """Both pods of the group ready (a new group when not_leader_uid is given) and the
    InferenceService Ready."""
    found = pods(cluster)
    if set(found) != {LEADER, WORKER} or not all(map(is_ready, found.values())):
        return None
    if not_leader_uid is not None and found[LEADER]["metadata"]["uid"] == not_leader_uid:
        return None
    status = (cluster.kubectl.get(*IS, NAME) or {}).get("status") or {}
    return found if status.get("phase") == "Ready" and status.get("readyReplicas") == 1 else None


def chat(cluster: Cluster) -> Any:
    client = openai.OpenAI(base_url=cluster.emu.proxy_url(NAMESPACE, f"{NAME}:http") + "/v1",
                           api_key=cluster.emu.token, timeout=60, max_retries=0)
    return client.chat.completions.create(model=NAME, max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "hello"}])


def test_pipeline_group_serves_and_restarts_as_a_unit(cluster: Cluster, operator: OperatorProcess,
                                                      tiny_model_dir) -> None:
    kubectl = cluster.kubectl
    start = time.monotonic()
    kubectl.apply(manifest(str(tiny_model_dir("llama"))))
    found = wait_for("the pipeline group to serve", lambda: serving(cluster), 180, operator)
    print(f"serving after {time.monotonic() - start:.1f} s", flush=True)

    lws = kubectl.get(*LWS, f"{NAME}-workers")
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    leader_args, worker_args = (found[n]["spec"]["containers"][0]["args"] for n in (LEADER, WORKER))
    assert "--headless" in worker_args and "--headless" not in leader_args
    secret = kubectl.get("v1", "Secret", f"{NAME}-node-secret")
    value = base64.b64decode(secret["data"]["node-secret"]).decode()
    assert len(value) >= 32
    assert value not in str(kubectl.get(*IS, NAME)) and value not in operator.log_path.read_text()

    reply = chat(cluster)
    assert reply.usage.completion_tokens > 0 and reply.model == NAME

    start = time.monotonic()
    kubectl.delete("v1", "Pod", WORKER)
    wait_for("the group to be recreated and serve again",
             lambda: serving(cluster, not_leader_uid=found[LEADER]["metadata"]["uid"]), 180, operator)
    print(f"recreated and serving after {time.monotonic() - start:.1f} s", flush=True)
    assert chat(cluster).usage.completion_tokens > 0
