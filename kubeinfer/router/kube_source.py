"""`EndpointSliceWatcher`: the endpoint source in a cluster, from the Kubernetes API.

Two list+watch loops per watched namespace (or one cluster-wide each), in daemon threads, through the
official client:

    inferenceservices.kubeinfer.io   the served model name (spec.model.servedName, else the
                                     InferenceService's name, as the operator passes
                                     --served-model-name) and spec.loadBalancing (strategy and
                                     prefixHash's parameters); one whose spec.router is not
                                     kubeinfer (inference-pool, none) is not served here
    endpointslices.discovery.k8s.io  labelSelector=kubeinfer.io/inferenceservice (the EndpointSlice
                                     controller copies the Service's labels, which the operator
                                     renders); only slices of the Service named like the
                                     InferenceService (label kubernetes.io/service-name), whose
                                     pods are the ones serving HTTP (rank 0 of a pipeline group)

Replicas are the slice endpoints with conditions.ready (unset counts as ready, as the API says) at
the port named "http". Both loops post their changes to the router's event loop, which rebuilds the
`EndpointTable` once both have listed. A watch that ends, expires (410) or fails is listed again,
with a backoff after errors.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import client, watch
from kubernetes import config as kube_config

from kubeinfer.operator.render import LABEL_IS
from kubeinfer.router.config import STRATEGIES
from kubeinfer.router.endpoints import Backend, Endpoint, EndpointTable

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "kubeinfer.io", "v1alpha1", "inferenceservices"
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
ANNOTATION_STRATEGY = "kubeinfer.io/load-balancing"
WATCH_SECONDS = 300

Key = tuple[str, str]  # (namespace, name)


def served_model(isvc: dict) -> str:
    spec = isvc.get("spec") or {}
    served = ((spec.get("model") or {}).get("servedName")) or ""
    return served or isvc["metadata"]["name"]


def routed_here(isvc: dict) -> bool:
    """spec.router is kubeinfer (absent: the default, kubeinfer)."""
    return ((isvc.get("spec") or {}).get("router") or "kubeinfer") == "kubeinfer"


def _positive(value: object, kind: type) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return kind(value) if kind is float or float(value).is_integer() else None


def prefix_hash_params(isvc: dict) -> dict:
    """spec.loadBalancing.prefixHash as Backend fields; values the CRD would refuse are left out
    (an older CRD may have let them in): the router's own settings apply instead."""
    lb = (isvc.get("spec") or {}).get("loadBalancing")
    ph = lb.get("prefixHash") if isinstance(lb, dict) else None
    if not isinstance(ph, dict):
        return {}
    chars, tokens = _positive(ph.get("prefixChars"), int), _positive(ph.get("prefixTokens"), int)
    factor = _positive(ph.get("loadFactor"), float)
    out = {"prefix_chars": chars, "prefix_tokens": tokens,
           "load_factor": factor if factor is not None and factor >= 1.0 else None}
    return {k: v for k, v in out.items() if v is not None}


def strategy_of(isvc: dict, default: str) -> str:
    """spec.loadBalancing.strategy, else the annotation (before the CRD had the field), else the
    default."""
    spec_lb = (isvc.get("spec") or {}).get("loadBalancing") or {}
    annotations = isvc["metadata"].get("annotations") or {}
    chosen = (spec_lb.get("strategy") if isinstance(spec_lb, dict) else None) or annotations.get(ANNOTATION_STRATEGY)
    if not chosen:
        return default
    if chosen not in STRATEGIES:
        log.warning("InferenceService %s/%s asks for load balancing %r; known: %s; using %s",
                    isvc["metadata"].get("namespace"), isvc["metadata"]["name"], chosen,
                    ", ".join(STRATEGIES), default)
        return default
    return chosen


def slice_endpoints(eps: dict) -> list[Endpoint]:
    """The ready endpoints of one EndpointSlice at its "http" port (else its first port)."""
    ports = [p for p in eps.get("ports") or [] if p.get("port")]
    if not ports:
        return []
    port = next((p for p in ports if p.get("name") == "http"), ports[0])["port"]
    ipv6 = eps.get("addressType") == "IPv6"
    out = []
    for ep in eps.get("endpoints") or []:
        if (ep.get("conditions") or {}).get("ready") is False or not ep.get("addresses"):
            continue
        host = ep["addresses"][0]
        out.append(Endpoint(f"[{host}]:{port}" if ipv6 else f"{host}:{port}"))
    return out


