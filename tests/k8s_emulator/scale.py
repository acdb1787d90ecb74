"""The scale subresource (autoscaling/v1 Scale) of Deployments, ReplicaSets, StatefulSets and custom
resources that declare `subresources.scale` in their CRD."""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .errors import ApiError
from .patching import merge_patch
from .resources import ResourceType
from .store import Store


def _paths(rt: ResourceType) -> tuple[str, str, str | None]:
    if rt.scale_paths is not None:
        return (rt.scale_paths.get("specReplicasPath", ".spec.replicas"),
                rt.scale_paths.get("statusReplicasPath", ".status.replicas"), rt.scale_paths.get("labelSelectorPath"))
    return ".spec.replicas", ".status.replicas", None


def _read(obj: dict[str, Any], path: str | None) -> Any:
    node: Any = obj
    for key in (path or "").strip(".").split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _write(obj: dict[str, Any], path: str, value: Any) -> None:
    keys = path.strip(".").split(".")
    node = obj
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def to_scale(rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
    spec_path, status_path, selector_path = _paths(rt)
    if selector_path:
        selector = _read(obj, selector_path) or ""
    else:
        match = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        selector = ",".join(f"{k}={v}" for k, v in sorted(match.items()))
    meta = obj["metadata"]
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                         if k in meta},
            "spec": {"replicas": _read(obj, spec_path) or 0},
            "status": {"replicas": _read(obj, status_path) or 0, "selector": selector}}


async def handle(request: web.Request, store: Store, rt: ResourceType, namespace: str | None, name: str,
                 dry_run: bool) -> dict[str, Any]:
    if request.method == "GET":
        return to_scale(rt, store.get(rt, namespace, name))
    if request.method not in ("PUT", "PATCH"):
        raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported on scale")
    body = json.loads(await request.read() or b"{}")

    def mutate(obj: dict[str, Any]) -> dict[str, Any]:
        current = to_scale(rt, obj)
        wanted = merge_patch(current, body) if request.method == "PATCH" else body
        replicas = (wanted.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise ApiError.invalid("Scale", name, [("spec.replicas", f"Invalid value: {replicas!r}: must be "
                                                    "greater than or equal to 0")], "autoscaling")
        _write(obj, _paths(rt)[0], replicas)
        obj["metadata"]["resourceVersion"] = (wanted.get("metadata") or {}).get("resourceVersion")
        return obj

    return to_scale(rt, store.update(rt, namespace, name, mutate, dry_run=dry_run))
