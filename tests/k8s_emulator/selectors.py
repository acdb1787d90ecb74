"""Label and field selectors, parsed the way the API server parses them.

Label selectors: `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`, comma-separated (AND).
Field selectors: `path=value`, `path==value`, `path!=value` over dotted paths (metadata.name, status.phase).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .errors import ApiError

Matcher = Callable[[dict[str, Any]], bool]

_SET_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside `( ... )`."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> Matcher:
    if not text:
        return lambda labels: True
    requirements: list[Matcher] = []
    for part in _split_top_level(text):
        requirements.append(_parse_label_requirement(part))
    return lambda labels: all(req(labels) for req in requirements)


def _parse_label_requirement(part: str) -> Matcher:
    for op in ("!=", "==", "="):
        if op in part:
            key, value = (s.strip() for s in part.split(op, 1))
            if op == "!=":
                return lambda labels, k=key, v=value: labels.get(k) != v
            return lambda labels, k=key, v=value: labels.get(k) == v
    m = _SET_RE.match(part)
    if not m:
        raise ApiError.bad_request(f"unable to parse requirement: {part!r}")
    negated, key, op, values_text = m.groups()
    if op:
        values = {v.strip() for v in values_text.split(",") if v.strip()}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if negated:
        return lambda labels: key not in labels
    return lambda labels: key in labels


def selector_from_label_selector_object(selector: dict[str, Any] | None) -> Matcher:
    """A `metav1.LabelSelector` object ({matchLabels, matchExpressions}) as a matcher over labels.

    An empty or absent selector matches everything, as in a PodDisruptionBudget.
    """
    selector = selector or {}
    match_labels = selector.get("matchLabels") or {}
    expressions = selector.get("matchExpressions") or []

    def matches(labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in match_labels.items()):
            return False
        for expr in expressions:
            key, op, values = expr["key"], expr["operator"], set(expr.get("values") or [])
            if op == "In" and labels.get(key) not in values:
                return False
            if op == "NotIn" and key in labels and labels[key] in values:
                return False
            if op == "Exists" and key not in labels:
                return False
            if op == "DoesNotExist" and key in labels:
                return False
        return True

    return matches


def parse_field_selector(text: str | None) -> Matcher:
    if not text:
        return lambda obj: True
    requirements: list[Matcher] = []
    for part in _split_top_level(text):
        for op in ("!=", "==", "="):
            if op in part:
                path, value = (s.strip() for s in part.split(op, 1))
                negate = op == "!="
                requirements.append(
                    lambda obj, p=path, v=value, n=negate: (_field_value(obj, p) == v) != n)
                break
        else:
            raise ApiError.bad_request(f"invalid field selector: {part!r}")
    return lambda obj: all(req(obj) for req in requirements)


def _field_value(obj: dict[str, Any], path: str) -> str:
    node: Any = obj
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def object_matcher(label_selector: str | None, field_selector: str | None) -> Matcher:
    labels_match = parse_label_selector(label_selector)
    fields_match = parse_field_selector(field_selector)
    return lambda obj: labels_match(obj.get("metadata", {}).get("labels") or {}) and fields_match(obj)
