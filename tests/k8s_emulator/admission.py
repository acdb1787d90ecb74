"""What the API server does to an object between the request and storage: system metadata, status
subresource rules, defaults, schema pruning and validation, generation.
"""
from __future__ import annotations

import copy
import datetime
import uuid
from typing import Any

from . import schema as crd_schema
from .defaults import apply_builtin_defaults
from .errors import ApiError
from .resources import ResourceType
from .validation import validate_builtin, validate_metadata

_SYSTEM_META = ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                "generation", "selfLink", "managedFields")
CRD_CLEANUP_FINALIZER = "customresourcecleanup.apiextensions.k8s.io"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _body_without(obj: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in keys}


def check_type(rt: ResourceType, obj: Any) -> None:
    if not isinstance(obj, dict):
        raise ApiError.bad_request("the body of the request must be a JSON object")
    if obj.get("apiVersion") not in (None, rt.api_version) or obj.get("kind") not in (None, rt.kind):
        raise ApiError.bad_request(
            f"the API version in the data ({obj.get('apiVersion')}) does not match the expected API version "
            f"({rt.api_version}), or the kind ({obj.get('kind')}) is not {rt.kind}")


def _finish(rt: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults, pruning and validation, shared by create and update."""
    if rt.is_custom:
        obj, causes = crd_schema.admit(obj, rt.schema)
    else:
        apply_builtin_defaults(rt.kind, obj, old)
        causes = validate_builtin(rt.kind, obj, old)
    meta = obj["metadata"]
    causes = validate_metadata(rt.kind, meta, meta.get("namespace")) + causes
    if rt.kind == "CustomResourceDefinition":
        causes += _validate_crd(obj)
    if causes:
        raise ApiError.invalid(rt.kind, meta.get("name", ""), causes, rt.group)
    return obj


def _validate_crd(crd: dict[str, Any]) -> list[tuple[str, str]]:
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    causes = []
    for key in ("group", "names", "versions"):
        if not spec.get(key):
            causes.append((f"spec.{key}", "Required value"))
    if names and f"{names.get('plural')}.{spec.get('group')}" != crd["metadata"].get("name"):
        causes.append(("metadata.name", f'Invalid value: "{crd["metadata"].get("name")}": must be '
                       "spec.names.plural+\".\"+spec.group"))
    if sum(1 for v in spec.get("versions") or [] if v.get("storage")) != 1:
        causes.append(("spec.versions", "Invalid value: must have exactly one version marked as storage version"))
    return causes


def prepare_create(rt: ResourceType, namespace: str | None, body: Any) -> dict[str, Any]:
    """A new object as it will be stored (its name already settled by the caller)."""
    check_type(rt, body)
    obj = copy.deepcopy(body)
    obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
    meta = obj.setdefault("metadata", {})
    for key in _SYSTEM_META:
        meta.pop(key, None)
    if rt.namespaced:
        if meta.get("namespace") not in (None, "", namespace):
            raise ApiError.bad_request("the namespace of the provided object does not match the namespace sent "
                                       "on the request")
        meta["namespace"] = namespace
    else:
        meta.pop("namespace", None)
    meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
    if "status" in rt.subresources:
        obj.pop("status", None)
    if rt.kind == "Namespace":
        obj["status"] = {"phase": "Active"}
    if rt.kind == "CustomResourceDefinition":
        meta.setdefault("finalizers", [])
        if CRD_CLEANUP_FINALIZER not in meta["finalizers"]:
            meta["finalizers"].append(CRD_CLEANUP_FINALIZER)
        names = obj.get("spec", {}).get("names", {})
        obj["status"] = {"acceptedNames": names, "storedVersions": [
            v["name"] for v in obj.get("spec", {}).get("versions", []) if v.get("storage")],
            "conditions": [{"type": t, "status": "True", "reason": r, "lastTransitionTime": now(), "message": m}
                           for t, r, m in (("NamesAccepted", "NoConflicts", "no conflicts found"),
                                           ("Established", "InitialNamesAccepted", "the initial names have "
                                            "been accepted"))]}
    return _finish(rt, obj, None)


def prepare_update(rt: ResourceType, old: dict[str, Any], new: Any, subresource: str | None) -> dict[str, Any]:
    """The stored object after an update of the main resource or of its status subresource."""
    check_type(rt, new)
    meta_name = (new.get("metadata") or {}).get("name")
    if meta_name not in (None, old["metadata"]["name"]):
        raise ApiError.bad_request(f'the name of the object ({meta_name}) does not match the name on the URL '
                                   f'({old["metadata"]["name"]})')
    if subresource == "status":
        result = copy.deepcopy(old)
        if "status" in new:
            result["status"] = copy.deepcopy(new["status"])
        else:
            result.pop("status", None)
    else:
        result = copy.deepcopy(new)
        result["apiVersion"], result["kind"] = rt.api_version, rt.kind
        if "status" in rt.subresources:
            result.pop("status", None)
            if "status" in old:
                result["status"] = copy.deepcopy(old["status"])
    meta = result.setdefault("metadata", {})
    old_meta = old["metadata"]
    for key in _SYSTEM_META + ("name", "namespace"):
        meta.pop(key, None)
        if key in old_meta:
            meta[key] = copy.deepcopy(old_meta[key])
    if old_meta.get("deletionTimestamp"):
        added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
        if added:
            raise ApiError.invalid(rt.kind, old_meta["name"], [
                ("metadata.finalizers", f"Forbidden: no new finalizers can be added if the object is being "
                 f"deleted, found new finalizers {sorted(added)!r}")], rt.group)
    result = _finish(rt, result, old)
    ignored = ("metadata", "status") if ("status" in rt.subresources or not rt.is_custom) else ("metadata",)
    if _body_without(result, *ignored) != _body_without(old, *ignored):
        meta["generation"] = int(old_meta.get("generation", 1)) + 1
    return result
