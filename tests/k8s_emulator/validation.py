"""The API server's validation of built-in objects, for the mistakes an operator can make: bad names
and label values, a Deployment selector that does not match its template or changes, a container with no
image, a PodDisruptionBudget with both minAvailable and maxUnavailable, malformed ownerReferences.
"""
from __future__ import annotations

import re
from typing import Any

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")

# kinds whose names must be DNS labels (63 chars) or RFC 1035 labels, not just subdomains
_LABEL_NAMED = {"Namespace"}
_RFC1035_NAMED = {"Service"}
_SELECTOR_KINDS = {"Deployment", "ReplicaSet", "StatefulSet"}

Causes = list[tuple[str, str]]


def validate_name(kind: str, name: str) -> Causes:
    if kind in _RFC1035_NAMED:
        ok, limit, what = bool(_DNS_1035.match(name)) and len(name) <= 63, 63, "a DNS-1035 label"
    elif kind in _LABEL_NAMED:
        ok, limit, what = bool(_DNS_LABEL.match(name)) and len(name) <= 63, 63, "a lowercase RFC 1123 label"
    else:
        ok, limit, what = bool(_DNS_SUBDOMAIN.match(name)) and len(name) <= 253, 253, \
            "a lowercase RFC 1123 subdomain"
    if ok:
        return []
    return [("metadata.name", f'Invalid value: "{name}": a {what} must consist of lower case alphanumeric '
             f"characters or '-', and must start and end with an alphanumeric character "
             f"(at most {limit} characters)")]


def validate_labels(labels: Any, field: str) -> Causes:
    causes: Causes = []
    if not isinstance(labels, dict):
        return [(field, "Invalid value: must be a map of strings")]
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (not _LABEL_NAME.match(name) or len(name) > 63
                or (prefix and (not _DNS_SUBDOMAIN.match(prefix) or len(prefix) > 253))):
            causes.append((field, f'Invalid value: "{key}": name part must be no more than 63 characters and '
                           "consist of alphanumeric characters, '-', '_' or '.'"))
        if not isinstance(value, str):
            causes.append((f"{field}.{key}", f"Invalid value: {value!r}: label values must be strings"))
        elif value and (len(value) > 63 or not _LABEL_NAME.match(value)):
            causes.append((f"{field}", f'Invalid value: "{value}": a valid label must be an empty string or '
                           "consist of alphanumeric characters, '-', '_' or '.', and must start and end with "
                           "an alphanumeric character (at most 63 characters)"))
    return causes


def validate_metadata(kind: str, meta: dict[str, Any], namespace: str | None) -> Causes:
    causes = validate_name(kind, meta.get("name", ""))
    causes += validate_labels(meta.get("labels") or {}, "metadata.labels")
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for key in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(key):
                causes.append((f"metadata.ownerReferences[{i}].{key}", "Required value"))
    if sum(1 for ref in meta.get("ownerReferences") or [] if ref.get("controller")) > 1:
        causes.append(("metadata.ownerReferences", "Invalid value: Only one reference can have Controller set "
                       "to true"))
    return causes


def _validate_pod_spec(spec: Any, field: str) -> Causes:
    if not isinstance(spec, dict):
        return [(field, "Required value")]
    containers = spec.get("containers") or []
    if not containers:
        return [(f"{field}.containers", "Required value")]
    causes: Causes = []
    names = set()
    for i, container in enumerate(containers):
        where = f"{field}.containers[{i}]"
        name = container.get("name", "")
        if not name:
            causes.append((f"{where}.name", "Required value"))
        elif not _DNS_LABEL.match(name):
            causes.append((f"{where}.name", f'Invalid value: "{name}": a lowercase RFC 1123 label must '
                           "consist of lower case alphanumeric characters or '-'"))
        elif name in names:
            causes.append((f"{where}.name", f'Duplicate value: "{name}"'))
        names.add(name)
        if not container.get("image"):
            causes.append((f"{where}.image", "Required value"))
        for j, port in enumerate(container.get("ports") or []):
            if not 0 < int(port.get("containerPort", 0)) < 65536:
                causes.append((f"{where}.ports[{j}].containerPort",
                               f"Invalid value: {port.get('containerPort')}: must be between 1 and 65535"))
    return causes


def _matches(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match_labels.items())


def validate_builtin(kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> Causes:
    spec = obj.get("spec") or {}
    causes: Causes = []
    if kind == "Pod":
        causes += _validate_pod_spec(spec, "spec")
    elif kind in _SELECTOR_KINDS:
        selector = spec.get("selector")
        template = spec.get("template") or {}
        if not selector:
            causes.append(("spec.selector", "Required value"))
        else:
            labels = (template.get("metadata") or {}).get("labels") or {}
            if not _matches(selector.get("matchLabels") or {}, labels):
                causes.append(("spec.template.metadata.labels", f"Invalid value: {labels!r}: `selector` does "
                               "not match template `labels`"))
        if old is not None and selector != (old.get("spec") or {}).get("selector"):
            causes.append(("spec.selector", f"Invalid value: {selector!r}: field is immutable"))
        if int(spec.get("replicas", 0)) < 0:
            causes.append(("spec.replicas", f"Invalid value: {spec['replicas']}: must be greater than or "
                           "equal to 0"))
        causes += validate_labels((template.get("metadata") or {}).get("labels") or {},
                                  "spec.template.metadata.labels")
        causes += _validate_pod_spec(template.get("spec"), "spec.template.spec")
    elif kind == "Service":
        ports = spec.get("ports") or []
        for i, port in enumerate(ports):
            if not 0 < int(port.get("port", 0)) < 65536:
                causes.append((f"spec.ports[{i}].port", f"Invalid value: {port.get('port')}: must be between 1 "
                               "and 65535"))
            if len(ports) > 1 and not port.get("name"):
                causes.append((f"spec.ports[{i}].name", "Required value"))
        old_ip = ((old or {}).get("spec") or {}).get("clusterIP")
        if old_ip and spec.get("clusterIP") not in (None, "", old_ip):
            causes.append(("spec.clusterIP", f'Invalid value: "{spec.get("clusterIP")}": field is immutable'))
    elif kind == "PodDisruptionBudget":
        if "minAvailable" in spec and "maxUnavailable" in spec:
            causes.append(("spec", "Invalid value: minAvailable and maxUnavailable cannot be both set"))
    return causes
