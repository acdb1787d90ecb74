"""Load balancing chosen per InferenceService: spec.loadBalancing (strategy and prefixHash's
parameters) reaches the table, the balancer and the proxy; spec.router other than kubeinfer keeps
a model out of this router."""
from __future__ import annotations

import dataclasses

import pytest

from kubeinfer.router.balancer import Balancer, InFlight
from kubeinfer.router.endpoints import Backend, Endpoint
from kubeinfer.router.kube_source import build_backends, prefix_hash_params
from tests.router.conftest import backend
from tests.router.test_kube_source import eps, isvc, ready


def test_the_table_carries_prefix_hash_parameters_and_skips_other_routers():
    ph = {"strategy": "prefix-hash", "prefixHash": {"prefixChars": 12, "prefixTokens": 4, "loadFactor": 2}}
    isvcs = {("ns", "a"): isvc("a", lb=ph), ("ns", "b"): isvc("b"),
             ("ns", "pool"): {**isvc("pool"), "spec": {"router": "inference-pool"}},
             ("ns", "direct"): {**isvc("direct"), "spec": {"router": "none"}},
             ("ns", "explicit"): {**isvc("explicit"), "spec": {"router": "kubeinfer"}}}
    slices = {("ns", "a-1"): eps("a", [ready("10.0.0.1")], name="a-1")}
    got = {b.inference_service: b for b in build_backends(isvcs, slices, "least-load")}
    assert sorted(got) == ["a", "b", "explicit"]
    a = got["a"]
    assert (a.strategy, a.prefix_chars, a.prefix_tokens, a.load_factor) == ("prefix-hash", 12, 4, 2.0)
    assert (got["b"].prefix_chars, got["b"].load_factor) == (None, None)


@pytest.mark.parametrize("prefix_hash, want", [
    ({"prefixChars": 0, "prefixTokens": -1, "loadFactor": 0.5}, {}),
    ({"prefixChars": "10", "prefixTokens": True, "loadFactor": "2"}, {}),
    ({"prefixChars": 2.5}, {}),
    ({"prefixChars": 8.0, "loadFactor": 1}, {"prefix_chars": 8, "load_factor": 1.0}),
])
def test_values_an_older_crd_let_in_fall_back_to_the_routers(prefix_hash, want):
    assert prefix_hash_params(isvc("a", lb={"strategy": "prefix-hash", "prefixHash": prefix_hash})) == want
    assert prefix_hash_params(isvc("a", lb={"prefixHash": "x"})) == {}


def test_the_backends_load_factor_wins_over_the_balancers():
    addrs = [f"10.0.0.{i}:8000" for i in range(1, 4)]
    in_flight = InFlight()
    key = "a conversation"
    balancer = Balancer(in_flight, load_factor=1.0)
    base = Backend("m", "ns", "is", "prefix-hash", tuple(Endpoint(a) for a in addrs))
    home = balancer.pick(base, key).address
    for _ in range(4):
        in_flight.add(home)
    # 4 in flight on its home replica, 0 elsewhere: factor 1.0 bounds it at ceil(5/3) = 2 ...
    assert balancer.pick(base, key).address != home
    # ... while the InferenceService's own factor 4.0 allows ceil(4 * 5 / 3) = 7: it stays home
    assert balancer.pick(dataclasses.replace(base, load_factor=4.0), key).address == home


def _served_by(router, prompts):
    with router.http() as http:
        return {http.post("/v1/completions", json={"model": "m", "prompt": p}).json()["served_by"]
                for p in prompts}


def test_the_backends_prefix_chars_decide_what_is_hashed(make_router, make_upstream):
    ups = [make_upstream(n) for n in "abc"]
    prompts = [f"shared start, then {i} different endings" for i in range(12)]
    whole = backend("m", *ups, strategy="prefix-hash")
    # the router's own 100 characters: the prompts differ within them and spread over the replicas
    assert len(_served_by(make_router([whole]), prompts)) > 1
    # the InferenceService hashes only 12 characters: all of them share those and keep one replica
    short = dataclasses.replace(whole, prefix_chars=12)
    assert len(_served_by(make_router([short]), prompts)) == 1
