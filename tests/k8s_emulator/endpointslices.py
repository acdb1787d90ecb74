"""The EndpointSlice controller, as kube-controller-manager runs it: for every Service with a
selector, EndpointSlices (discovery.k8s.io/v1) listing the pods it selects.

- One endpoint per pod that has an IP: addresses [podIP], conditions ready (the pod's Ready
  condition, false while terminating), serving, terminating; targetRef the pod; nodeName.
- Endpoints are grouped by their resolved ports, one slice per group, as the real controller does
  when a named targetPort resolves differently per pod. Here that is the rule rather than the
  exception: the stand-in kubelet gives every pod's container port a local port of its own (all
  pods are 127.0.0.1), so each running pod's slice names the port that really reaches it. A
  Service whose selector matches no pod keeps one slice with no endpoints and no ports.
- Slices are named SERVICE-<hash of the ports>, carry the Service's labels plus
  kubernetes.io/service-name and endpointslice.kubernetes.io/managed-by, and are controlled by the
  Service (ownerReference), so the garbage collector removes them with it. Slices of a port group
  that went away are deleted.

Not modelled: maxEndpointsPerSlice (100 in Kubernetes), topology hints, publishNotReadyAddresses,
Services without a selector (their slices are someone else's), dual-stack.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from .controllers import is_pod_ready
from .errors import ApiError
from .probes import resolve_port
from .selectors import selector_from_label_selector_object
from .reconcile_loop import reconcile_loop
from .store import Store

log = logging.getLogger(__name__)
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
MANAGER = "endpointslice-controller.k8s.io"

# (namespace, pod, target port, the pod's first container) -> the port number that reaches it
PortResolver = Callable[[str, str, Any, dict[str, Any]], int]


def declared_port(namespace: str, pod: str, target: Any, container: dict[str, Any]) -> int:
    """The container port a targetPort names, as on a real cluster (no local remapping)."""
    return resolve_port(target, container, {})


class EndpointSliceController:
    def __init__(self, store: Store, port_of: PortResolver = declared_port, interval: float = 1.0) -> None:
        self.store, self.port_of, self.interval = store, port_of, interval
        registry = store.registry
        self.services = registry.lookup("", "v1", "services")
        self.pods = registry.lookup("", "v1", "pods")
        self.slices = registry.lookup("discovery.k8s.io", "v1", "endpointslices")

    async def run(self) -> None:
        await reconcile_loop(self.store, {("", "services"), ("", "pods"), ("discovery.k8s.io", "endpointslices")}, self.interval,
                             self.reconcile_all, "endpointslice")

    def reconcile_all(self) -> None:
        for svc in self.store.items(self.services):
            if not svc["metadata"].get("deletionTimestamp") and (svc.get("spec") or {}).get("selector"):
                self.reconcile_service(svc)

    def desired(self, svc: dict[str, Any]) -> list[dict[str, Any]]:
        """The slices this Service should have (pure but for the port resolver)."""
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        matches = selector_from_label_selector_object({"matchLabels": svc["spec"]["selector"]})
        groups: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
        for pod in self.store.items(self.pods, ns):
            ip = (pod.get("status") or {}).get("podIP")
            if not ip or not matches(pod["metadata"].get("labels") or {}):
                continue
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            ports = self._ports(svc, pod)
            if ports is None:
                continue   # a named targetPort this pod does not declare: not an endpoint
            terminating = bool(pod["metadata"].get("deletionTimestamp"))
            ready = is_pod_ready(pod)
            endpoint = {"addresses": [ip],
                        "conditions": {"ready": ready and not terminating, "serving": ready,
                                       "terminating": terminating},
                        "targetRef": {"kind": "Pod", "namespace": ns, "name": pod["metadata"]["name"],
                                      "uid": pod["metadata"]["uid"]}}
            if (pod.get("spec") or {}).get("nodeName"):
                endpoint["nodeName"] = pod["spec"]["nodeName"]
            key = json.dumps(ports, sort_keys=True)
            groups.setdefault(key, (ports, []))[1].append(endpoint)
        if not groups:
            groups[""] = ([], [])
        return [self._slice(svc, ports, sorted(eps, key=lambda e: e["targetRef"]["name"]))
                for ports, eps in groups.values()]

    def _ports(self, svc: dict[str, Any], pod: dict[str, Any]) -> list[dict[str, Any]] | None:
        container = (pod.get("spec") or {}).get("containers", [{}])[0]
        out = []
        for port in svc["spec"].get("ports") or []:
            try:
                number = self.port_of(pod["metadata"]["namespace"], pod["metadata"]["name"],
                                      port.get("targetPort", port["port"]), container)
            except LookupError:
                return None
            entry = {"name": port.get("name", ""), "port": number, "protocol": port.get("protocol", "TCP")}
            if port.get("appProtocol"):
                entry["appProtocol"] = port["appProtocol"]
            out.append(entry)
        return out

    def _slice(self, svc: dict[str, Any], ports: list[dict[str, Any]],
               endpoints: list[dict[str, Any]]) -> dict[str, Any]:
        meta = svc["metadata"]
        digest = hashlib.sha256(json.dumps(ports, sort_keys=True).encode()).hexdigest()[:8]
        labels = {**(meta.get("labels") or {}), LABEL_SERVICE_NAME: meta["name"], LABEL_MANAGED_BY: MANAGER}
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": f"{meta['name']}-{digest}", "namespace": meta["namespace"], "labels": labels,
                             "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": meta["name"],
                                                  "uid": meta["uid"], "controller": True,
                                                  "blockOwnerDeletion": True}]},
                "addressType": "IPv4", "ports": ports, "endpoints": endpoints}

    def reconcile_service(self, svc: dict[str, Any]) -> None:
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        want = {s["metadata"]["name"]: s for s in self.desired(svc)}
        have = {s["metadata"]["name"]: s for s in self.store.items(self.slices, ns)
                if (s["metadata"].get("labels") or {}).get(LABEL_SERVICE_NAME) == name
                and (s["metadata"].get("labels") or {}).get(LABEL_MANAGED_BY) == MANAGER}
        for slice_name, body in want.items():
            current = have.get(slice_name)
            try:
                if current is None:
                    self.store.create(self.slices, ns, body)
                elif any(current.get(k) != body[k] for k in ("ports", "endpoints")) or \
                        current["metadata"].get("labels") != body["metadata"]["labels"]:
                    def mutate(obj: dict[str, Any], body: dict[str, Any] = body) -> dict[str, Any]:
                        obj["metadata"]["labels"] = body["metadata"]["labels"]
                        obj["ports"], obj["endpoints"] = body["ports"], body["endpoints"]
                        return obj
                    self.store.update(self.slices, ns, slice_name, mutate)
            except ApiError as e:
                if e.code not in (404, 409):   # a race with the Service's deletion: next round
                    raise
        for slice_name in set(have) - set(want):
            try:
                self.store.delete(self.slices, ns, slice_name)
            except ApiError as e:
                if e.code != 404:
                    raise


def kubelet_ports(kubelet: Any) -> PortResolver:
    """The local port the stand-in kubelet gave the pod's container port (the declared one while
    the pod has not started)."""
    def port_of(namespace: str, pod: str, target: Any, container: dict[str, Any]) -> int:
        runtime = kubelet.runtime_of(namespace, pod)
        return resolve_port(target, container, runtime.ports if runtime is not None else {})
    return port_of
