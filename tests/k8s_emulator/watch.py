"""`?watch=true`: a stream of JSON lines, one watch event each, the way the API server sends them.

- no resourceVersion (or "0"): synthetic ADDED events for what exists now, then live events;
- resourceVersion=N: every event after N from the store's history, then live events; when the history
  no longer reaches back to N, a single ERROR event with a 410 Status (kopf then re-lists);
- sendInitialEvents=true: the synthetic ADDED events end with a BOOKMARK annotated
  `k8s.io/initial-events-end`;
- label and field selectors apply per event, so an object that stops matching arrives as DELETED and one
  that starts matching as ADDED;
- the stream ends after timeoutSeconds (default 30 minutes), when the client goes away, or when the
  emulator stops.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from .errors import ApiError
from .resources import ResourceType
from .selectors import object_matcher
from .store import Store, WatchEvent

_CRDS = ("apiextensions.k8s.io", "customresourcedefinitions")


class WatchHub:
    """The open watch streams, so that stopping the emulator can end them."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[WatchEvent | None]] = set()

    def close_all(self) -> None:
        for queue in list(self.queues):
            queue.put_nowait(None)


def _translate(rt: ResourceType, namespace: str | None, matches: Any, ev: WatchEvent) -> dict[str, Any] | None:
    if ev.key != rt.storage_key or (namespace is not None and ev.namespace != namespace):
        return None
    is_match = matches(ev.obj)
    was_match = ev.old is not None and matches(ev.old)
    if ev.type == "ADDED":
        kind = "ADDED" if is_match else None
    elif ev.type == "MODIFIED":
        kind = "MODIFIED" if is_match and was_match else "ADDED" if is_match else "DELETED" if was_match else None
    else:
        kind = "DELETED" if is_match or was_match else None
    return None if kind is None else {"type": kind, "object": Store.present(rt, ev.obj)}


async def serve_watch(request: web.Request, store: Store, hub: WatchHub, rt: ResourceType,
                      namespace: str | None, params: Mapping[str, str]) -> web.StreamResponse:
    matches = object_matcher(params.get("labelSelector"), params.get("fieldSelector"))
    since = params.get("resourceVersion") or ""
    send_initial = params.get("sendInitialEvents") == "true"
    timeout = float(params.get("timeoutSeconds") or 1800)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()

    def listener(ev: WatchEvent) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ev)

    first: list[dict[str, Any]] = []
    gone: ApiError | None = None
    with store.lock:  # subscribe and snapshot at one resourceVersion: no event lost, none twice
        if since in ("", "0") or send_initial:
            for obj in store.list(rt, namespace)["items"]:
                if matches(obj):
                    first.append({"type": "ADDED", "object": obj})
            if send_initial:
                first.append({"type": "BOOKMARK", "object": {
                    "kind": rt.kind, "apiVersion": rt.api_version,
                    "metadata": {"resourceVersion": str(store.resource_version),
                                 "annotations": {"k8s.io/initial-events-end": "true"}}}})
        else:
            try:
                backlog = store.events_since(int(since))
            except ValueError:
                raise ApiError.bad_request(f"invalid resourceVersion: {since!r}")
            except ApiError as e:
                gone = e
            else:
                first = [out for ev in backlog if (out := _translate(rt, namespace, matches, ev))]
        unsubscribe = store.add_listener(listener) if gone is None else None

    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                       "Cache-Control": "no-cache"})
    await response.prepare(request)
    hub.queues.add(queue)
    try:
        if gone is not None:
            await response.write((json.dumps({"type": "ERROR", "object": gone.status()}) + "\n").encode())
            return response
        for event in first:
            await response.write((json.dumps(event) + "\n").encode())
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            try:
                ev = await asyncio.wait_for(queue.get(), remaining)
            except asyncio.TimeoutError:
                break
            if ev is None:
                break
            if ev.key == _CRDS and ev.type == "DELETED" and \
                    (ev.obj["spec"]["group"], ev.obj["spec"]["names"]["plural"]) == rt.storage_key:
                break  # the resource itself is gone
            out = _translate(rt, namespace, matches, ev)
            if out is not None:
                await response.write((json.dumps(out) + "\n").encode())
    except ConnectionResetError:
        pass
    finally:
        hub.queues.discard(queue)
        if unsubscribe is not None:
            unsubscribe()
    return response
