"""Reaching a Service or a pod from the test, as `kubectl proxy` users do:
/api/v1/namespaces/NS/services/NAME[:PORT]/proxy/PATH is forwarded to a ready pod behind the Service
(selector -> ready pods -> targetPort -> that pod's local port); pods/NAME[:PORT]/proxy/PATH to the pod.
Responses stream through, so server-sent events work.
"""
from __future__ import annotations

import itertools
from typing import Any

import aiohttp
from aiohttp import web

from .controllers import is_pod_ready
from .errors import ApiError
from .kubelet import Kubelet
from .probes import resolve_port
from .selectors import selector_from_label_selector_object

_HOP_BY_HOP = {"host", "authorization", "connection", "keep-alive", "transfer-encoding", "content-length",
               "upgrade", "proxy-authorization", "te", "trailer"}
_round_robin = itertools.count()


def _split(name_port: str) -> tuple[str, str | None]:
    name, _, port = name_port.partition(":")
    return name, (port or None)


def service_backend(kubelet: Kubelet, namespace: str, name_port: str) -> int:
    """The local port of a ready pod behind Service NAME[:PORT] (port by name or number)."""
    store = kubelet.store
    name, port_ref = _split(name_port)
    svc = store.get(store.registry.lookup("", "v1", "services"), namespace, name)
    ports = svc["spec"].get("ports") or []
    port = next((p for p in ports if port_ref in (None, p.get("name"), str(p.get("port")))), None)
    if port is None:
        raise ApiError(503, "ServiceUnavailable", f'no service port "{port_ref}" on service "{name}"')
    matches = selector_from_label_selector_object({"matchLabels": svc["spec"].get("selector") or {}})
    candidates = []
    for pod in store.items(store.registry.lookup("", "v1", "pods"), namespace):
        runtime = kubelet.runtime_of(namespace, pod["metadata"]["name"])
        if (svc["spec"].get("selector") and matches(pod["metadata"].get("labels") or {}) and is_pod_ready(pod)
                and not pod["metadata"].get("deletionTimestamp") and runtime is not None):
            candidates.append((pod, runtime))
    if not candidates:
        raise ApiError(503, "ServiceUnavailable", f'no endpoints available for service "{name}"')
    pod, runtime = candidates[next(_round_robin) % len(candidates)]
    return resolve_port(port.get("targetPort", port["port"]), pod["spec"]["containers"][0], runtime.ports)


def pod_backend(kubelet: Kubelet, namespace: str, name_port: str) -> int:
    name, port_ref = _split(name_port)
    runtime = kubelet.runtime_of(namespace, name)
    if runtime is None or not runtime.ports:
        raise ApiError(503, "ServiceUnavailable", f'pod "{name}" is not running or exposes no port')
    if port_ref is None:
        return next(iter(runtime.ports.values()))
    pod = kubelet.store.get(kubelet.store.registry.lookup("", "v1", "pods"), namespace, name)
    return resolve_port(port_ref, pod["spec"]["containers"][0], runtime.ports)


def make_proxy(kubelet: Kubelet) -> Any:
    async def proxy(request: web.Request, plural: str, namespace: str, name_port: str, tail: str) -> web.StreamResponse:
        backend = service_backend if plural == "services" else pod_backend
        port = backend(kubelet, namespace, name_port)
        url = f"http://127.0.0.1:{port}{tail}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        assert kubelet.session is not None
        try:
            async with kubelet.session.request(request.method, url, params=request.query, headers=headers,
                                               data=await request.read(),
                                               timeout=aiohttp.ClientTimeout(total=300)) as upstream:
                response = web.StreamResponse(status=upstream.status, headers={
                    k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP})
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except aiohttp.ClientError as e:
            raise ApiError(503, "ServiceUnavailable", f"error trying to reach {plural}/{name_port}: {e}")

    return proxy


def service_url(kubelet: Kubelet, namespace: str, name_port: str) -> str:
    """http://127.0.0.1:PORT of a ready pod behind the Service, for clients that want no proxy in between."""
    return f"http://127.0.0.1:{service_backend(kubelet, namespace, name_port)}"
