"""The resource types the emulator serves, and the discovery documents kopf and clients read.

Built-in types are a fixed table; a CustomResourceDefinition adds its served versions when it is
created and removes them when it is deleted, as the real apiextensions server does.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclasses.dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    subresources: frozenset[str] = frozenset()
    categories: tuple[str, ...] = ()
    # for custom resources: {"status": {...openAPIV3Schema...}} etc., the schema of this version
    schema: dict[str, Any] | None = dataclasses.field(default=None, compare=False, hash=False)
    scale_paths: dict[str, str] | None = dataclasses.field(default=None, compare=False, hash=False)
    is_custom: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_key(self) -> tuple[str, str]:
        """Objects are stored once per group and plural, whatever version they were written in."""
        return (self.group, self.plural)

    def discovery_entries(self) -> list[dict[str, Any]]:
        main = {
            "name": self.plural,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(ALL_VERBS),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        entries = [main]
        for sub in sorted(self.subresources):
            kind = {"scale": "Scale"}.get(sub, self.kind)
            group_version = {"group": "autoscaling", "version": "v1"} if sub == "scale" else {}
            verbs = ["get"] if sub == "log" else ["get", "patch", "update"]
            entries.append({"name": f"{self.plural}/{sub}", "singularName": "", "namespaced": self.namespaced,
                            "kind": kind, "verbs": verbs, **group_version})
        return entries


def _t(group: str, version: str, plural: str, kind: str, namespaced: bool = True, short: tuple[str, ...] = (),
       subs: tuple[str, ...] = ()) -> ResourceType:
    return ResourceType(group, version, plural, kind, namespaced, singular=kind.lower(), short_names=short,
                        subresources=frozenset(subs))


BUILTIN_TYPES: tuple[ResourceType, ...] = (
    _t("", "v1", "namespaces", "Namespace", namespaced=False, short=("ns",), subs=("status", "finalize")),
    _t("", "v1", "nodes", "Node", namespaced=False, short=("no",), subs=("status",)),
    _t("", "v1", "pods", "Pod", short=("po",), subs=("status", "log", "proxy")),
    _t("", "v1", "services", "Service", short=("svc",), subs=("status", "proxy")),
    _t("", "v1", "endpoints", "Endpoints", short=("ep",)),
    _t("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
    _t("", "v1", "events", "Event", short=("ev",)),
    _t("", "v1", "secrets", "Secret"),
    _t("", "v1", "configmaps", "ConfigMap", short=("cm",)),
    _t("", "v1", "serviceaccounts", "ServiceAccount", short=("sa",)),
    _t("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short=("pvc",), subs=("status",)),
    _t("apps", "v1", "deployments", "Deployment", short=("deploy",), subs=("status", "scale")),
    _t("apps", "v1", "replicasets", "ReplicaSet", short=("rs",), subs=("status", "scale")),
    _t("apps", "v1", "statefulsets", "StatefulSet", short=("sts",), subs=("status", "scale")),
    _t("batch", "v1", "jobs", "Job", subs=("status",)),
    _t("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", short=("pdb",), subs=("status",)),
    _t("events.k8s.io", "v1", "events", "Event", short=("ev",)),
    _t("coordination.k8s.io", "v1", "leases", "Lease"),
    _t("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", short=("hpa",), subs=("status",)),
    _t("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    _t("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    _t("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    _t("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", namespaced=False),
    _t("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", namespaced=False,
       short=("crd", "crds"), subs=("status",)),
)


def types_from_crd(crd: dict[str, Any]) -> list[ResourceType]:
    """The resource types one CRD serves: one per served version."""
    spec = crd.get("spec", {})
    names = spec.get("names", {})
    result = []
    for version in spec.get("versions", []):
        if not version.get("served", True):
            continue
        subresources = version.get("subresources") or {}
        scale = subresources.get("scale")
        result.append(ResourceType(
            group=spec["group"], version=version["name"], plural=names["plural"], kind=names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            singular=names.get("singular") or names["kind"].lower(),
            short_names=tuple(names.get("shortNames") or ()), categories=tuple(names.get("categories") or ()),
            subresources=frozenset(k for k in ("status", "scale") if k in subresources),
            schema=(version.get("schema") or {}).get("openAPIV3Schema"),
            scale_paths=scale, is_custom=True,
        ))
    return result


class Registry:
    """Which (group, version, plural) the server answers, and the discovery documents for them."""

    def __init__(self) -> None:
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        self._crd_types: dict[str, list[ResourceType]] = {}  # CRD name -> its types
        for rt in BUILTIN_TYPES:
            self._types[(rt.group, rt.version, rt.plural)] = rt

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._types.get((group, version, plural))

    def by_kind(self, api_version: str, kind: str) -> ResourceType | None:
        group, _, version = api_version.rpartition("/")
        for rt in self._types.values():
            if rt.group == group and rt.version == version and rt.kind == kind:
                return rt
        return None

    def all(self) -> list[ResourceType]:
        return list(self._types.values())

    def storage_types(self) -> dict[tuple[str, str], ResourceType]:
        """One type per stored group+plural (the first version found), to name objects in dumps."""
        result: dict[tuple[str, str], ResourceType] = {}
        for rt in self._types.values():
            result.setdefault(rt.storage_key, rt)
        return result

    def set_crd(self, crd: dict[str, Any]) -> None:
        self.remove_crd(crd["metadata"]["name"])
        types = types_from_crd(crd)
        for rt in types:
            self._types[(rt.group, rt.version, rt.plural)] = rt
        self._crd_types[crd["metadata"]["name"]] = types

    def remove_crd(self, name: str) -> list[ResourceType]:
        types = self._crd_types.pop(name, [])
        for rt in types:
            self._types.pop((rt.group, rt.version, rt.plural), None)
        return types

    # ---- discovery documents ----
    def group_versions(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for rt in self._types.values():
            versions = groups.setdefault(rt.group, [])
            if rt.version not in versions:
                versions.append(rt.version)
        return groups

    def api_versions_doc(self) -> dict[str, Any]:
        return {"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}

    def _group_doc(self, group: str, versions: list[str]) -> dict[str, Any]:
        ordered = sorted(versions, key=_version_priority)
        return {"name": group,
                "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in ordered],
                "preferredVersion": {"groupVersion": f"{group}/{ordered[0]}", "version": ordered[0]}}

    def api_group_list_doc(self) -> dict[str, Any]:
        groups = [self._group_doc(g, vs) for g, vs in sorted(self.group_versions().items()) if g]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def api_group_doc(self, group: str) -> dict[str, Any] | None:
        versions = self.group_versions().get(group)
        if not versions or not group:
            return None
        return {"kind": "APIGroup", "apiVersion": "v1", **self._group_doc(group, versions)}

    def resource_list_doc(self, group: str, version: str) -> dict[str, Any] | None:
        types = [rt for rt in self._types.values() if rt.group == group and rt.version == version]
        if not types:
            return None
        resources = [entry for rt in sorted(types, key=lambda t: t.plural) for entry in rt.discovery_entries()]
        group_version = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}


def _version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes' version order: GA before beta before alpha, higher numbers first."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not m:
        return (3, 0, 0)
    major, stage, minor = int(m.group(1)), m.group(2), int(m.group(3) or 0)
    return ({None: 0, "beta": 1, "alpha": 2}[stage], -major, -minor)
