"""The API server semantics kopf and clients rely on, over HTTP."""
from __future__ import annotations

import copy
import time

import httpx
import pytest
import yaml

from tests.k8s_emulator.conftest import WIDGET_CRD, Client

CM = "/api/v1/namespaces/default/configmaps"
WIDGETS = "/apis/example.com/v1/namespaces/default/widgets"


def cm(name: str, labels: dict | None = None, **data: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels or {}},
            "data": data}


def widget(name: str, **spec) -> dict:
    return {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}


def test_discovery_lists_core_groups_and_served_crds(kube: Client):
    assert kube.ok("GET", "/version")["major"] == "1"
    assert kube.ok("GET", "/api")["versions"] == ["v1"]
    core = {r["name"]: r for r in kube.ok("GET", "/api/v1")["resources"]}
    assert {"namespaces", "pods", "pods/status", "events", "secrets", "services"} <= set(core)
    assert core["namespaces"]["namespaced"] is False and "watch" in core["pods"]["verbs"]
    groups = {g["name"] for g in kube.ok("GET", "/apis")["groups"]}
    assert {"apps", "policy", "apiextensions.k8s.io", "events.k8s.io", "coordination.k8s.io"} <= groups
    assert "example.com" not in groups

    kube.ok("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", WIDGET_CRD)
    assert "example.com" in {g["name"] for g in kube.ok("GET", "/apis")["groups"]}
    names = {r["name"] for r in kube.ok("GET", "/apis/example.com/v1")["resources"]}
    assert names == {"widgets", "widgets/status", "widgets/scale"}

    kube.ok("DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com")
    # as a real API server, the group goes once the garbage collector has cleaned the CRD up (in the
    # background): poll with a deadline
    deadline = time.monotonic() + 10
    while kube.call("GET", "/apis/example.com/v1")[0] != 404 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kube.call("GET", "/apis/example.com/v1")[0] == 404


def test_unauthorized_without_the_token(emu):
    r = httpx.get(emu.url + "/api/v1/namespaces")
    assert r.status_code == 401 and r.json()["reason"] == "Unauthorized"


def test_resource_version_grows_with_every_write_and_errors_are_status_objects(kube: Client):
    a = kube.ok("POST", CM, cm("a", x="1"))
    assert a["metadata"]["uid"] and a["metadata"]["creationTimestamp"]
    b = kube.ok("PATCH", f"{CM}/a", {"data": {"x": "2"}}, content_type="application/merge-patch+json")
    c = kube.ok("PUT", f"{CM}/a", {**b, "data": {"x": "3"}})
    rvs = [int(o["metadata"]["resourceVersion"]) for o in (a, b, c)]
    assert rvs == sorted(rvs) and len(set(rvs)) == 3
    listed = kube.ok("GET", CM)
    assert int(listed["metadata"]["resourceVersion"]) >= rvs[-1]

    code, status = kube.call("POST", CM, cm("a"))
    assert code == 409 and status["kind"] == "Status" and status["reason"] == "AlreadyExists"
    assert status["details"] == {"name": "a", "group": "", "kind": "configmaps"}
    code, status = kube.call("GET", f"{CM}/nope")
    assert code == 404 and status["reason"] == "NotFound" and status["message"] == 'configmaps "nope" not found'
    code, status = kube.call("PUT", f"{CM}/a", a)  # stale resourceVersion
    assert code == 409 and status["reason"] == "Conflict"
    # a write that changes nothing does not bump the resourceVersion
    same = kube.ok("PATCH", f"{CM}/a", {"data": {"x": "3"}}, content_type="application/merge-patch+json")
    assert same["metadata"]["resourceVersion"] == c["metadata"]["resourceVersion"]


def test_generate_name_and_missing_namespace(kube: Client):
    made = kube.ok("POST", CM, {"metadata": {"generateName": "gen-"}})
    assert made["metadata"]["name"].startswith("gen-") and len(made["metadata"]["name"]) == 9
    code, status = kube.call("POST", "/api/v1/namespaces/nowhere/configmaps", cm("x"))
    assert code == 404 and "namespaces" in status["message"]


def test_merge_patch_null_deletes_and_json_patch_test_op(kube: Client):
    kube.ok("POST", CM, cm("p", a="1", b="2"))
    patched = kube.ok("PATCH", f"{CM}/p", {"data": {"a": None, "c": "3"}, "metadata": {"labels": {"l": "v"}}},
                      content_type="application/merge-patch+json")
    assert patched["data"] == {"b": "2", "c": "3"} and patched["metadata"]["labels"] == {"l": "v"}
    rv = patched["metadata"]["resourceVersion"]
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
           {"op": "remove", "path": "/data/b"}]
    assert kube.ok("PATCH", f"{CM}/p", ops, content_type="application/json-patch+json")["data"] == {"c": "3"}
    code, status = kube.call("PATCH", f"{CM}/p", ops, content_type="application/json-patch+json")
    assert code == 422, status  # kopf relies on 422 for a failed test op


