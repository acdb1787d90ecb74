"""spec.router, spec.loadBalancing, spec.inferencePool and minReplicas 0 (traffic.py): defaults,
and every invalid case names the field, the value and what to do."""
from __future__ import annotations

import pytest

from kubeinfer.operator.spec import InvalidSpec
from kubeinfer.operator.traffic import STRATEGIES, InferencePool, LoadBalancing
from kubeinfer.router.config import STRATEGIES as ROUTER_STRATEGIES
from tests.operator.helpers import make_spec


def test_defaults_leave_the_router_in_charge():
    traffic = make_spec({}).traffic
    assert traffic.router == "kubeinfer" and traffic.load_balancing == LoadBalancing()
    assert traffic.inference_pool == InferencePool("", 9002) and traffic.autoscaling is None


def test_the_operator_and_the_router_know_the_same_strategies():
    assert STRATEGIES == ROUTER_STRATEGIES


def test_prefix_hash_with_its_parameters():
    lb = make_spec({"loadBalancing": {"strategy": "prefix-hash", "prefixHash": {
        "prefixChars": 200, "prefixTokens": 16, "loadFactor": 2}}}).traffic.load_balancing
    assert lb == LoadBalancing("prefix-hash", 200, 16, 2.0) and isinstance(lb.load_factor, float)


def test_scale_from_zero_is_allowed_with_the_kubeinfer_router():
    a = make_spec({"replicas": 0, "autoscaling": {"minReplicas": 0, "maxReplicas": 2}}).autoscaling
    assert a.min_replicas == 0 and a.scales_to_zero


def test_inference_pool_with_its_endpoint_picker():
    spec = make_spec({"router": "inference-pool",
                      "inferencePool": {"endpointPickerRef": {"name": "epp", "port": 9003}}})
    assert spec.traffic.router == "inference-pool"
    assert spec.traffic.inference_pool == InferencePool("epp", 9003)


BAD = [
    ({"router": "istio"}, "spec.router", "one of kubeinfer, inference-pool, none"),
    ({"loadBalancing": {"strategy": "random"}}, "spec.loadBalancing.strategy", "one of least-load, prefix-hash"),
    ({"loadBalancing": "prefix-hash"}, "spec.loadBalancing", "must be a mapping"),
    ({"loadBalancing": {"stratgy": "prefix-hash"}}, "spec.loadBalancing.stratgy", "allowed fields are strategy"),
    ({"loadBalancing": {"prefixHash": {"prefixChars": 10}}}, "spec.loadBalancing.prefixHash",
     "only applies with spec.loadBalancing.strategy: prefix-hash"),
    ({"loadBalancing": {"strategy": "prefix-hash", "prefixHash": {"loadFactor": 0.9}}},
     "spec.loadBalancing.prefixHash.loadFactor", "must be a number >= 1.0"),
    ({"loadBalancing": {"strategy": "prefix-hash", "prefixHash": {"loadFactor": "2"}}},
     "spec.loadBalancing.prefixHash.loadFactor", "must be a number >= 1.0"),
    ({"loadBalancing": {"strategy": "prefix-hash", "prefixHash": {"prefixChars": 0}}},
     "spec.loadBalancing.prefixHash.prefixChars", "integer >= 1"),
    ({"loadBalancing": {"strategy": "prefix-hash", "prefixHash": {"prefixTokens": 1.5}}},
     "spec.loadBalancing.prefixHash.prefixTokens", "integer >= 1"),
    ({"loadBalancing": {"strategy": "prefix-hash", "prefixHash": {"chars": 5}}},
     "spec.loadBalancing.prefixHash.chars", "allowed fields are prefixChars"),
    ({"inferencePool": {"endpointPickerRef": {"name": "epp"}}}, "spec.inferencePool",
     "only applies with spec.router: inference-pool"),
    ({"router": "inference-pool", "inferencePool": {"endpointPickerRef": {"port": 0}}},
     "spec.inferencePool.endpointPickerRef.port", "integer >= 1"),
    ({"router": "inference-pool", "inferencePool": {"endpointPickerRef": {"port": 70000}}},
     "spec.inferencePool.endpointPickerRef.port", "1 to 65535"),
    ({"router": "inference-pool", "inferencePool": {"endpointPickerRef": {"name": 3}}},
     "spec.inferencePool.endpointPickerRef.name", "must name the endpoint picker's Service"),
    ({"router": "none", "autoscaling": {"minReplicas": 0, "maxReplicas": 2}}, "spec.autoscaling.minReplicas",
     "scale from zero needs spec.router: kubeinfer"),
    ({"router": "inference-pool", "autoscaling": {"minReplicas": 0, "maxReplicas": 2}},
     "spec.autoscaling.minReplicas", "set minReplicas to 1 or spec.router to kubeinfer"),
]


@pytest.mark.parametrize("spec,field,allowed", BAD, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD)])
def test_bad_traffic_is_named(spec, field, allowed):
    with pytest.raises(InvalidSpec) as e:
        make_spec(spec)
    problems = {p.field: p.allowed for p in e.value.problems}
    assert field in problems, e.value
    assert allowed in problems[field]
