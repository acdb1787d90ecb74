"""spec.parse_spec: defaults, and every invalid case names the field, the value and what is allowed."""
from __future__ import annotations

import pytest

from kubeinfer.operator.spec import InvalidSpec, Problem, parse_spec
from tests.operator.helpers import make_spec


def test_defaults():
    spec = make_spec({})
    assert spec.model.uri == "default" and spec.model.scheme == "default"
    assert spec.served_name == "llm"
    assert (spec.tensor, spec.pipeline, spec.replicas) == (1, 1, 1)
    assert spec.accelerator == "nvidia.com/gpu" and spec.uses_gpu
    assert spec.engine.image == "registry.example/kubeinfer:test"
    assert spec.termination_grace_period_seconds == 120
    assert spec.api_key is None and spec.model.credentials is None


def test_model_uri_is_required():
    # a typo must not deploy the demo model: spec.model.url, spec.modle, or no model at all
    for spec in ({}, {"model": {}}, {"model": {"url": "hf://a/b"}}, {"modle": {"uri": "hf://a/b"}}):
        with pytest.raises(InvalidSpec) as info:
            parse_spec("llm", "ns", spec, default_image="i")
        problem = next(p for p in info.value.problems if p.field == "spec.model.uri")
        assert "is required" in str(problem) and "'default'" in str(problem), problem


def test_pipeline_parallelism_is_accepted_also_on_cpu_with_an_exclusive_topology():
    spec = parse_spec("llm", "ns", {"model": {"uri": "default"}, "accelerator": "none", "parallelism": {
        "pipeline": 2, "exclusiveTopology": "topology.kubernetes.io/zone"}}, default_image="i")
    assert (spec.pipeline, spec.exclusive_topology) == (2, "topology.kubernetes.io/zone")
    # a build can still switch the multi-pod path off, with the message saying what to use
    with pytest.raises(InvalidSpec) as info:
        parse_spec("llm", "ns", {"model": {"uri": "default"}, "parallelism": {"pipeline": 2}},
                   default_image="i", pipeline_supported=False)
    assert "spec.parallelism.pipeline: got 2" in str(info.value) and "spec.parallelism.tensor" in str(info.value)


def test_secret_ref_keys_default_and_override():
    spec = make_spec({"model": {"uri": "hf://a/b", "credentialsSecretRef": {"name": "hf"}},
                      "apiKeySecretRef": {"name": "key", "key": "k"}})
    assert (spec.model.credentials.name, spec.model.credentials.key) == ("hf", "token")
    assert (spec.api_key.name, spec.api_key.key) == ("key", "k")


@pytest.mark.parametrize("uri,scheme", [
    ("hf://Qwen/Qwen2.5-7B-Instruct", "hf"),
    ("pvc://models/llama/8b", "pvc"),
    ("pvc://models", "pvc"),
    ("/opt/models/smollm2", "path"),
    ("default", "default"),
])
def test_valid_uris(uri, scheme):
    assert make_spec({"model": {"uri": uri}}).model.scheme == scheme


