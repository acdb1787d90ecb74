"""From InferenceServices and EndpointSlices (as the API returns them) to the routing table."""
from __future__ import annotations

import pytest

from kubeinfer.operator.render import service
from kubeinfer.operator.spec import parse_spec
from kubeinfer.router.kube_source import build_backends, slice_endpoints


def isvc(name, ns="ns", served="", annotations=None, lb=None):
    spec = {"model": {"uri": "default", **({"servedName": served} if served else {})}}
    if lb is not None:
        spec["loadBalancing"] = lb
    return {"metadata": {"name": name, "namespace": ns, "annotations": annotations or {}}, "spec": spec}


def eps(service_name, endpoints, ns="ns", name=None, port_name="http", address_type="IPv4"):
    return {"metadata": {"name": name or f"{service_name}-abc", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service_name,
                                    "kubeinfer.io/inferenceservice": service_name.removesuffix("-workers")}},
            "addressType": address_type,
            "ports": [{"name": "dist", "port": 29500}, {"name": port_name, "port": 8000}],
            "endpoints": endpoints}


def ready(ip, is_ready=True):
    return {"addresses": [ip], "conditions": {} if is_ready is None else {"ready": is_ready}}


@pytest.mark.parametrize("slice_, want", [
    (eps("a", [ready("10.0.0.1"), ready("10.0.0.2", False), ready("10.0.0.3", None)]),
     ["10.0.0.1:8000", "10.0.0.3:8000"]),                      # unset ready counts as ready
    (eps("a", [ready("fd00::1")], address_type="IPv6"), ["[fd00::1]:8000"]),
    (eps("a", [ready("10.0.0.1")], port_name="web"), ["10.0.0.1:29500"]),   # no "http": the first port
    (eps("a", [{"addresses": [], "conditions": {"ready": True}}]), []),
    ({**eps("a", [ready("10.0.0.1")]), "ports": None}, []),
])
def test_slice_endpoints(slice_, want):
    assert [e.address for e in slice_endpoints(slice_)] == want


def test_build_backends():
    isvcs = {("ns", "a"): isvc("a", served="llama"),
             ("ns", "b"): isvc("b", annotations={"kubeinfer.io/load-balancing": "prefix-hash"}),
             ("ns", "c"): isvc("c", lb={"strategy": "prefix-hash"}, annotations={"kubeinfer.io/load-balancing": "least-load"}),
             ("other", "a"): isvc("a", ns="other", annotations={"kubeinfer.io/load-balancing": "bogus"})}
    slices = {("ns", "a-1"): eps("a", [ready("10.0.0.1")], name="a-1"),
              ("ns", "a-2"): eps("a", [ready("10.0.0.2")], name="a-2"),
              # the headless workers Service of a pipeline: not where HTTP is served
              ("ns", "a-workers-1"): eps("a-workers", [ready("10.0.0.9")], name="a-workers-1"),
              ("other", "a-1"): eps("a", [ready("10.1.0.1")], ns="other", name="a-1")}
    got = {(b.namespace, b.inference_service): b for b in build_backends(isvcs, slices, "least-load")}
    assert (got["ns", "a"].model, [e.address for e in got["ns", "a"].endpoints]) == (
        "llama", ["10.0.0.1:8000", "10.0.0.2:8000"])
    assert (got["ns", "b"].model, got["ns", "b"].strategy, got["ns", "b"].endpoints) == ("b", "prefix-hash", ())
    assert got["ns", "c"].strategy == "prefix-hash"            # the spec field wins over the annotation
    assert got["other", "a"].strategy == "least-load"          # unknown: the default
    assert [e.address for e in got["other", "a"].endpoints] == ["10.1.0.1:8000"]


def test_the_operator_renders_what_the_router_reads():
    """The Service the operator renders carries the label the router selects slices by, and the
    port named "http" the router sends to."""
    spec = parse_spec("llm", "ns", {"model": {"uri": "default", "servedName": "chat"}}, default_image="img")
    svc = service(spec)
    assert svc["metadata"]["labels"]["kubeinfer.io/inferenceservice"] == "llm"
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]
    assert spec.served_name == "chat"
