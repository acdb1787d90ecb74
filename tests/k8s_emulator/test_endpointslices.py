"""The EndpointSlice controller (endpointslices.py) on the store alone, no event loop: what the
slices of a Service hold as its pods come, become ready, move ports and go."""
from __future__ import annotations

from typing import Any

from tests.k8s_emulator.endpointslices import EndpointSliceController, declared_port, kubelet_ports
from tests.k8s_emulator.gc import GarbageCollector
from tests.k8s_emulator.store import Store

NS = "default"


def setup(port_of=declared_port):
    store = Store()
    store.create(store.registry.lookup("", "v1", "namespaces"), None, {"metadata": {"name": NS}})
    return store, EndpointSliceController(store, port_of)


def rt(store: Store, plural: str):
    group = "discovery.k8s.io" if plural == "endpointslices" else ""
    return store.registry.lookup(group, "v1", plural)


def service(store: Store, name: str = "web", selector: dict | None = None) -> dict[str, Any]:
    return store.create(rt(store, "services"), NS, {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": {"team": "a", "kubeinfer.io/inferenceservice": name}},
        "spec": {"selector": {"app": "web"} if selector is None else selector,
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"}]}})


def pod(store: Store, name: str, ready: bool, ip: str | None = "10.0.0.1", labels=None) -> dict[str, Any]:
    created = store.create(rt(store, "pods"), NS, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {"app": "web"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i",
                                                      "ports": [{"name": "http", "containerPort": 8000}]}]}})

    def status(obj):
        obj["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": str(ready)}],
                         **({"podIP": ip} if ip else {})}
        return obj
    return store.update(rt(store, "pods"), NS, created["metadata"]["name"], status, "status")


def slices(store: Store) -> dict[str, dict[str, Any]]:
    return {s["metadata"]["name"]: s for s in store.items(rt(store, "endpointslices"), NS)}


def test_a_service_without_pods_has_one_empty_slice():
    store, ctl = setup()
    svc = service(store)
    ctl.reconcile_all()
    [(name, s)] = slices(store).items()
    assert name.startswith("web-") and s["endpoints"] == [] and s["ports"] == []
    labels = s["metadata"]["labels"]
    assert labels["kubernetes.io/service-name"] == "web" and labels["team"] == "a"
    assert labels["kubeinfer.io/inferenceservice"] == "web"      # copied from the Service
    assert labels["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
    assert s["metadata"]["ownerReferences"][0]["uid"] == svc["metadata"]["uid"]


def test_endpoints_follow_pod_readiness_and_deletion():
    store, ctl = setup()
    service(store)
    pod(store, "a", ready=True, ip="10.0.0.1")
    pod(store, "b", ready=False, ip="10.0.0.2")
    pod(store, "c", ready=True, ip=None)                          # no IP yet: no endpoint
    pod(store, "other", ready=True, ip="10.0.0.9", labels={"app": "db"})
    ctl.reconcile_all()
    [s] = slices(store).values()
    assert s["ports"] == [{"name": "http", "port": 8000, "protocol": "TCP", "appProtocol": "http"}]
    got = {e["targetRef"]["name"]: (e["addresses"], e["conditions"]) for e in s["endpoints"]}
    assert got == {"a": (["10.0.0.1"], {"ready": True, "serving": True, "terminating": False}),
                   "b": (["10.0.0.2"], {"ready": False, "serving": False, "terminating": False})}
    # a terminating pod stays listed, not ready
    store.graceful_pod_deletion = True   # as with a kubelet: the pod terminates before it goes
    store.delete(rt(store, "pods"), NS, "a")
    rv = s["metadata"]["resourceVersion"]
    ctl.reconcile_all()
    [s] = slices(store).values()
    assert s["metadata"]["resourceVersion"] != rv
    a = next(e for e in s["endpoints"] if e["targetRef"]["name"] == "a")
    assert a["conditions"] == {"ready": False, "serving": True, "terminating": True}
    # nothing changed: no write
    ctl.reconcile_all()
    assert next(iter(slices(store).values()))["metadata"]["resourceVersion"] == s["metadata"]["resourceVersion"]


def test_pods_on_ports_of_their_own_get_slices_of_their_own():
    class Kubelet:   # the stand-in kubelet gives each running pod's port a local one
        def __init__(self):
            self.ports = {}

        def runtime_of(self, namespace, name):
            if name not in self.ports:
                return None
            runtime = type("Runtime", (), {})()
            runtime.ports = {8000: self.ports[name]}
            return runtime

    kubelet = Kubelet()
    kubelet.ports = {"a": 41001, "b": 41002}
    store, ctl = setup(kubelet_ports(kubelet))
    service(store)
    for name in ("a", "b", "c"):
        pod(store, name, ready=name != "c", ip="127.0.0.1")
    ctl.reconcile_all()
    by_port = {s["ports"][0]["port"]: [e["targetRef"]["name"] for e in s["endpoints"]] for s in slices(store).values()}
    assert by_port == {41001: ["a"], 41002: ["b"], 8000: ["c"]}    # c has not started: its declared port
    # b goes away: its slice goes with it
    store.delete(rt(store, "pods"), NS, "b")
    ctl.reconcile_all()
    assert sorted(s["ports"][0]["port"] for s in slices(store).values()) == [8000, 41001]


def test_services_without_a_selector_are_left_alone_and_slices_go_with_their_service():
    store, ctl = setup()
    service(store, "manual", selector={})
    service(store)
    ctl.reconcile_all()
    assert [s["metadata"]["labels"]["kubernetes.io/service-name"] for s in slices(store).values()] == ["web"]
    store.delete(rt(store, "services"), NS, "web")
    ctl.reconcile_all()          # the controller leaves a deleted Service's slices to the collector
    assert len(slices(store)) == 1
    GarbageCollector(store).sweep()   # their owner reference takes them with the Service
    assert slices(store) == {}
