"""End to end: spec.model.cache with storageClass + size on the emulator. The operator creates the
claim and the download Job; the Job's `kubeinfer download` fills the claim from a stand-in hub
(tests/e2e/fake_hub.py, no network); only then is the Deployment created, and its pod serves the
cached copy read-only, with HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.e2e.conftest import (NAMESPACE, REPO, Cluster, OperatorProcess, running_cluster, running_operator,
                                wait_for)
from tests.e2e.fake_hub import HUB_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

IS = ("kubeinfer.io/v1alpha1", "InferenceService")
NAME = "cached"
PHASES = ("Downloading", "Pending", "Loading", "Ready")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster whose pods' `kubeinfer` is tests/e2e/fake_hub.py; the hub holds
    kubeinfer-test/tiny, a tiny random Llama with a real tokenizer (tests/fixtures)."""
    from tests.fixtures.tiny_models import build_tiny_model

    workdir = tmp_path_factory.mktemp("cache-cluster")
    build_tiny_model("llama", workdir / "hub" / "kubeinfer-test" / "tiny")
    command_map = {"kubeinfer": [sys.executable, str(REPO / "tests" / "e2e" / "fake_hub.py")],
                   "python": [sys.executable], "python3": [sys.executable]}
    env = {**os.environ, "PYTHONPATH": str(REPO), HUB_ENV: str(workdir / "hub")}
    with running_cluster(workdir, kubelet_options={"max_grace": 5.0, "base_env": env,
                                                   "command_map": command_map}) as c:
        yield c


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[OperatorProcess]:
    # module-scoped cluster and operator of their own (the pods' `kubeinfer` is the fake hub's), by
    # the names conftest's diagnostics use
    with running_operator(cluster, "1") as process:
        yield process


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def test_a_cached_model_is_downloaded_once_then_served(cluster: Cluster, operator: OperatorProcess):
    kubectl = cluster.kubectl
    phases: list[str] = []

    def seen(obj: dict[str, Any] | None) -> dict[str, Any] | None:
        phase = ((obj or {}).get("status") or {}).get("phase")
        if phase and (not phases or phases[-1] != phase):
            phases.append(phase)
        return obj

    kubectl.apply({"apiVersion": "kubeinfer.io/v1alpha1", "kind": "InferenceService",
                   "metadata": {"name": NAME, "namespace": NAMESPACE},
                   "spec": {"model": {"uri": "hf://kubeinfer-test/tiny",
                                      "cache": {"storageClass": "standard", "size": "1Gi"}},
                            "accelerator": "none",
                            "resources": {"requests": {"cpu": "1", "memory": "2Gi"},
                                          "limits": {"memory": "4Gi"}},
                            "probes": {"startup": {"failureThreshold": 60, "periodSeconds": 5}}}})
    ready = wait_for("the InferenceService to become Ready", lambda: (obj := seen(kubectl.get(*IS, NAME)))
                     and (obj.get("status") or {}).get("phase") == "Ready" and obj, 180, operator)

    # the phase only moved forward, and ends Ready, serving from the cache
    assert set(phases) <= set(PHASES) and phases[-1] == "Ready", phases
    assert [PHASES.index(p) for p in phases] == sorted(PHASES.index(p) for p in phases), phases
    cached = condition(ready, "ModelCached")
    assert cached["status"] == "True" and "downloaded kubeinfer-test/tiny@main: " in cached["message"], cached

    # the engine's Deployment came only after the Job had succeeded
    [job] = kubectl.list("batch/v1", "Job", f"kubeinfer.io/inferenceservice={NAME}")
    deployment = kubectl.get("apps/v1", "Deployment", NAME)
    assert deployment["metadata"]["creationTimestamp"] >= job["status"]["completionTime"]
    claim = kubectl.get("v1", "PersistentVolumeClaim", f"{NAME}-model-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["ownerReferences"][0]["uid"] == ready["metadata"]["uid"]

    [pod] = [p for p in kubectl.list("v1", "Pod", f"kubeinfer.io/inferenceservice={NAME}")
             if not p["metadata"].get("deletionTimestamp")]
    [engine] = pod["spec"]["containers"]
    assert engine["args"][1] == "/model-store/models/kubeinfer-test--tiny/main"
    assert {"name": "model-store", "mountPath": "/model-store", "readOnly": True} in engine["volumeMounts"]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in engine["env"]
    folder = cluster.workdir / "pvcs" / NAMESPACE / f"{NAME}-model-cache" / "models" / \
        "kubeinfer-test--tiny" / "main"
    assert (folder / ".kubeinfer-complete").is_file()

    client = openai.OpenAI(base_url=cluster.emu.proxy_url(NAMESPACE, f"{NAME}:http") + "/v1",
                           api_key=cluster.emu.token, timeout=60, max_retries=0)
    reply = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens > 0 and reply.model == NAME   # random weights: any text

    kubectl.delete(*IS, NAME)
    wait_for("the InferenceService, its Job and its claim to be gone", lambda: kubectl.get(*IS, NAME) is None
             and not kubectl.list("batch/v1", "Job") and not kubectl.list("v1", "PersistentVolumeClaim"),
             60, operator)