def test_strategic_merge_patch_merges_containers_by_name(kube: Client):
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
           "spec": {"selector": {"matchLabels": {"app": "d"}}, "template": {
               "metadata": {"labels": {"app": "d"}},
               "spec": {"containers": [{"name": "a", "image": "x:1"}, {"name": "b", "image": "y:1"}]}}}}
    created = kube.ok("POST", "/apis/apps/v1/namespaces/default/deployments", dep)
    assert created["spec"]["replicas"] == 1 and created["spec"]["strategy"]["type"] == "RollingUpdate"
    assert created["spec"]["template"]["spec"]["restartPolicy"] == "Always"  # server defaults
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "b", "image": "y:2"}]}}}}
    out = kube.ok("PATCH", "/apis/apps/v1/namespaces/default/deployments/d", patch,
                  content_type="application/strategic-merge-patch+json")
    assert [(c["name"], c["image"]) for c in out["spec"]["template"]["spec"]["containers"]] == \
        [("a", "x:1"), ("b", "y:2")]
    assert out["metadata"]["generation"] == 2
    bad = copy.deepcopy(out)
    bad["spec"]["selector"] = {"matchLabels": {"app": "other"}}
    bad["spec"]["template"]["metadata"]["labels"] = {"app": "other"}
    code, status = kube.call("PUT", "/apis/apps/v1/namespaces/default/deployments/d", bad)
    assert code == 422 and "field is immutable" in status["message"]


def test_label_and_field_selectors(kube: Client):
    kube.ok("POST", CM, cm("one", {"app": "a", "tier": "web"}))
    kube.ok("POST", CM, cm("two", {"app": "b"}))
    kube.ok("POST", CM, cm("three", {"app": "a", "tier": "db"}))

    def names(**params) -> list[str]:
        return [i["metadata"]["name"] for i in kube.ok("GET", CM, **params)["items"]]

    assert names(labelSelector="app=a") == ["one", "three"]
    assert names(labelSelector="app=a,tier!=db") == ["one"]
    assert names(labelSelector="app in (a,b),!tier") == ["two"]
    assert names(labelSelector="tier") == ["one", "three"]
    assert names(fieldSelector="metadata.name=two") == ["two"]
    assert [i["metadata"]["name"] for i in kube.ok("GET", "/api/v1/configmaps", labelSelector="app=b")["items"]] \
        == ["two"]


def test_watch_resumes_from_a_resource_version_and_410_when_too_old(emu, kube: Client):
    first = kube.ok("POST", CM, cm("w", x="1"))
    rv0 = first["metadata"]["resourceVersion"]
    kube.ok("PATCH", f"{CM}/w", {"data": {"x": "2"}}, content_type="application/merge-patch+json")
    kube.ok("DELETE", f"{CM}/w")
    events = kube.watch(CM, resourceVersion=rv0)
    assert [(e["type"], e["object"]["data"]["x"]) for e in events] == [("MODIFIED", "2"), ("DELETED", "2")]
    assert int(events[-1]["object"]["metadata"]["resourceVersion"]) > int(rv0)

    initial = kube.watch(CM)  # no resourceVersion: the current state as ADDED
    assert initial == []
    kube.ok("POST", CM, cm("v"))
    assert [e["type"] for e in kube.watch(CM)] == ["ADDED"]
    events = kube.watch(CM, sendInitialEvents="true", resourceVersionMatch="NotOlderThan")
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[-1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}

    emu.store.compact()
    events = kube.watch(CM, resourceVersion=rv0)
    assert len(events) == 1 and events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410


def test_watch_with_a_label_selector_sees_objects_leave_and_enter(kube: Client):
    made = kube.ok("POST", CM, cm("s", {"app": "a"}))
    kube.ok("PATCH", f"{CM}/s", {"metadata": {"labels": {"app": "b"}}}, content_type="application/merge-patch+json")
    kube.ok("PATCH", f"{CM}/s", {"metadata": {"labels": {"app": "a"}}}, content_type="application/merge-patch+json")
    events = kube.watch(CM, resourceVersion=str(int(made["metadata"]["resourceVersion"]) - 1),
                        labelSelector="app=a")
    assert [e["type"] for e in events] == ["ADDED", "DELETED", "ADDED"]


