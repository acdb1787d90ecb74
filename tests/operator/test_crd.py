"""The CRD: valid for the API server, examples pass its schema, invalid specs are rejected by it;
rendered manifests pass the offline Kubernetes schemas (kubernetes-validate)."""
from __future__ import annotations

import pytest
import yaml

from kubeinfer.operator import schema
from kubeinfer.operator.render import render
from tests.operator.helpers import EXAMPLES, ROOT, example_docs, make_settings, make_spec

kubernetes_validate = pytest.importorskip("kubernetes_validate")
K8S_VERSION = "1.33.0"
CRD = yaml.safe_load((ROOT / "crds" / "inferenceservice.yaml").read_text())


def test_crd_is_valid_for_kubernetes():
    kubernetes_validate.validate(CRD, K8S_VERSION, strict=True)


def test_crd_names_subresources_and_columns():
    spec = CRD["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["kind"], spec["names"]["plural"]) == \
        ("kubeinfer.io", "Namespaced", "InferenceService", "inferenceservices")
    assert spec["names"]["shortNames"] == ["infsvc"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Model": ".spec.model.uri", "Replicas": ".spec.replicas", "Ready": ".status.readyReplicas",
                       "Phase": ".status.phase", "URL": ".status.url", "Age": ".metadata.creationTimestamp"}


def _structural(node: dict, path: str = "") -> list[str]:
    """Every node has a type unless it is int-or-string or preserves unknown fields."""
    bad = []
    if "type" not in node and not node.get("x-kubernetes-int-or-string") \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        bad.append(path or "(root)")
    for key, sub in (node.get("properties") or {}).items():
        bad += _structural(sub, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            bad += _structural(node[key], f"{path}[{key}]")
    return bad


def test_schema_is_structural():
    assert _structural(schema.load_schema()) == []


@pytest.mark.parametrize("example", ["inferenceservice.yaml", "cpu.yaml", "multi-gpu.yaml", "embeddings.yaml",
                                     "router.yaml", "model-cache.yaml"])
def test_examples_pass_the_schema(example):
    for doc in example_docs(example):
        defaulted, problems = schema.validate(doc)
        assert problems == []
        scales_from_zero = (defaulted["spec"].get("autoscaling") or {}).get("minReplicas") == 0
        assert defaulted["spec"]["replicas"] >= (0 if scales_from_zero else 1)
        assert defaulted["spec"]["parallelism"]["pipeline"] >= 1


def test_schema_defaults():
    defaulted, problems = schema.validate({"apiVersion": "kubeinfer.io/v1alpha1", "kind": "InferenceService",
                                           "metadata": {"name": "x"},
                                           "spec": {"model": {"uri": "default"}, "apiKeySecretRef": {"name": "k"}}})
    assert problems == []
    assert defaulted["spec"] == {
        "model": {"uri": "default"}, "engine": {}, "accelerator": "nvidia.com/gpu",
        "parallelism": {"tensor": 1, "pipeline": 1}, "replicas": 1, "router": "kubeinfer",
        "apiKeySecretRef": {"name": "k", "key": "api-key"}, "terminationGracePeriodSeconds": 120}


REJECTED = [
    ({}, "spec.model"),                               # no default model: a typo must not deploy SmolLM2
    ({"model": {"url": "hf://a/b"}}, "spec.model.uri"),
    ({"model": {"uri": "default"}, "parallelism": {"pipeline": 65}}, "spec.parallelism.pipeline"),
    ({"replicas": -1}, "spec.replicas"),
    ({"model": {"uri": "hf://a/b", "cache": {"size": "1Gi", "reclaimPolicy": "Keep"}}},
     "spec.model.cache.reclaimPolicy"),
    ({"model": {"uri": "s3://bucket/m"}}, "spec.model.uri"),
    ({"model": {"uri": "hf://only-one-part"}}, "spec.model.uri"),
    ({"parallelism": {"tensor": 3}}, "spec.parallelism.tensor"),
    ({"parallelism": {"pipeline": 0}}, "spec.parallelism.pipeline"),
    ({"engine": {"imagePullPolicy": "Sometimes"}}, "spec.engine.imagePullPolicy"),
    ({"engine": {"args": [1]}}, "spec.engine.args[0]"),
    ({"apiKeySecretRef": {"key": "k"}}, "spec.apiKeySecretRef.name"),
    ({"probes": {"startup": {"failureThreshold": 0}}}, "spec.probes.startup.failureThreshold"),
    ({"accelerator": "GPU please"}, "spec.accelerator"),
    ({"replica": 2}, "spec.replica"),
    ({"autoscaling": {"minReplicas": 1}}, "spec.autoscaling.maxReplicas"),
    ({"autoscaling": {"minReplicas": -1, "maxReplicas": 2}}, "spec.autoscaling.minReplicas"),
    ({"router": "istio"}, "spec.router"),
    ({"loadBalancing": {"strategy": "random"}}, "spec.loadBalancing.strategy"),
    ({"loadBalancing": {"prefixHash": {"loadFactor": 0.5}}}, "spec.loadBalancing.prefixHash.loadFactor"),
    ({"loadBalancing": {"prefixHash": {"prefixChars": 0}}}, "spec.loadBalancing.prefixHash.prefixChars"),
    ({"inferencePool": {"endpointPickerRef": {"port": 70000}}}, "spec.inferencePool.endpointPickerRef.port"),
    ({"autoscaling": {"maxReplicas": 0}}, "spec.autoscaling.maxReplicas"),
    ({"autoscaling": {"maxReplicas": 2, "targetRequests": 0}}, "spec.autoscaling.targetRequests"),
    ({"autoscaling": {"maxReplicas": 2, "scaleDownDelaySeconds": -1}}, "spec.autoscaling.scaleDownDelaySeconds"),
    ({"autoscaling": {"maxReplicas": 2, "intervalSeconds": 0}}, "spec.autoscaling.intervalSeconds"),
]


@pytest.mark.parametrize("spec,field", REJECTED, ids=[f for _, f in REJECTED])
def test_schema_rejects(spec, field):
    _, problems = schema.validate({"apiVersion": "kubeinfer.io/v1alpha1", "kind": "InferenceService",
                                   "metadata": {"name": "x"}, "spec": spec})
    assert field in [p.field for p in problems], problems


def _all_renders():
    cases = [(f, doc["spec"], False) for f in ("inferenceservice.yaml", "cpu.yaml", "multi-gpu.yaml",
                                               "embeddings.yaml", "router.yaml", "model-cache.yaml")
             for doc in example_docs(f)]
    cases += [("pvc", {"model": {"uri": "pvc://weights/m"}, "apiKeySecretRef": {"name": "k"}}, False),
              ("pipeline+lws", {"parallelism": {"tensor": 2, "pipeline": 2}, "replicas": 2}, True),
              ("pipeline+statefulsets", {"parallelism": {"pipeline": 3, "exclusiveTopology": "rack"},
                                         "replicas": 2}, False),
              ("cache-pvc", {"model": {"uri": "hf://o/m", "cache": {"pvc": "shared"}}}, False)]
    return cases


@pytest.mark.parametrize("name,spec,lws", _all_renders(), ids=[c[0] for c in _all_renders()])
def test_rendered_manifests_pass_kubernetes_validate(name, spec, lws):
    owner = {"metadata": {"name": "llm", "uid": "0b3c7a5e-1111-2222-3333-444455556666"}}
    objs = render(make_spec(spec), make_settings(), owner=owner, use_lws=lws)
    checked = 0
    for obj in objs:
        if obj["kind"] == "LeaderWorkerSet":   # a CRD type: no offline schema; check its pod templates
            for role in ("leaderTemplate", "workerTemplate"):
                kubernetes_validate.validate(
                    {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t", "namespace": "ns"},
                     "template": obj["spec"]["leaderWorkerTemplate"][role]}, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        checked += 1
    assert checked == len(objs)


def test_examples_are_what_render_reads():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == \
        ["cpu.yaml", "embeddings.yaml", "inferenceservice.yaml", "model-cache.yaml", "multi-gpu.yaml",
         "router.yaml", "vlm.yaml"]
