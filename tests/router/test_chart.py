"""The router's part of charts/kubeinfer: off by default; on, a Deployment running
`kubeinfer router`, its Service and read-only RBAC, all valid Kubernetes objects."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (pip) renders and lints charts offline")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
CHART = Path(__file__).resolve().parents[2] / "charts" / "kubeinfer"
ROUTER = "kubeinfer-router"


def template(values: dict | None = None) -> list[dict]:
    helm.disable_logging()
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name="kubeinfer", namespace="kubeinfer-system")
    return [d for name, text in sorted(rendered.items()) if not name.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]


def router_objects(docs: list[dict]) -> dict[tuple[str, str | None], dict]:
    return {(d["kind"], d["metadata"].get("namespace")): d for d in docs if d["metadata"]["name"] == ROUTER}


def test_router_is_off_by_default():
    assert router_objects(template()) == {}


def test_router_lints_clean_when_on():
    report = helm.lint(str(CHART), {"router": {"enabled": True, "namespaces": ["a"]}}, strict=True,
                       kube_version="v1.33.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_router_cluster_wide():
    docs = template({"router": {"enabled": True, "loadBalancing": "prefix-hash", "maxQueueWait": 120}})
    objs = router_objects(docs)
    ns = "kubeinfer-system"
    assert sorted(objs) == sorted([("Deployment", ns), ("Service", ns), ("ServiceAccount", ns),
                                   ("ClusterRole", None), ("ClusterRoleBinding", None)])
    for d in objs.values():
        kubernetes_validate.validate(d, "1.33.0", strict=True)
    pod = objs["Deployment", ns]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["kubeinfer"] and c["args"][:3] == ["router", "--port", "8080"]
    args = dict(zip(c["args"][1::2], c["args"][2::2]))
    assert args["--load-balancing"] == "prefix-hash" and args["--max-queue-wait"] == "120"
    assert "--namespace" not in c["args"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert pod["serviceAccountName"] == ROUTER
    svc = objs["Service", ns]["spec"]
    assert svc["selector"] == objs["Deployment", ns]["spec"]["selector"]["matchLabels"]
    assert svc["selector"]["app.kubernetes.io/component"] == "router"
    rules = objs["ClusterRole", None]["rules"]
    # read-only: the router never writes to the API (the autoscaler writes spec.replicas)
    assert {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]} == {
        ("kubeinfer.io", "inferenceservices", "list"), ("kubeinfer.io", "inferenceservices", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"), ("discovery.k8s.io", "endpointslices", "watch")}
    # the operator's own objects are untouched by the router's
    operator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] != ROUTER)
    assert operator["spec"]["template"]["spec"]["containers"][0]["args"] == ["operator"]


def test_router_in_named_namespaces_gets_roles():
    docs = template({"router": {"enabled": True, "namespaces": ["team-a", "team-b"]}})
    objs = router_objects(docs)
    assert ("ClusterRole", None) not in objs
    assert {k for k in objs if k[0] in ("Role", "RoleBinding")} == {
        ("Role", "team-a"), ("Role", "team-b"), ("RoleBinding", "team-a"), ("RoleBinding", "team-b")}
    for d in objs.values():
        kubernetes_validate.validate(d, "1.33.0", strict=True)
    c = objs["Deployment", "kubeinfer-system"]["spec"]["template"]["spec"]["containers"][0]
    assert [c["args"][i + 1] for i, a in enumerate(c["args"]) if a == "--namespace"] == ["team-a", "team-b"]