def test_status_subresource_and_generation(kube: Client):
    kube.ok("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", WIDGET_CRD)
    made = kube.ok("POST", WIDGETS, {**widget("w", size=1), "status": {"ignored": True}})
    assert "status" not in made and made["metadata"]["generation"] == 1
    with_status = kube.ok("PATCH", f"{WIDGETS}/w/status", {"status": {"phase": "Ready"}, "spec": {"size": 9}},
                          content_type="application/merge-patch+json")
    assert with_status["status"] == {"phase": "Ready"} and with_status["spec"]["size"] == 1
    assert with_status["metadata"]["generation"] == 1
    body = {**with_status, "spec": {**with_status["spec"], "size": 2}, "status": {"phase": "Hacked"}}
    updated = kube.ok("PUT", f"{WIDGETS}/w", body)
    assert updated["status"] == {"phase": "Ready"} and updated["metadata"]["generation"] == 2
    annotated = kube.ok("PATCH", f"{WIDGETS}/w", {"metadata": {"annotations": {"a": "b"}}},
                        content_type="application/merge-patch+json")
    assert annotated["metadata"]["generation"] == 2  # metadata changes do not bump the generation
    code, _ = kube.call("PATCH", f"{WIDGETS}/w", {"spec": {"size": 3}},
                        content_type="application/strategic-merge-patch+json")
    assert code == 415  # as on a real server: no strategic merge for custom resources
    scale = kube.ok("GET", f"{WIDGETS}/w/scale")
    assert scale["spec"]["replicas"] == 1
    kube.ok("PATCH", f"{WIDGETS}/w/scale", {"spec": {"replicas": 4}}, content_type="application/merge-patch+json")
    assert kube.ok("GET", f"{WIDGETS}/w")["spec"]["replicas"] == 4


def test_crd_schema_prunes_defaults_and_validates(kube: Client):
    kube.ok("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", WIDGET_CRD)
    made = kube.ok("POST", WIDGETS, widget("w", size=2, unknown="x", extra={"free": {"form": 1}}))
    assert made["spec"] == {"size": 2, "color": "red", "replicas": 1, "extra": {"free": {"form": 1}}}
    code, status = kube.call("POST", WIDGETS, widget("bad", size=0, color="green"))
    assert code == 422 and status["reason"] == "Invalid"
    assert "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1" in status["message"]
    assert 'spec.color: Unsupported value: "green": supported values: "red", "blue"' in status["message"]
    code, status = kube.call("POST", WIDGETS, widget("bad"))
    assert code == 422 and "spec.size: Required value" in status["message"]


def test_finalizers_hold_deletion_until_removed(kube: Client):
    made = kube.ok("POST", CM, {**cm("f"), "metadata": {"name": "f", "finalizers": ["example.com/hold"]}})
    deleting = kube.ok("DELETE", f"{CM}/f")
    assert deleting["metadata"]["deletionTimestamp"]
    assert kube.ok("GET", f"{CM}/f")["metadata"]["deletionTimestamp"]
    code, status = kube.call("PATCH", f"{CM}/f", {"metadata": {"finalizers": ["example.com/hold", "another"]}},
                             content_type="application/merge-patch+json")
    assert code == 422 and "no new finalizers" in status["message"]
    kube.ok("PATCH", f"{CM}/f", {"metadata": {"finalizers": None}}, content_type="application/merge-patch+json")
    assert kube.call("GET", f"{CM}/f")[0] == 404
    events = kube.watch(CM, resourceVersion=made["metadata"]["resourceVersion"])
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]


def _wait_gone(kube: Client, path: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kube.call("GET", path)[0] == 404:
            return True
        time.sleep(0.05)
    return False


def test_garbage_collection_of_dependents(kube: Client):
    owner = kube.ok("POST", CM, cm("owner"))
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"],
           "controller": True, "blockOwnerDeletion": True}
    kube.ok("POST", CM, {**cm("child"), "metadata": {"name": "child", "ownerReferences": [ref]}})
    child_ref = {**ref, "name": "child", "uid": kube.ok("GET", f"{CM}/child")["metadata"]["uid"]}
    kube.ok("POST", CM, {**cm("grandchild"), "metadata": {"name": "grandchild", "ownerReferences": [child_ref]}})
    kube.ok("DELETE", f"{CM}/owner")
    assert _wait_gone(kube, f"{CM}/child") and _wait_gone(kube, f"{CM}/grandchild")

    owner = kube.ok("POST", CM, cm("owner2"))
    ref = {**ref, "name": "owner2", "uid": owner["metadata"]["uid"]}
    kube.ok("POST", CM, {**cm("kept"), "metadata": {"name": "kept", "ownerReferences": [ref]}})
    kube.ok("DELETE", f"{CM}/owner2", propagationPolicy="Orphan")
    assert _wait_gone(kube, f"{CM}/owner2")
    assert "ownerReferences" not in kube.ok("GET", f"{CM}/kept")["metadata"]

    owner = kube.ok("POST", CM, cm("owner3"))
    ref = {**ref, "name": "owner3", "uid": owner["metadata"]["uid"]}
    kube.ok("POST", CM, {**cm("fg"), "metadata": {"name": "fg", "ownerReferences": [ref]}})
    kube.ok("DELETE", f"{CM}/owner3", propagationPolicy="Foreground")
    assert _wait_gone(kube, f"{CM}/fg") and _wait_gone(kube, f"{CM}/owner3")