INVALID = [
    # (spec, name, field, words in the message)
    ({"model": {"uri": "s3://bucket/model"}}, "llm", "spec.model.uri", ["unknown scheme 's3://'", "hf://ORG/NAME"]),
    ({"model": {"uri": "hf://just-a-name"}}, "llm", "spec.model.uri", ["hf://ORG/NAME"]),
    ({"model": {"uri": "relative/path"}}, "llm", "spec.model.uri", ["absolute path"]),
    ({"replicas": -1}, "llm", "spec.replicas", [">= 0"]),
    ({"replicas": "two"}, "llm", "spec.replicas", ["integer"]),
    ({"parallelism": {"tensor": 3}}, "llm", "spec.parallelism.tensor", ["1, 2, 4, 8, 16", "attention heads"]),
    ({"parallelism": {"tensor": 0}}, "llm", "spec.parallelism.tensor", [">= 1"]),
    ({"parallelism": {"pipeline": 0}}, "llm", "spec.parallelism.pipeline", [">= 1"]),
    ({"accelerator": "none", "parallelism": {"tensor": 2}}, "llm", "spec.parallelism.tensor", ["'none'"]),
    ({"parallelism": {"pipeline": 2, "exclusiveTopology": "not a key!"}}, "llm",
     "spec.parallelism.exclusiveTopology", ["topology.kubernetes.io/zone"]),
    ({"parallelism": {"exclusiveTopology": "topology.kubernetes.io/zone"}}, "llm",
     "spec.parallelism.exclusiveTopology", ["pipeline > 1"]),
    ({"engine": {"args": ["--nnodes=2"]}}, "llm", "spec.engine.args[0]", ["spec.parallelism.pipeline"]),
    ({"engine": {"args": ["--headless"]}}, "llm", "spec.engine.args[0]", ["spec.parallelism.pipeline"]),
    ({"engine": {"env": [{"name": "KUBEINFER_NODE_SECRET", "value": "x"}]}}, "llm", "spec.engine.env[0].name",
     ["node-secret"]),
    ({"accelerator": "Not A Resource!"}, "llm", "spec.accelerator", ["'none' for CPU"]),
    ({"resources": {"limits": {"nvidia.com/gpu": 2}}}, "llm", "spec.resources.limits.nvidia.com/gpu",
     ["spec.parallelism.tensor (1)"]),
    ({"accelerator": "none", "resources": {"limits": {"nvidia.com/gpu": 1}}}, "llm",
     "spec.resources.limits.nvidia.com/gpu", ["accelerator is 'none'"]),
    ({"resources": {"requests": {"memory": "lots"}}}, "llm", "spec.resources.requests.memory", ["quantity"]),
    ({"resources": {"claims": []}}, "llm", "spec.resources.claims", ["limits and requests"]),
    ({"engine": {"args": ["--port=9000"]}}, "llm", "spec.engine.args[0]", ["--port", "8000"]),
    ({"engine": {"args": ["--max-model-len", "4096", "--served-model-name", "x"]}}, "llm",
     "spec.engine.args[2]", ["spec.model.servedName"]),
    ({"engine": {"args": ["-tp", "2"]}}, "llm", "spec.engine.args[0]", ["spec.parallelism.tensor"]),
    ({"engine": {"args": ["--api-key=s3cret"]}}, "llm", "spec.engine.args[0]", ["spec.apiKeySecretRef"]),
    ({"engine": {"env": [{"name": "HF_TOKEN", "value": "x"}]}}, "llm", "spec.engine.env[0].name",
     ["spec.model.credentialsSecretRef"]),
    ({"engine": {"imagePullPolicy": "Sometimes"}}, "llm", "spec.engine.imagePullPolicy", ["IfNotPresent"]),
    ({"engine": {"shmSize": "big"}}, "llm", "spec.engine.shmSize", ["quantity"]),
    ({"model": {"uri": "hf://a/b", "credentialsSecretRef": {"name": "Bad_Name"}}}, "llm",
     "spec.model.credentialsSecretRef.name", ["Secret"]),
    ({"probes": {"startup": {"failureThreshold": 0}}}, "llm", "spec.probes.startup.failureThreshold", [">= 1"]),
    ({"probes": {"startup": {"successThreshold": 2}}}, "llm", "spec.probes.startup.successThreshold",
     ["failureThreshold"]),
    ({"probes": {"warmup": {}}}, "llm", "spec.probes.warmup", ["startup, readiness and liveness"]),
    ({"terminationGracePeriodSeconds": -5}, "llm", "spec.terminationGracePeriodSeconds", [">= 0"]),
    ({"scheduling": {"nodeSelector": {"gpu": True}}}, "llm", "spec.scheduling.nodeSelector.gpu", ["quote"]),
    ({}, "9-starts-with-digit", "metadata.name", ["DNS-1035"]),
    ({"parallelism": {"pipeline": 2}}, "a" * 41, "metadata.name", ["40 characters"]),
]


@pytest.mark.parametrize("spec,name,field,words", INVALID, ids=[c[2] + ":" + str(i) for i, c in enumerate(INVALID)])
def test_invalid_spec_names_field_value_and_allowed(spec, name, field, words):
    with pytest.raises(InvalidSpec) as info:
        make_spec(spec, name=name)
    problems = {p.field: p for p in info.value.problems}
    assert field in problems, info.value.problems
    text = str(problems[field])
    for word in words:
        assert word in text, text


def test_every_problem_is_reported_at_once():
    with pytest.raises(InvalidSpec) as info:
        make_spec({"model": {"uri": "s3://x/y"}, "replicas": -2, "parallelism": {"tensor": 3},
                   "engine": {"args": ["--port", "1"]}})
    fields = [p.field for p in info.value.problems]
    assert fields == ["spec.model.uri", "spec.engine.args[0]", "spec.parallelism.tensor", "spec.replicas"]
    assert "s3://x/y" in str(info.value) and "-2" in str(info.value)


def test_problem_text():
    assert str(Problem("spec.replicas", -1, "must be an integer >= 0")) == \
        "spec.replicas: got -1; must be an integer >= 0"
    assert str(Problem("spec.a.name", None, "is required")) == "spec.a.name: is required"
