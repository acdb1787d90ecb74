"""plan: desired vs observed -> actions, table-driven; is_subset's tolerance of server defaulting."""
from __future__ import annotations

import copy

import pytest

from kubeinfer.operator.plan import is_subset, plan
from kubeinfer.operator.render import render
from tests.operator.helpers import make_settings, make_spec

OWNER = {"metadata": {"name": "llm", "uid": "uid-1"}}


def desired(spec: dict | None = None, **kwargs) -> list[dict]:
    return render(make_spec(spec or {}), make_settings(), owner=OWNER, **kwargs)


def as_server_returns(obj: dict) -> dict:
    """What a GET returns after create: defaults added, empty values dropped, quantities canonical."""
    obj = copy.deepcopy(obj)
    meta = obj["metadata"]
    meta.update(uid="child-uid", resourceVersion="7", creationTimestamp="2025-01-01T00:00:00Z")
    spec = obj["spec"]
    if obj["kind"] == "Deployment":
        pod = spec["template"]["spec"]
        pod.update(dnsPolicy="ClusterFirst", restartPolicy="Always", schedulerName="default-scheduler")
        c = pod["containers"][0]
        c.update(terminationMessagePath="/dev/termination-log", imagePullPolicy="IfNotPresent")
        c["ports"][0]["protocol"] = "TCP"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            c[probe]["httpGet"]["scheme"] = "HTTP"
            c[probe]["successThreshold"] = 1
        c["resources"]["requests"]["nvidia.com/gpu"] = "1"        # quantities come back as strings
        spec["template"]["metadata"]["creationTimestamp"] = None
        model_cache = next(v for v in pod["volumes"] if v["name"] == "model-cache")
        model_cache["emptyDir"] = {}
        obj["status"] = {"replicas": 1}
    if obj["kind"] == "Service":
        ip = spec.get("clusterIP", "10.0.0.7")
        spec.update(clusterIP=ip, clusterIPs=[ip], sessionAffinity="None")
    return obj


def drift_replicas(objs):
    objs[0]["spec"]["replicas"] = 5


def drift_env(objs):
    objs[0]["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "DEBUG", "value": "1"})


def drift_image(objs):
    objs[0]["spec"]["template"]["spec"]["containers"][0]["image"] = "hacked:latest"


def drift_service_port(objs):
    objs[1]["spec"]["ports"][0]["port"] = 80


def drift_owner_removed(objs):
    del objs[2]["metadata"]["ownerReferences"]


def drift_label(objs):
    objs[0]["metadata"]["labels"]["kubeinfer.io/inferenceservice"] = "other"


@pytest.mark.parametrize("mutate", [drift_replicas, drift_env, drift_image, drift_service_port,
                                    drift_owner_removed, drift_label])
def test_hand_edits_are_put_back(mutate):
    want = desired()
    have = [as_server_returns(o) for o in want]
    mutate(have)
    actions = plan(want, have, "uid-1")
    assert [(a.verb, a.reason) for a in actions] == [("update", "drifted")]


CASES = [
    # (name, desired spec, observed spec or None for nothing, expected (verb, kind, name, reason))
    ("nothing observed -> create all", {}, None,
     [("create", "Deployment", "llm", "missing"), ("create", "Service", "llm", "missing"),
      ("create", "PodDisruptionBudget", "llm", "missing")]),
    ("equal -> nothing", {}, {}, []),
    ("scaled -> update the Deployment only", {"replicas": 3}, {},
     [("update", "Deployment", "llm", "changed")]),
    ("new image -> update the Deployment only", {"engine": {"image": "new:2"}}, {},
     [("update", "Deployment", "llm", "changed")]),
    ("pipeline 1 -> 2: statefulsets created, Deployment deleted last", {"parallelism": {"pipeline": 2}}, {},
     [("create", "StatefulSet", "llm-0", "missing"), ("create", "Service", "llm-workers", "missing"),
      ("update", "Service", "llm", "changed"), ("delete", "Deployment", "llm", "orphan")]),
    ("scale down pipeline groups -> delete the extra StatefulSet",
     {"parallelism": {"pipeline": 2}, "replicas": 1}, {"parallelism": {"pipeline": 2}, "replicas": 2},
     [("delete", "StatefulSet", "llm-1", "orphan")]),
]


@pytest.mark.parametrize("want_spec,have_spec,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(want_spec, have_spec, expected):
    have = [] if have_spec is None else [as_server_returns(o) for o in desired(have_spec)]
    actions = plan(desired(want_spec), have, "uid-1")
    got = [(a.verb, a.obj["kind"], a.obj["metadata"]["name"], a.reason) for a in actions]
    assert got == expected


def test_immutable_selector_change_recreates():
    want = desired()
    have = [as_server_returns(o) for o in want]
    have[0]["spec"]["selector"]["matchLabels"]["old"] = "label"
    assert [(a.verb, a.reason) for a in plan(want, have, "uid-1")] == [("recreate", "immutable")]


def test_a_new_group_size_recreates_the_leaderworkerset_and_a_new_count_updates_it():
    def lws(pipeline: int, replicas: int = 1) -> dict:
        return desired({"parallelism": {"pipeline": pipeline}, "replicas": replicas}, use_lws=True)[0]
    have = [as_server_returns(lws(2))]
    assert [(a.verb, a.reason) for a in plan([lws(4)], have, "uid-1")] == [("recreate", "immutable")]
    assert [(a.verb, a.reason) for a in plan([lws(2, replicas=3)], have, "uid-1")] == [("update", "changed")]


def test_orphans_of_someone_else_are_left_alone():
    want = desired()
    stranger = as_server_returns(desired({"parallelism": {"pipeline": 2}})[0])   # a StatefulSet
    stranger["metadata"]["ownerReferences"][0]["uid"] = "another-owner"
    have = [as_server_returns(o) for o in want] + [stranger]
    assert plan(want, have, "uid-1") == []


def test_object_being_deleted_is_waited_for():
    want = desired()
    have = [as_server_returns(o) for o in want]
    have[0]["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    have[0]["spec"]["replicas"] = 9
    assert plan(want, have, "uid-1") == []


SUBSET = [
    ({"a": 1}, {"a": 1, "b": 2}, True),
    ({"a": 1}, {"a": "1"}, True),
    ({"cpu": "500m"}, {"cpu": "0.5"}, True),
    ({"memory": "1Gi"}, {"memory": "1073741824"}, True),
    ({"memory": "1Gi"}, {"memory": "1G"}, False),
    ({"x": {}}, {}, True),                       # empty maps are dropped by the server
    ({"x": []}, {"x": None}, True),
    ({"readOnly": False}, {}, True),             # omitempty booleans
    ({"readOnly": True}, {}, False),
    ({"l": [{"a": 1}]}, {"l": [{"a": 1, "b": 2}]}, True),
    ({"l": [{"a": 1}]}, {"l": [{"a": 1}, {"a": 2}]}, False),
    ({"flag": True}, {"flag": "True"}, False),
    ({"a": 0}, {}, True),
]


@pytest.mark.parametrize("want,have,result", SUBSET)
def test_is_subset(want, have, result):
    assert is_subset(want, have) is result
