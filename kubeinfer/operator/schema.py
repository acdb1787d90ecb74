"""Validate an InferenceService against the CRD's openAPIV3Schema, as the API server would.

`kubeinfer render` runs this before the operator's own rules, so a user sees every problem without a
cluster: schema violations (type, enum, minimum, pattern), unknown fields (the API server would
silently prune them) and then spec.py's rules. Defaults from the schema are applied first.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from kubeinfer.operator.spec import VERSION, Problem

CRD_ENV = "KUBEINFER_CRD"
_CANDIDATES = (Path(__file__).resolve().parents[2] / "crds" / "inferenceservice.yaml",
               Path("/usr/share/kubeinfer/crds/inferenceservice.yaml"))


def crd_path() -> Path | None:
    """$KUBEINFER_CRD, the repository's crds/, or where the image installs it."""
    if os.environ.get(CRD_ENV):
        return Path(os.environ[CRD_ENV])
    return next((p for p in _CANDIDATES if p.is_file()), None)


def load_schema(path: Path | None = None) -> dict:
    path = path or crd_path()
    if path is None:
        raise FileNotFoundError(f"the InferenceService CRD was not found; set {CRD_ENV}")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == VERSION)
    return version["schema"]["openAPIV3Schema"]


def _drop_nulls(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_nulls(v) for v in obj]
    return obj


def apply_defaults(schema: dict, obj: Any) -> Any:
    """Fill in `default`s the way the API server does (structural defaulting), recursively."""
    obj = copy.deepcopy(_drop_nulls(obj))

    def walk(node: dict, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in (node.get("properties") or {}).items():
                if key not in value and "default" in sub:
                    value[key] = copy.deepcopy(sub["default"])
                if key in value:
                    walk(sub, value[key])
            extra = node.get("additionalProperties")
            if isinstance(extra, dict):
                for key in value:
                    if key not in (node.get("properties") or {}):
                        walk(extra, value[key])
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            for item in value:
                walk(node["items"], item)

    walk(schema, obj)
    return obj


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(root)"


def _allowed(error) -> str:
    s, v = error.schema, error.validator
    if v == "enum":
        return "allowed: " + ", ".join(map(str, s["enum"]))
    if v in ("minimum", "maximum"):
        return f"must be {'>=' if v == 'minimum' else '<='} {s[v]}"
    if v == "pattern":
        return "allowed: " + " ".join((s.get("description") or f"a match of {s['pattern']}").split())
    if v == "type":
        return f"must be of type {s['type']}"
    if v in ("minLength", "maxLength"):
        return f"length must be {'>=' if v == 'minLength' else '<='} {s[v]}"
    return error.message


def _unknown_fields(node: dict, value: Any, path: list) -> list[Problem]:
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(value, dict) and "properties" in node:
        props = node["properties"]
        for key, sub in value.items():
            if key not in props:
                out.append(Problem(_path(path + [key]), sub,
                                   "unknown field; allowed fields here: " + ", ".join(props)))
            elif key != "metadata":
                out += _unknown_fields(props[key], sub, path + [key])
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            out += _unknown_fields(node["items"], item, path + [i])
    return out


def validate(obj: dict, schema: dict | None = None) -> tuple[dict, list[Problem]]:
    """(the object with defaults applied, every problem the schema finds)."""
    import jsonschema

    schema = schema if schema is not None else load_schema()
    defaulted = apply_defaults(schema, obj)
    validator = jsonschema.Draft4Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(defaulted), key=lambda e: list(map(str, e.absolute_path))):
        if error.validator == "required":
            missing = error.message.split("'")[1] if "'" in error.message else "?"
            problems.append(Problem(_path(list(error.absolute_path) + [missing]), None, "is required"))
        else:
            problems.append(Problem(_path(error.absolute_path), error.instance, _allowed(error)))
    problems += _unknown_fields(schema, defaulted, [])
    return defaulted, problems