def test_deleting_a_namespace_or_a_crd_takes_its_contents(kube: Client):
    kube.ok("POST", "/api/v1/namespaces", {"metadata": {"name": "temp"}})
    kube.ok("POST", "/api/v1/namespaces/temp/configmaps", cm("inside"))
    assert kube.ok("DELETE", "/api/v1/namespaces/temp")["status"]["phase"] == "Terminating"
    assert _wait_gone(kube, "/api/v1/namespaces/temp")
    assert kube.call("GET", "/api/v1/namespaces/temp/configmaps/inside")[0] == 404

    kube.ok("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", WIDGET_CRD)
    kube.ok("POST", WIDGETS, widget("w", size=1))
    kube.ok("DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com")
    assert _wait_gone(kube, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com")
    assert kube.call("GET", WIDGETS)[0] == 404


def test_list_pagination(kube: Client):
    for i in range(5):
        kube.ok("POST", CM, cm(f"page-{i}"))
    first = kube.ok("GET", CM, limit="2")
    assert len(first["items"]) == 2 and first["metadata"]["continue"]
    rest = kube.ok("GET", CM, limit="10", **{"continue": first["metadata"]["continue"]})
    assert len(rest["items"]) == 3 and "continue" not in rest["metadata"]


@pytest.mark.parametrize("name", ["UPPER", "under_score", "x" * 254])
def test_invalid_names_are_rejected(kube: Client, name: str):
    code, status = kube.call("POST", CM, cm(name))
    assert code == 422 and "metadata.name" in status["message"]


def test_server_side_apply_creates_and_drops_what_the_manager_no_longer_sets(kube: Client):
    def apply(data: dict, manager: str = "tester") -> tuple[int, dict]:
        body = yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": data})
        r = kube.http.patch(f"{CM}/ssa", params={"fieldManager": manager} if manager else None, content=body,
                            headers={"Content-Type": "application/apply-patch+yaml"})
        return r.status_code, r.json()

    code, made = apply({"a": "1", "b": "2"})
    assert code in (200, 201) and made["data"] == {"a": "1", "b": "2"}
    kube.ok("PATCH", f"{CM}/ssa", {"data": {"other": "x"}}, content_type="application/merge-patch+json")
    code, applied = apply({"a": "3"})
    assert code == 200 and applied["data"] == {"a": "3", "other": "x"}  # b was ours, other was not
    code, status = apply({"a": "4"}, manager="")
    assert code == 400 and "fieldManager" in status["message"]


def test_deployment_scale_subresource(kube: Client):
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "s"},
           "spec": {"selector": {"matchLabels": {"app": "s"}}, "template": {
               "metadata": {"labels": {"app": "s"}}, "spec": {"containers": [{"name": "a", "image": "x:1"}]}}}}
    kube.ok("POST", "/apis/apps/v1/namespaces/default/deployments", dep)
    scale = kube.ok("GET", "/apis/apps/v1/namespaces/default/deployments/s/scale")
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 1 and scale["status"]["selector"] == "app=s"
    kube.ok("PUT", "/apis/apps/v1/namespaces/default/deployments/s/scale", {**scale, "spec": {"replicas": 3}})
    assert kube.ok("GET", "/apis/apps/v1/namespaces/default/deployments/s")["spec"]["replicas"] == 3


def test_events_in_both_api_groups(kube: Client):
    involved = {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "namespace": "default"}
    kube.ok("POST", "/api/v1/namespaces/default/events", {"metadata": {"generateName": "ev-"}, "reason": "R",
                                                          "message": "m", "type": "Normal", "involvedObject": involved})
    kube.ok("POST", "/apis/events.k8s.io/v1/namespaces/default/events", {
        "metadata": {"generateName": "ev-"}, "reason": "R", "note": "m", "type": "Normal", "regarding": involved,
        "eventTime": "2024-01-01T00:00:00.000000Z", "action": "A", "reportingController": "c",
        "reportingInstance": "i"})
    assert len(kube.ok("GET", "/api/v1/namespaces/default/events")["items"]) == 1
    assert len(kube.ok("GET", "/apis/events.k8s.io/v1/events")["items"]) == 1
