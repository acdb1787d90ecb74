"""spec.router inference-pool: the operator renders a Gateway API Inference Extension
InferencePool beside the Service when the cluster serves the kind, deletes it when the spec stops
asking, and says once when the cluster does not serve it."""
from __future__ import annotations

from kubeinfer.operator.reconcile import LwsDiscovery, pool_discovery, reconcile
from kubeinfer.operator.render import render, service
from tests.operator.helpers import FakeApi, inference_service, make_settings, make_spec

POOL = {"router": "inference-pool", "accelerator": "none"}


def run(api, body, pools):
    settings = make_settings()
    return reconcile(api, body, settings, LwsDiscovery(settings.leaderworkerset), pools=pools)


def test_the_pool_selects_the_services_pods_and_names_the_endpoint_picker():
    spec = make_spec({**POOL, "inferencePool": {"endpointPickerRef": {"name": "gw-epp", "port": 9010}}})
    objs = {o["kind"]: o for o in render(spec, make_settings())}
    pool = objs["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1" and pool["metadata"]["name"] == "llm"
    assert pool["spec"]["selector"]["matchLabels"] == service(spec)["spec"]["selector"]
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == {"name": "gw-epp", "port": {"number": 9010}}
    assert pool["metadata"]["labels"]["kubeinfer.io/inferenceservice"] == "llm"
    default = {o["kind"]: o for o in render(make_spec(POOL), make_settings())}["InferencePool"]
    assert default["spec"]["endpointPickerRef"] == {"name": "llm-epp", "port": {"number": 9002}}


def test_no_pool_unless_asked_for_or_where_not_served():
    for router in ("kubeinfer", "none"):
        assert "InferencePool" not in [o["kind"] for o in render(make_spec({"router": router}), make_settings())]
    assert "InferencePool" not in [o["kind"] for o in render(make_spec(POOL), make_settings(), pools=False)]


def test_reconcile_creates_the_pool_and_deletes_it_when_the_router_changes():
    api, pools = FakeApi(pools=True), pool_discovery()
    body = inference_service(POOL)
    out = run(api, body, pools)
    assert ("InferencePool", "llm") in api.kinds() and out.failed == []
    assert "created InferencePool llm" in [e[2] for e in out.events]
    assert api.objects[("InferencePool", "ns", "llm")]["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    out = run(api, inference_service({**POOL, "router": "kubeinfer"}, generation=2), pools)
    assert ("InferencePool", "llm") not in api.kinds() and ("Service", "llm") in api.kinds()
    assert "deleted InferencePool llm" in [e[2] for e in out.events]


def test_a_cluster_without_the_kind_gets_the_rest_and_one_warning():
    api, pools = FakeApi(pools=False), pool_discovery()
    body = inference_service(POOL)
    first = run(api, body, pools)
    assert api.kinds() == [("Deployment", "llm"), ("PodDisruptionBudget", "llm"), ("Service", "llm")]
    warnings = [e for e in first.events if e[1] == "InferencePoolNotServed"]
    assert len(warnings) == 1 and "install the Gateway API Inference Extension" in warnings[0][2]
    assert first.failed == [] and first.invalid is None
    again = run(api, body, pools)
    assert not [e for e in again.events if e[1] == "InferencePoolNotServed"]