def build_backends(isvcs: dict[Key, dict], slices: dict[Key, dict], default_strategy: str) -> list[Backend]:
    """Pure: the InferenceServices and EndpointSlices the API holds -> one Backend per model."""
    ready: dict[Key, list[Endpoint]] = {}
    for (ns, _), eps in slices.items():
        service = (eps["metadata"].get("labels") or {}).get(LABEL_SERVICE_NAME)
        if service:
            ready.setdefault((ns, service), []).extend(slice_endpoints(eps))
    return [Backend(served_model(obj), ns, name, strategy_of(obj, default_strategy),
                    tuple(ready.get((ns, name), ())), **prefix_hash_params(obj))
            for (ns, name), obj in isvcs.items() if routed_here(obj)]


class EndpointSliceWatcher:
    def __init__(self, namespaces: list[str] | None = None, *, default_strategy: str = "least-load",
                 kubeconfig: str | None = None, api_client: Any = None) -> None:
        self.namespaces = list(namespaces or [])
        self.default_strategy = default_strategy
        self.kubeconfig = kubeconfig
        self._api_client = api_client
        self._stop = threading.Event()
        self._objects: dict[str, dict[Key, dict]] = {"isvc": {}, "slice": {}}
        self._listed: set[tuple[str, str | None]] = set()
        self._table: EndpointTable | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _client(self) -> Any:
        if self._api_client is None:
            try:
                kube_config.load_incluster_config()
                self._api_client = client.ApiClient()
            except kube_config.ConfigException:
                self._api_client = kube_config.new_client_from_config(config_file=self.kubeconfig)
        return self._api_client

    def _list_functions(self) -> list[tuple[str, str | None, Callable, tuple, dict]]:
        api = self._client()
        custom, discovery = client.CustomObjectsApi(api), client.DiscoveryV1Api(api)
        by_label = {"label_selector": LABEL_IS}
        if not self.namespaces:
            return [("isvc", None, custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL), {}),
                    ("slice", None, discovery.list_endpoint_slice_for_all_namespaces, (), by_label)]
        out = []
        for ns in self.namespaces:
            out.append(("isvc", ns, custom.list_namespaced_custom_object, (GROUP, VERSION, ns, PLURAL), {}))
            out.append(("slice", ns, discovery.list_namespaced_endpoint_slice, (ns,), by_label))
        return out

    def start(self, table: EndpointTable, loop: asyncio.AbstractEventLoop) -> None:
        self._table, self._loop = table, loop
        for kind, ns, fn, args, kw in self._list_functions():
            threading.Thread(target=self._run, args=(kind, ns, fn, args, kw), daemon=True,
                             name=f"router-watch-{kind}-{ns or 'all'}").start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, kind: str, ns: str | None, fn: Callable, args: tuple, kw: dict) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                data = json.loads(fn(*args, _preload_content=False, **kw).data)
                self._post(self._reset, kind, ns, data.get("items") or [])
                w = watch.Watch()
                for event in w.stream(fn, *args, resource_version=data["metadata"]["resourceVersion"],
                                      timeout_seconds=WATCH_SECONDS, allow_watch_bookmarks=True, **kw):
                    if self._stop.is_set():
                        w.stop()
                        return
                    if event["type"] == "ERROR":   # 410 Gone and friends: list again
                        break
                    if event["type"] != "BOOKMARK":
                        self._post(self._apply, kind, event["type"], event["raw_object"])
                backoff = 1.0
            except Exception as e:  # the API being away must never end the loop
                log.warning("watching %s in %s failed (%s); listing again in %g s", kind,
                            ns or "all namespaces", e, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _post(self, fn: Callable, *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:   # the loop closed: the router is stopping
            self._stop.set()

    @staticmethod
    def _key(obj: dict) -> Key:
        return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]

    def _reset(self, kind: str, ns: str | None, items: list[dict]) -> None:
        objects = self._objects[kind]
        for key in [k for k in objects if ns is None or k[0] == ns]:
            del objects[key]
        objects.update((self._key(o), o) for o in items)
        self._listed.add((kind, ns))
        self._publish()

    def _apply(self, kind: str, event_type: str, obj: dict) -> None:
        if event_type == "DELETED":
            self._objects[kind].pop(self._key(obj), None)
        else:
            self._objects[kind][self._key(obj)] = obj
        self._publish()

    def _publish(self) -> None:
        scopes = self.namespaces or [None]
        if self._table is None or len(self._listed) < 2 * len(scopes):
            return
        self._table.replace(build_backends(self._objects["isvc"], self._objects["slice"],
                                           self.default_strategy))
