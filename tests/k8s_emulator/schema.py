"""A custom resource's openAPIV3Schema applied as the apiextensions server applies it on every write:
prune unknown fields, fill in defaults, then validate.

Supported keywords: type, properties, additionalProperties, items, required, enum, nullable, minimum,
maximum, exclusiveMinimum/Maximum, minLength, maxLength, pattern, minItems, maxItems, format (ignored),
x-kubernetes-int-or-string, x-kubernetes-preserve-unknown-fields, x-kubernetes-embedded-resource,
allOf/anyOf/oneOf/not. Not supported: x-kubernetes-validations (CEL rules are not evaluated).
Error messages follow the API server's wording ("spec.replicas: Invalid value: -1: spec.replicas in
body should be greater than or equal to 0").
"""
from __future__ import annotations

import copy
import re
from typing import Any

_TOP_LEVEL = ("apiVersion", "kind", "metadata")


def prune(obj: Any, schema: dict[str, Any] | None, *, root: bool = False) -> Any:
    """Drop fields the schema does not declare, unless it preserves unknown fields there."""
    if schema is None:
        return obj
    if isinstance(obj, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties"):
            return obj
        props = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        result = {}
        for key, value in obj.items():
            if root and key in _TOP_LEVEL:
                result[key] = value
            elif key in props:
                result[key] = prune(value, props[key])
            elif isinstance(additional, dict):
                result[key] = prune(value, additional)
            elif additional is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                result[key] = value
            elif schema.get("x-kubernetes-embedded-resource") and key in _TOP_LEVEL:
                result[key] = value
        return result
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in obj]
    return obj


def apply_defaults(obj: Any, schema: dict[str, Any] | None) -> Any:
    if schema is None:
        return obj
    if isinstance(obj, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                obj[key] = apply_defaults(obj[key], sub)
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            for key in obj:
                if key not in (schema.get("properties") or {}):
                    obj[key] = apply_defaults(obj[key], additional)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in obj]
    return obj


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (dict, list)):
        return _type_name(value)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def validate(obj: Any, schema: dict[str, Any] | None, path: str = "") -> list[tuple[str, str]]:
    """All violations as (field path, message) pairs; empty when the object is valid."""
    if schema is None:
        return []
    errors: list[tuple[str, str]] = []
    where = path or "<root>"
    if obj is None:
        if schema.get("nullable") or not schema.get("type"):
            return []
        return [(where, f"Invalid value: \"null\": {where} in body must be of type {schema['type']}: \"null\"")]
    expected = schema.get("type")
    actual = _type_name(obj)
    if schema.get("x-kubernetes-int-or-string"):
        if actual not in ("integer", "string"):
            errors.append((where, f"Invalid value: {_show(obj)}: {where} in body must be of type integer or string"))
        return errors
    if expected and not (actual == expected or (expected == "number" and actual == "integer")):
        return [(where, f"Invalid value: \"{actual}\": {where} in body must be of type {expected}: \"{actual}\"")]

    if "enum" in schema and obj not in schema["enum"]:
        supported = ", ".join(_show(v) for v in schema["enum"])
        errors.append((where, f"Unsupported value: {_show(obj)}: supported values: {supported}"))
    if actual in ("integer", "number"):
        if "minimum" in schema:
            low = schema["minimum"]
            if obj < low or (schema.get("exclusiveMinimum") is True and obj == low):
                errors.append((where, f"Invalid value: {obj}: {where} in body should be greater than "
                               f"{'' if schema.get('exclusiveMinimum') is True else 'or equal to '}{low}"))
        if "maximum" in schema:
            high = schema["maximum"]
            if obj > high or (schema.get("exclusiveMaximum") is True and obj == high):
                errors.append((where, f"Invalid value: {obj}: {where} in body should be less than "
                               f"{'' if schema.get('exclusiveMaximum') is True else 'or equal to '}{high}"))
    if actual == "string":
        if "minLength" in schema and len(obj) < schema["minLength"]:
            errors.append((where, f"Invalid value: {_show(obj)}: {where} in body should be at least "
                           f"{schema['minLength']} chars long"))
        if "maxLength" in schema and len(obj) > schema["maxLength"]:
            errors.append((where, f"Too long: may not be longer than {schema['maxLength']}"))
        if "pattern" in schema and not re.search(schema["pattern"], obj):
            errors.append((where, f"Invalid value: {_show(obj)}: {where} in body should match "
                           f"'{schema['pattern']}'"))
    if actual == "array":
        if "minItems" in schema and len(obj) < schema["minItems"]:
            errors.append((where, f"Invalid value: {len(obj)}: {where} in body should have at least "
                           f"{schema['minItems']} items"))
        if "maxItems" in schema and len(obj) > schema["maxItems"]:
            errors.append((where, f"Too many: {len(obj)}: must have at most {schema['maxItems']} items"))
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(obj):
                errors += validate(item, schema["items"], f"{path}[{i}]")
    if actual == "object":
        props = schema.get("properties") or {}
        for key in schema.get("required") or []:
            if key not in obj:
                errors.append((f"{path}.{key}" if path else key, "Required value"))
        for key, value in obj.items():
            sub_path = f"{path}.{key}" if path else key
            if key in props:
                errors += validate(value, props[key], sub_path)
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validate(value, schema["additionalProperties"], sub_path)
    for sub in schema.get("allOf") or []:
        errors += validate(obj, sub, path)
    if schema.get("anyOf") and all(validate(obj, sub, path) for sub in schema["anyOf"]):
        errors.append((where, "Invalid value: must validate at least one schema (anyOf)"))
    if schema.get("oneOf") and sum(not validate(obj, sub, path) for sub in schema["oneOf"]) != 1:
        errors.append((where, "Invalid value: must validate one and only one schema (oneOf)"))
    if isinstance(schema.get("not"), dict) and not validate(obj, schema["not"], path):
        errors.append((where, "Invalid value: must not validate the schema (not)"))
    return errors


def admit(obj: dict[str, Any], schema: dict[str, Any] | None) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Prune, default and validate a whole custom object; the metadata is not checked against the schema."""
    if schema is None:
        return obj, []
    result = apply_defaults(prune(obj, schema, root=True), schema)
    body_schema = {k: v for k, v in schema.items() if k != "required"}
    body_schema["properties"] = {k: v for k, v in (schema.get("properties") or {}).items() if k not in _TOP_LEVEL}
    body_schema["required"] = [k for k in schema.get("required") or [] if k not in _TOP_LEVEL]
    without_meta = {k: v for k, v in result.items() if k not in _TOP_LEVEL}
    return result, validate(without_meta, body_schema)
