"""The PATCH flavours: JSON merge patch, JSON patch, strategic merge patch and server-side apply.

Merge patch (RFC 7386) and JSON patch (RFC 6902) are exact. The other two are approximations, good
enough for an operator's and kubectl's ordinary use; where they differ from the real server it is said
below.
"""
from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from .errors import ApiError

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY_YAML = "application/apply-patch+yaml"
APPLY_JSON = "application/apply-patch+json"
KNOWN_PATCH_TYPES = (MERGE, JSON_PATCH, STRATEGIC, APPLY_YAML, APPLY_JSON)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, `null` deletes a key, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902. A failed `test` op is 422 Invalid, as the API server answers (kopf relies on it)."""
    if not isinstance(ops, list):
        raise ApiError.bad_request("a JSON patch must be a list of operations")
    try:
        return jsonpatch.apply_patch(target, ops, in_place=False)
    except jsonpatch.JsonPatchTestFailed as e:
        raise ApiError.unprocessable(f"the server rejected our request due to an error in our request: {e}")
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:  # type: ignore[attr-defined]
        raise ApiError.unprocessable(f"the server rejected our request due to an error in our request: {e}")


# Lists of built-in types that merge by a key rather than being replaced (patchMergeKey in the API types).
# The real server knows these per type and field; keyed by field name alone they are right for the
# fields an operator writes (pod templates, services, metadata).
_MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",), "initContainers": ("name",), "ephemeralContainers": ("name",),
    "env": ("name",), "volumes": ("name",), "volumeMounts": ("mountPath",), "volumeDevices": ("devicePath",),
    "imagePullSecrets": ("name",), "conditions": ("type",), "ownerReferences": ("uid",),
    "ports": ("containerPort", "port"), "hostAliases": ("ip",), "topologySpreadConstraints": ("topologyKey",),
}
_PRIMITIVE_SET_LISTS = ("finalizers",)


def _merge_key(field: str, items: list[Any]) -> str | None:
    candidates = _MERGE_KEYS.get(field)
    if not candidates or not all(isinstance(i, dict) for i in items):
        return None
    for key in candidates:
        if all(key in i for i in items):
            return key
    return candidates[0]


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A strategic merge patch over built-in types.

    Supported: merge by key for the lists in `_MERGE_KEYS`, union for `finalizers`, `$patch: replace`
    and `$patch: delete`, `$deleteFromPrimitiveList/FIELD`. `$setElementOrder` and `$retainKeys` are
    accepted and ignored (element order then follows the live object, new elements last).
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field, []) if v not in value]
        elif key.startswith("$"):
            continue
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _strategic_list(key, result[key], value)
        elif isinstance(value, list):
            result[key] = [_strip_directives(v) for v in value if not (isinstance(v, dict) and v.get("$patch"))]
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _strategic_list(field: str, live: list[Any], patch: list[Any]) -> list[Any]:
    if field in _PRIMITIVE_SET_LISTS:
        return live + [v for v in patch if v not in live]
    key = _merge_key(field, live + [p for p in patch if not (isinstance(p, dict) and "$patch" in p and len(p) == 1)])
    if key is None:
        return [_strip_directives(v) for v in patch]
    result = copy.deepcopy(live)
    for item in patch:
        if not isinstance(item, dict):
            continue
        index = next((i for i, e in enumerate(result) if e.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if index is not None:
                result.pop(index)
        elif index is None:
            result.append(_strip_directives(item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def server_side_apply(live: dict[str, Any], previous: dict[str, Any], applied: dict[str, Any]) -> dict[str, Any]:
    """Server-side apply by one field manager, approximated without managedFields.

    `previous` is what this manager applied last time. Fields it set then and leaves out now are
    removed; fields it sets now are merged in (associative lists by their merge key); fields set only
    by others stay. Approximation: conflicts with other managers are never reported (as if every apply
    had force=true), and a field both managers set is removed when this manager drops it.
    """
    result = copy.deepcopy(live)
    for key in previous:
        if key not in applied and key in result and key not in ("apiVersion", "kind"):
            del result[key]
    for key, value in applied.items():
        before = previous.get(key)
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = server_side_apply(result[key], before if isinstance(before, dict) else {}, value)
        elif isinstance(value, list) and isinstance(result.get(key), list) and _merge_key(key, value + result[key]):
            result[key] = _apply_list(key, result[key], before if isinstance(before, list) else [], value)
        elif value is not None:
            result[key] = copy.deepcopy(value)
    return result


def _apply_list(field: str, live: list[Any], previous: list[Any], applied: list[Any]) -> list[Any]:
    key = _merge_key(field, live + applied) or "name"
    applied_by_key = {item.get(key): item for item in applied}
    previous_by_key = {item.get(key): item for item in previous if isinstance(item, dict)}
    result = []
    for item in live:
        k = item.get(key)
        if k in applied_by_key:
            result.append(server_side_apply(item, previous_by_key.get(k, {}), applied_by_key.pop(k)))
        elif k not in previous_by_key:
            result.append(item)
    result.extend(copy.deepcopy(list(applied_by_key.values())))
    return result
