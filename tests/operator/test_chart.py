"""charts/kubeinfer: helm lint and helm template (helm-python-sdk: Helm's Go SDK, offline), the
rendered objects pass kubernetes-validate, and RBAC grants exactly what the operator uses."""
from __future__ import annotations

import pytest
import yaml

from kubeinfer.operator.apply import RESOURCES
from kubeinfer.operator.handlers import CHILDREN
from kubeinfer.operator.reconcile import CHILD_KINDS
from tests.operator.helpers import ROOT

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (pip) renders and lints charts offline")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
CHART = ROOT / "charts" / "kubeinfer"


@pytest.fixture(scope="module", autouse=True)
def quiet_helm():
    helm.disable_logging()


def template(values: dict | None = None, namespace: str = "kubeinfer-system") -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name="kubeinfer", namespace=namespace)
    return [d for name, text in sorted(rendered.items()) if not name.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]


def test_helm_lint_is_clean():
    report = helm.lint(str(CHART), strict=True, kube_version="v1.33.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_chart_ships_the_crd_unchanged():
    with helm.Chart.load(CHART) as chart:
        crds = chart.crds
    assert len(crds) == 1
    assert yaml.safe_load(crds[0]["data"]) == yaml.safe_load((ROOT / "crds" / "inferenceservice.yaml").read_text())


def test_default_install():
    docs = template()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
    for d in docs:
        kubernetes_validate.validate(d, "1.33.0", strict=True)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["kubeinfer"] and c["args"] == ["operator"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["KUBEINFER_WATCH_NAMESPACES"] == ""
    assert env["KUBEINFER_ENGINE_IMAGE"] == c["image"] == "ghcr.io/kubeinfer/kubeinfer:0.1.0"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["allowPrivilegeEscalation"] is False
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": "kubeinfer-system"}]


def test_watched_namespaces_get_roles_not_a_cluster_role():
    docs = template({"watchNamespaces": ["team-a", "team-b"], "engine": {"image": "reg/engine:9"},
                     "image": {"tag": "1.2.3"}, "resyncSeconds": 30})
    kinds = sorted((d["kind"], d["metadata"].get("namespace")) for d in docs)
    assert ("ClusterRole", None) not in kinds
    assert [k for k in kinds if k[0] in ("Role", "RoleBinding")] == [
        ("Role", "team-a"), ("Role", "team-b"), ("RoleBinding", "team-a"), ("RoleBinding", "team-b")]
    for d in docs:
        kubernetes_validate.validate(d, "1.33.0", strict=True)
    c = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["KUBEINFER_WATCH_NAMESPACES"] == "team-a,team-b"
    assert env["KUBEINFER_ENGINE_IMAGE"] == "reg/engine:9" and c["image"] == "ghcr.io/kubeinfer/kubeinfer:1.2.3"
    assert env["KUBEINFER_RESYNC_SECONDS"] == "30"


def _grants(rules: list[dict]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_rbac_is_least_privilege():
    role = next(d for d in template() if d["kind"] == "ClusterRole")
    grants = _grants(role["rules"])
    assert not any("*" in verbs for verbs in grants.values())
    writes = {"get", "list", "create", "update", "delete"}
    watched = {(g, p) for g, _, p in CHILDREN}
    for kind in (*CHILD_KINDS, "LeaderWorkerSet"):   # apply.py: list, get, create, update (PUT), delete
        prefix, plural = RESOURCES[kind]
        group = "" if prefix == "/api/v1" else prefix.split("/")[2]
        want = writes | ({"watch"} if (group, plural) in watched else set())
        assert grants[(group, plural)] == want, (kind, grants[(group, plural)])
    assert grants[("", "pods")] == {"list", "watch"}   # handlers.STATUS_SOURCES: status follows pod events
    assert grants[("kubeinfer.io", "inferenceservices")] == {"get", "list", "watch", "patch"}
    assert grants[("kubeinfer.io", "inferenceservices/status")] == {"patch"}
    assert grants[("kubeinfer.io", "inferenceservices/finalizers")] == {"update"}
    assert grants[("", "events")] == {"create"}
    assert len(grants) == 10
