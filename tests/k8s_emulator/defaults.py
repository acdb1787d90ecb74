"""Defaults the API server fills in on built-in types.

An operator that compares what it rendered with what it reads back sees these fields, exactly as on a
real cluster, so a naive comparison shows up here as an endless update loop rather than in production.
"""
from __future__ import annotations

import base64
import ipaddress
import itertools
from typing import Any

_PROBE_DEFAULTS = {"timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3}
_service_ips = (str(ipaddress.IPv4Address("10.96.0.10") + i) for i in itertools.count())


def _default_container(container: dict[str, Any]) -> None:
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    image = container.get("image", "")
    tag = image.rsplit("/", 1)[-1]
    pull = "Always" if (":" not in tag or tag.endswith(":latest")) and "@" not in image else "IfNotPresent"
    container.setdefault("imagePullPolicy", pull)
    container.setdefault("resources", {})
    for port in container.get("ports") or []:
        port.setdefault("protocol", "TCP")
    for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = container.get(probe_name)
        if not isinstance(probe, dict):
            continue
        for key, value in _PROBE_DEFAULTS.items():
            probe.setdefault(key, value)
        if isinstance(probe.get("httpGet"), dict):
            probe["httpGet"].setdefault("scheme", "HTTP")
    for env in container.get("env") or []:
        field_ref = (env.get("valueFrom") or {}).get("fieldRef")
        if isinstance(field_ref, dict):
            field_ref.setdefault("apiVersion", "v1")


def default_pod_spec(spec: dict[str, Any]) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    spec.setdefault("enableServiceLinks", True)
    for container in itertools.chain(spec.get("initContainers") or [], spec.get("containers") or []):
        if isinstance(container, dict):
            _default_container(container)


def _default_template(workload: dict[str, Any]) -> None:
    template = workload.setdefault("spec", {}).setdefault("template", {})
    template.setdefault("metadata", {})
    default_pod_spec(template.setdefault("spec", {}))


def apply_builtin_defaults(kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
    spec = obj.get("spec")
    if kind == "Pod" and isinstance(spec, dict):
        default_pod_spec(spec)
    elif kind == "Deployment":
        spec = obj.setdefault("spec", {})
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        strategy = spec.setdefault("strategy", {})
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            rolling = strategy.setdefault("rollingUpdate", {})
            rolling.setdefault("maxSurge", "25%")
            rolling.setdefault("maxUnavailable", "25%")
        _default_template(obj)
    elif kind == "ReplicaSet":
        obj.setdefault("spec", {}).setdefault("replicas", 1)
        _default_template(obj)
    elif kind == "StatefulSet":
        spec = obj.setdefault("spec", {})
        spec.setdefault("replicas", 1)
        spec.setdefault("podManagementPolicy", "OrderedReady")
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("updateStrategy", {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}})
        _default_template(obj)
    elif kind == "Service":
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        old_ip = ((old or {}).get("spec") or {}).get("clusterIP")
        if not spec.get("clusterIP"):
            spec["clusterIP"] = old_ip or next(_service_ips)
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        if spec["clusterIP"] != "None":
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
    elif kind == "Secret":
        # stringData is write-only: the server folds it into data (base64) and never returns it
        string_data = obj.pop("stringData", None) or {}
        data = obj.setdefault("data", {}) if string_data or obj.get("data") is not None else None
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        obj.setdefault("type", "Opaque")
    elif kind == "Namespace":
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj.setdefault("metadata", {}).setdefault("labels", {})["kubernetes.io/metadata.name"] = \
            obj["metadata"].get("name", "")
