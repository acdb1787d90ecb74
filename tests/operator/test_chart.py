"""charts/kubeinfer: helm lint and helm template (helm-python-sdk: Helm's Go SDK, offline), the
rendered objects pass kubernetes-validate, and RBAC grants exactly what the operator uses."""
from __future__ import annotations

import pytest
import yaml

from kubeinfer.operator.apply import RESOURCES
from kubeinfer.operator.handlers import CHILDREN, LWS
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


def test_the_crd_is_a_kept_template_equal_to_crds():
    # a template, so `helm upgrade` upgrades it (crds/ is installed once, never upgraded); kept on
    # uninstall, so removing the chart never deletes every InferenceService
    with helm.Chart.load(CHART) as chart:
        assert chart.crds == []
    [crd] = [d for d in template() if d["kind"] == "CustomResourceDefinition"]
    source = yaml.safe_load((ROOT / "crds" / "inferenceservice.yaml").read_text())
    assert crd["spec"] == source["spec"] and crd["metadata"]["name"] == source["metadata"]["name"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    kubernetes_validate.validate(crd, "1.33.0", strict=True)
    assert not [d for d in template({"crds": {"install": False}}) if d["kind"] == "CustomResourceDefinition"]


def test_default_install():
    docs = template()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment", "Role",
                     "RoleBinding", "ServiceAccount"]
    for d in docs:
        kubernetes_validate.validate(d, "1.33.0", strict=True)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    # leader election on: several replicas and rolling updates are safe
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["kubeinfer"] and c["args"] == ["operator"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["KUBEINFER_WATCH_NAMESPACES"] == ""
    assert env["KUBEINFER_ENGINE_IMAGE"] == c["image"] == "ghcr.io/kubeinfer/kubeinfer:0.1.0"
    assert env["KUBEINFER_LEADER_ELECTION_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["KUBEINFER_METRICS_PORT"] == "8081" and env["KUBEINFER_SCRAPE_VIA"] == "pod-ip"
    assert c["ports"] == [{"name": "healthz", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 8081, "protocol": "TCP"}]
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8081"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["allowPrivilegeEscalation"] is False
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": "kubeinfer-system"}]
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["metadata"]["namespace"] == "kubeinfer-system"
    assert _grants(role["rules"]) == {("coordination.k8s.io", "leases"): {"get", "create", "update"}}


def test_ports_zero_render_no_port_and_no_probe():
    for values, names in (({"livenessPort": 0}, ["metrics"]), ({"metricsPort": 0}, ["healthz"]),
                          ({"livenessPort": 0, "metricsPort": 0}, [])):
        dep = next(d for d in template(values) if d["kind"] == "Deployment")
        kubernetes_validate.validate(dep, "1.33.0", strict=True)
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert [p["name"] for p in c.get("ports", [])] == names
        assert all(p["containerPort"] > 0 for p in c.get("ports", []))
        assert ("livenessProbe" in c) == ("healthz" in names)


def test_without_leader_election_one_replica_and_recreate():
    docs = template({"leaderElection": {"enabled": False}, "replicaCount": 3})
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    env = [e["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert "KUBEINFER_LEADER_ELECTION_NAMESPACE" not in env
    assert not [d for d in docs if d["kind"] == "Role"]
    two = next(d for d in template({"replicaCount": 2}) if d["kind"] == "Deployment")
    assert two["spec"]["replicas"] == 2


def test_scrape_via_apiserver_grants_pods_proxy():
    role = next(d for d in template({"autoscaling": {"scrapeVia": "apiserver"}}) if d["kind"] == "ClusterRole")
    assert _grants(role["rules"])[("", "pods/proxy")] == {"get"}
    dep = next(d for d in template({"autoscaling": {"scrapeVia": "apiserver"}}) if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEINFER_SCRAPE_VIA"] == "apiserver"


def test_watched_namespaces_get_roles_not_a_cluster_role():
    docs = template({"watchNamespaces": ["team-a", "team-b"], "engine": {"image": "reg/engine:9"},
                     "image": {"tag": "1.2.3"}, "resyncSeconds": 30})
    kinds = sorted((d["kind"], d["metadata"].get("namespace")) for d in docs)
    assert ("ClusterRole", None) not in kinds
    assert [k for k in kinds if k[0] in ("Role", "RoleBinding")] == [
        ("Role", "kubeinfer-system"), ("Role", "team-a"), ("Role", "team-b"),
        ("RoleBinding", "kubeinfer-system"), ("RoleBinding", "team-a"), ("RoleBinding", "team-b")]
    for d in docs:
        kubernetes_validate.validate(d, "1.33.0", strict=True)
    c = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
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
    watched = {(g, p) for g, _, p in (*CHILDREN, LWS)}
    for kind in (*CHILD_KINDS, "LeaderWorkerSet", "InferencePool"):   # apply.py: list, get, create, PUT, delete
        prefix, plural = RESOURCES[kind]
        group = "" if prefix == "/api/v1" else prefix.split("/")[2]
        want = writes | ({"watch"} if (group, plural) in watched else set())
        assert grants[(group, plural)] == want, (kind, grants[(group, plural)])
    assert grants[("", "pods")] == {"list", "watch"}   # handlers.STATUS_SOURCES: status follows pod events
    assert grants[("kubeinfer.io", "inferenceservices")] == {"get", "list", "watch", "patch"}
    assert grants[("kubeinfer.io", "inferenceservices/status")] == {"patch"}
    assert grants[("kubeinfer.io", "inferenceservices/finalizers")] == {"update"}
    assert grants[("", "events")] == {"create"}
    assert grants[("", "secrets")] == {"get", "create"}   # apply.ensure_secret: made once, never read by list
    assert grants[("", "pods/log")] == {"get"}   # the model download's progress line (cache_reader.py)
    assert len(grants) == 15


def _operator_env(values: dict | None = None) -> dict:
    dep = next(d for d in template(values) if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator"))
    return {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_the_operator_reads_the_routers_queue_when_the_router_is_on():
    assert "KUBEINFER_ROUTER_URL" not in _operator_env()
    env = _operator_env({"router": {"enabled": True}})
    # the router's Service in the release namespace (tests/router/test_chart.py names it)
    assert env["KUBEINFER_ROUTER_URL"] == "http://kubeinfer-router.kubeinfer-system.svc:8080"
    env = _operator_env({"router": {"enabled": True, "port": 9000, "fullnameOverride": "gw"},
                         "clusterDomain": "cluster.local"})
    assert env["KUBEINFER_ROUTER_URL"] == "http://gw.kubeinfer-system.svc.cluster.local:9000"
