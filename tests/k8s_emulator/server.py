"""The HTTP face of the emulator: Kubernetes API paths, verbs, query parameters and Status errors.

Paths: /version, /api, /api/v1, /apis, /apis/G, /apis/G/V, then for every served resource
[.../namespaces/NS]/PLURAL[/NAME[/SUBRESOURCE]]. Subresources: status, scale, pods/log, and
services|pods/NAME[:PORT]/proxy/... (forwarded to the local process behind it, as `kubectl proxy` users
reach a ClusterIP service).
"""
from __future__ import annotations

import collections
import json
from collections.abc import Awaitable, Callable
from typing import Any

import yaml
from aiohttp import web

from . import scale
from .errors import ApiError
from .faults import Faults
from .patching import APPLY_YAML
from .store import Store
from .watch import WatchHub, serve_watch

Proxy = Callable[[web.Request, str, str, str, str], Awaitable[web.StreamResponse]]
Logs = Callable[[str, str, str | None], str | None]

VERSION = {"major": "1", "minor": "31", "gitVersion": "v1.31.0-kubeinfer-emulator", "gitCommit": "emulator",
           "gitTreeState": "clean", "buildDate": "2024-08-13T00:00:00Z", "goVersion": "go1.22.5",
           "compiler": "gc", "platform": "linux/amd64"}


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


class ApiServer:
    def __init__(self, store: Store, token: str | None = None) -> None:
        self.store = store
        self.token = token
        self.hub = WatchHub()
        self.proxy: Proxy | None = None  # set by the kubelet: forwards to a pod's local port
        self.logs: Logs | None = None  # set by the kubelet: a container's log text
        self.requests: collections.deque[str] = collections.deque(maxlen=400)  # "METHOD path -> code"
        self.faults: Faults | None = None  # injected failures (faults.py); None: every request served

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            fault = self.faults.pick(request) if self.faults is not None else None
            if fault is not None:
                raise fault
            response = await self._dispatch(request)
        except ApiError as e:
            response = _json(e.status(), e.code)
        except Exception as e:  # an emulator bug must read as a server error, not hang the client
            response = _json(ApiError(500, "InternalError", f"emulator: {type(e).__name__}: {e}").status(), 500)
        self.requests.append(f"{request.method} {request.path_qs} -> {response.status}")
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        registry = self.store.registry
        if not parts:
            return _json({"paths": ["/api", "/api/v1", "/apis", "/version", "/healthz"]})
        if parts[0] in ("healthz", "livez", "readyz"):
            return web.Response(text="ok")
        if parts == ["version"]:
            return _json(VERSION)
        if parts[0] == "api":
            if len(parts) == 1:
                return _json(registry.api_versions_doc())
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis":
            if len(parts) == 1:
                return _json(registry.api_group_list_doc())
            if len(parts) == 2:
                doc = registry.api_group_doc(parts[1])
                if doc is None:
                    raise ApiError.no_route()
                return _json(doc)
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError.no_route()
        if not rest:
            doc = registry.resource_list_doc(group, version)
            if doc is None:
                raise ApiError.no_route()
            return _json(doc)

        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3 and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
            namespace, rest = rest[1], rest[2:]
        plural, name = rest[0], (rest[1] if len(rest) > 1 else None)
        subresource = rest[2] if len(rest) > 2 else None
        rt = registry.lookup(group, version, plural)
        if rt is None or (namespace is not None and not rt.namespaced):
            raise ApiError.no_route()
        if rt.namespaced and name is not None and namespace is None:
            raise ApiError.no_route()
        if subresource is not None and subresource not in rt.subresources:
            raise ApiError.no_route()
        if subresource == "proxy":
            if self.proxy is None:
                raise ApiError(503, "ServiceUnavailable", "no kubelet: nothing to proxy to")
            tail = request.path.split(f"/{name}/proxy", 1)[1] or "/"
            return await self.proxy(request, plural, namespace or "", name or "", tail)
        if len(rest) > 3:
            raise ApiError.no_route()

        params = request.query
        store, method = self.store, request.method
        dry_run = params.get("dryRun") == "All"
        if name is None:
            if method == "GET":
                if params.get("watch") in ("true", "1"):
                    return await serve_watch(request, store, self.hub, rt, namespace, params)
                limit = int(params["limit"]) if params.get("limit") else None
                return _json(store.list(rt, namespace, params.get("labelSelector"), params.get("fieldSelector"),
                                        limit, params.get("continue")))
            if method == "POST":
                if rt.namespaced and namespace is None:
                    raise ApiError.no_route()
                return _json(store.create(rt, namespace, await _body(request), dry_run), 201)
            if method == "DELETE":
                items = store.list(rt, namespace, params.get("labelSelector"), params.get("fieldSelector"))
                for item in items["items"]:
                    meta = item["metadata"]
                    try:
                        store.delete(rt, meta.get("namespace"), meta["name"], params.get("propagationPolicy"))
                    except ApiError as e:
                        if e.code != 404:
                            raise
                return _json(items)
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a collection")

        if subresource == "log":
            text = self.logs(namespace or "", name, params.get("container")) if self.logs else None
            if text is None:
                store.get(rt, namespace, name)
                raise ApiError.bad_request(f'container in pod "{name}" is waiting to start: ContainerCreating')
            if params.get("tailLines"):
                text = "\n".join(text.splitlines()[-int(params["tailLines"]):]) + "\n"
            return web.Response(text=text, content_type="text/plain")
        if subresource == "scale":
            return _json(await scale.handle(request, store, rt, namespace, name, dry_run))
        if method == "GET":
            return _json(store.get(rt, namespace, name))
        if method == "PUT":
            return _json(store.replace(rt, namespace, name, await _body(request), subresource, dry_run))
        if method == "PATCH":
            content_type = request.headers.get("Content-Type", "application/merge-patch+json")
            return _json(store.patch(rt, namespace, name, content_type, await _body(request), subresource,
                                     params.get("fieldManager"), dry_run))
        if method == "DELETE" and subresource is None:
            options = await _body(request, allow_empty=True) or {}
            propagation = params.get("propagationPolicy") or options.get("propagationPolicy")
            if params.get("orphanDependents") == "true" or options.get("orphanDependents"):
                propagation = "Orphan"
            grace = params.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
            dry_run = dry_run or "All" in (options.get("dryRun") or [])
            return _json(store.delete(rt, namespace, name, propagation, None if grace is None else int(grace),
                                      options.get("preconditions"), dry_run))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")


async def _body(request: web.Request, allow_empty: bool = False) -> Any:
    raw = await request.read()
    if not raw.strip():
        if allow_empty:
            return None
        raise ApiError.bad_request("the request body is empty")
    try:
        if request.headers.get("Content-Type", "").startswith(APPLY_YAML):
            return yaml.safe_load(raw)
        return json.loads(raw)
    except (ValueError, yaml.YAMLError) as e:
        raise ApiError.bad_request(f"the request body is not valid JSON/YAML: {e}")
