"""The router watching a Kubernetes API (tests/k8s_emulator): InferenceServices name the models,
EndpointSlices list their ready replicas (fake replicas on 127.0.0.1); a model scaled to zero is
held until its slice lists a ready replica.

The emulator's controllers are off here, so the test writes the EndpointSlices itself, as the
EndpointSlice controller would (tests/e2e/test_router_e2e.py runs the real controller).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from kubernetes import client
from kubernetes import config as kube_config

from kubeinfer.router.kube_source import EndpointSliceWatcher
from tests.k8s_emulator import Emulator
from tests.router.conftest import wait_for
from tests.router.test_replica_killed import ROOT

NS = "default"
@pytest.fixture
def api(tmp_path):
    with Emulator(tmp_path, with_kubelet=False, with_controllers=False, with_gc=False) as emu:
        api_client = kube_config.new_client_from_config(config_file=str(emu.write_kubeconfig(tmp_path / "kc")))
        ext = client.ApiextensionsV1Api(api_client)
        ext.create_custom_resource_definition(yaml.safe_load((ROOT / "crds" / "inferenceservice.yaml").read_text()))
        yield api_client


def inference_service(name: str, served: str = "", strategy: str = "") -> dict:
    meta = {"name": name, "namespace": NS, "labels": {}}
    if strategy:
        meta["annotations"] = {"kubeinfer.io/load-balancing": strategy}
    model = {"uri": "default", **({"servedName": served} if served else {})}
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "InferenceService", "metadata": meta,
            "spec": {"model": model}}


def endpoint_slice(service: str, *ports_ready: tuple[int, bool]) -> dict:
    # one slice per port: the fake replicas all listen on 127.0.0.1, on ports of their own
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-x", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": service,
                                    "kubeinfer.io/inferenceservice": service}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": ports_ready[0][0]}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": r}} for _, r in ports_ready]}


def test_router_follows_inference_services_and_endpoint_slices(api, make_router, make_upstream):
    a, b = make_upstream("a"), make_upstream("b")
    custom = client.CustomObjectsApi(api)
    create_is = lambda body: custom.create_namespaced_custom_object("kubeinfer.io", "v1alpha1", NS,
                                                                    "inferenceservices", body)
    create_is(inference_service("alpha", served="chat"))
    create_is(inference_service("beta", strategy="prefix-hash"))
    custom.create_namespaced_custom_object("discovery.k8s.io", "v1", NS, "endpointslices",
                                           endpoint_slice("alpha", (a.port, True)))
    watcher = EndpointSliceWatcher([NS], api_client=api)
    router = make_router(None, source=watcher, max_queue_wait=60)
    with router.http() as http, ThreadPoolExecutor(2) as pool:
        wait_for(lambda: http.get("/health").status_code == 200, "the router's first table")
        cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert sorted(cards) == ["beta", "chat"] and cards["chat"]["ready_replicas"] == 1
        r = http.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "x"}]})
        assert r.json()["served_by"] == "a"
        assert router.proxy.table.get("beta").strategy == "prefix-hash"
        # beta has no ready replica: held until its slice lists one
        held = pool.submit(httpx.post, router.base_url + "/v1/completions",
                           json={"model": "beta", "prompt": "x"}, timeout=60)
        wait_for(lambda: any(m["held"] for m in http.get("/queue").json()["models"]), "a held request")
        custom.create_namespaced_custom_object("discovery.k8s.io", "v1", NS, "endpointslices",
                                               endpoint_slice("beta", (b.port, False)))
        # once the watcher has the slice: a not-ready endpoint is no replica, the request stays held
        wait_for(lambda: (NS, "beta-x") in watcher._objects["slice"], "the watcher to see beta's slice")
        assert router.proxy.table.get("beta").endpoints == () and not held.done()
        custom.patch_namespaced_custom_object("discovery.k8s.io", "v1", NS, "endpointslices", "beta-x",
                                              {"endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]})
        assert held.result().json()["served_by"] == "b"
        # the InferenceService goes away: its model is unknown
        custom.delete_namespaced_custom_object("kubeinfer.io", "v1alpha1", NS, "inferenceservices", "alpha")
        wait_for(lambda: http.get("/v1/models/chat").status_code == 404, "chat to go")
        r = http.post("/v1/chat/completions", json={"model": "chat", "messages": []})
        assert r.status_code == 404
