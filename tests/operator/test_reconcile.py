"""reconcile + apply against an in-memory API: create, idempotence, drift, errors."""
from __future__ import annotations

import copy

import pytest

from kubeinfer.operator.apply import ApiError, NotOurs, execute
from kubeinfer.operator.plan import Action
from kubeinfer.operator.reconcile import LwsDiscovery, reconcile
from kubeinfer.operator.render import render
from tests.operator.helpers import FakeApi, inference_service, make_settings, make_spec

NOW = "2025-01-01T00:00:00Z"


def run(api, body, **kwargs):
    settings = make_settings(**kwargs)
    return reconcile(api, body, settings, LwsDiscovery(settings.leaderworkerset), now=NOW)


def writes(api) -> list[tuple[str, str]]:
    return [(m, p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1]) for m, p in api.calls if m != "GET"]


def test_first_reconcile_creates_children_and_reports_pending(fake_api):
    body = inference_service({"accelerator": "none"})
    out = run(fake_api, body)
    assert fake_api.kinds() == [("Deployment", "llm"), ("PodDisruptionBudget", "llm"), ("Service", "llm")]
    assert [e[1] for e in out.events] == ["Created", "Created", "Created", "Pending"]
    assert out.status["phase"] == "Pending" and out.invalid is None
    dep = fake_api.objects[("Deployment", "ns", "llm")]
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_second_reconcile_writes_nothing(fake_api):
    body = inference_service()
    body["status"] = run(fake_api, body).status
    fake_api.calls.clear()
    out = run(fake_api, body)
    assert writes(fake_api) == [] and out.events == [] and out.status == body["status"]


def test_child_deleted_by_hand_comes_back(fake_api):
    body = inference_service()
    run(fake_api, body)
    del fake_api.objects[("Service", "ns", "llm")]
    out = run(fake_api, body)
    assert ("Service", "llm") in fake_api.kinds()
    assert ("Normal", "Created", "created Service llm") in out.events


def test_child_edited_by_hand_is_put_back(fake_api):
    body = inference_service()
    run(fake_api, body)
    dep = fake_api.objects[("Deployment", "ns", "llm")]
    dep["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
    dep["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "2"
    out = run(fake_api, body)
    dep = fake_api.objects[("Deployment", "ns", "llm")]
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/kubeinfer:test"
    assert dep["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"   # others' kept
    assert out.events[0][:2] == ("Warning", "DriftCorrected")


def test_spec_change_updates_in_place(fake_api):
    run(fake_api, inference_service())
    fake_api.calls.clear()
    out = run(fake_api, inference_service({"replicas": 3}, generation=2))
    assert writes(fake_api) == [("PUT", "deployments/llm")]
    assert fake_api.objects[("Deployment", "ns", "llm")]["spec"]["replicas"] == 3
    assert out.status["observedGeneration"] == 2


def test_invalid_spec_is_reported_not_applied(fake_api):
    out = run(fake_api, inference_service({"model": {"uri": "s3://bucket/x"}, "replicas": -1}))
    assert out.invalid is not None and len(out.invalid.problems) == 2
    assert out.status["phase"] == "Failed"
    assert fake_api.calls == []
    assert out.events[0][:2] == ("Warning", "InvalidSpec")


def test_pods_drive_the_status(fake_api):
    body = inference_service()
    run(fake_api, body)
    labels = fake_api.objects[("Deployment", "ns", "llm")]["spec"]["template"]["metadata"]["labels"]
    fake_api.put_object({"kind": "Pod", "apiVersion": "v1",
                         "metadata": {"name": "llm-1", "namespace": "ns", "labels": labels},
                         "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
    out = run(fake_api, body)
    assert out.status["phase"] == "Ready" and out.status["readyReplicas"] == 1


def test_pipeline_creates_its_node_secret_once_and_keeps_it(fake_api):
    body = inference_service({"parallelism": {"pipeline": 2}})
    out = run(fake_api, body)
    secret = fake_api.objects[("Secret", "ns", "llm-node-secret")]
    value = secret["stringData"]["node-secret"]
    assert len(value) >= 32 and secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert ("Normal", "Created", "created Secret llm-node-secret") in out.events
    assert value not in repr(out.status) and value not in repr(out.events)   # never in a status or event
    out = run(fake_api, inference_service({"parallelism": {"pipeline": 2}, "replicas": 2}, generation=2))
    assert fake_api.objects[("Secret", "ns", "llm-node-secret")]["stringData"]["node-secret"] == value
    assert not [e for e in out.events if "Secret" in e[2]]
    env = {e["name"]: e for e in fake_api.objects[("StatefulSet", "ns", "llm-0")]["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    assert env["KUBEINFER_NODE_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "llm-node-secret",
                                                                         "key": "node-secret"}


def test_a_failed_secret_create_is_retried_and_the_rest_applied(fake_api):
    fake_api.fail[("POST", "Secret")] = ApiError(503, "ServiceUnavailable", "try again")
    out = run(fake_api, inference_service({"parallelism": {"pipeline": 2}}))
    assert [str(f) for f in out.failed] == ["create Secret llm-node-secret: 503 ServiceUnavailable: try again"]
    assert ("StatefulSet", "llm-0") in fake_api.kinds()
    out = run(fake_api, inference_service({"parallelism": {"pipeline": 2}}))
    assert out.failed == [] and ("Secret", "llm-node-secret") in fake_api.kinds()


def test_a_single_pod_service_makes_no_secret(fake_api):
    run(fake_api, inference_service())
    assert not [k for k in fake_api.kinds() if k[0] == "Secret"]


def test_leaderworkerset_when_served_and_back_to_a_deployment():
    api = FakeApi(lws=True)
    body = inference_service({"parallelism": {"pipeline": 2}})
    run(api, body)
    assert ("LeaderWorkerSet", "llm-workers") in api.kinds() and ("Deployment", "llm") not in api.kinds()
    run(api, inference_service({}))
    assert ("LeaderWorkerSet", "llm-workers") not in api.kinds() and ("Deployment", "llm") in api.kinds()


def test_statefulsets_without_leaderworkerset(fake_api):
    run(fake_api, inference_service({"parallelism": {"pipeline": 2}, "replicas": 2}))
    assert [n for k, n in fake_api.kinds() if k == "StatefulSet"] == ["llm-0", "llm-1"]


def test_server_rejecting_a_child_is_an_invalid_spec(fake_api):
    fake_api.fail[("POST", "Deployment")] = ApiError(422, "Invalid", "spec.template.spec.affinity: Invalid value")
    out = run(fake_api, inference_service())
    assert out.invalid is not None and "affinity: Invalid value" in str(out.invalid)


def test_a_failed_list_leaves_that_kind_alone_and_applies_the_rest(fake_api):
    fake_api.fail[("GET", "Deployment")] = ApiError(503, "ServiceUnavailable", "etcd leader changed")
    out = run(fake_api, inference_service())
    assert fake_api.kinds() == [("PodDisruptionBudget", "llm"), ("Service", "llm")]
    assert [str(f) for f in out.failed] == ["list Deployments: 503 ServiceUnavailable: etcd leader changed"]
    assert out.invalid is None and out.status["phase"] == "Pending"
    out = run(fake_api, inference_service())   # the API answers again: the rest is done
    assert ("Deployment", "llm") in fake_api.kinds() and out.failed == []


FAILING_CALLS = [
    # (method, kind, error, what failed, children there afterwards)
    ("POST", "Deployment", ApiError(500, "InternalError", "etcd timeout"), "create Deployment llm",
     [("PodDisruptionBudget", "llm"), ("Service", "llm")]),
    ("POST", "Service", ApiError(0, "Unreachable", "connection reset"), "create Service llm",
     [("Deployment", "llm"), ("PodDisruptionBudget", "llm")]),
    ("POST", "PodDisruptionBudget", ApiError(429, "TooManyRequests", "slow down"),
     "create PodDisruptionBudget llm", [("Deployment", "llm"), ("Service", "llm")]),
]


@pytest.mark.parametrize("method,kind,error,what,after", FAILING_CALLS, ids=[c[1] for c in FAILING_CALLS])
def test_a_failed_write_is_recorded_and_the_others_applied(fake_api, method, kind, error, what, after):
    fake_api.fail[(method, kind)] = error
    out = run(fake_api, inference_service())
    assert fake_api.kinds() == after
    assert [f.what for f in out.failed] == [what] and out.failed[0].error is error
    assert [e[1] for e in out.events].count("Created") == 2


def test_unreadable_pods_keep_the_previous_status(fake_api):
    body = inference_service()
    body["status"] = {"phase": "Ready", "observedGeneration": 1}
    fake_api.fail[("GET", "Pod")] = ApiError(503, "ServiceUnavailable", "try later")
    out = run(fake_api, body)
    assert out.status == body["status"] and [f.what for f in out.failed] == ["list Pods"]
    assert len(fake_api.kinds()) == 3    # the children were applied all the same


# --- apply.execute: idempotence --------------------------------------------------------------

def desired():
    return render(make_spec({}, name="llm"), make_settings(), owner={"metadata": {"name": "llm", "uid": "uid-1"}})


def test_create_when_it_already_exists_and_is_ours_updates(fake_api):
    service = desired()[1]
    stale = copy.deepcopy(service)
    stale["spec"]["ports"][0]["port"] = 80
    fake_api.put_object(stale)
    done = execute(fake_api, Action("create", service), "uid-1")
    assert done.verb == "updated"
    assert fake_api.objects[("Service", "ns", "llm")]["spec"]["ports"][0]["port"] == 8000


def test_create_when_someone_elses_object_is_in_the_way(fake_api):
    service = desired()[1]
    fake_api.put_object({"kind": "Service", "apiVersion": "v1",
                         "metadata": {"name": "llm", "namespace": "ns"}, "spec": {}})
    with pytest.raises(NotOurs) as info:
        execute(fake_api, Action("create", service), "uid-1")
    assert "not managed by this InferenceService" in str(info.value) and info.value.retryable


def test_delete_of_missing_object_is_fine(fake_api):
    done = execute(fake_api, Action("delete", desired()[2]), "uid-1")
    assert done.verb == "deleted"


def test_update_of_missing_object_creates_it(fake_api):
    dep = desired()[0]
    execute(fake_api, Action("update", dep, {"metadata": {"resourceVersion": "1"}}, reason="changed"), "uid-1")
    assert ("Deployment", "llm") in fake_api.kinds()


def test_update_refused_as_immutable_recreates(fake_api):
    dep = desired()[0]
    fake_api.put_object(dep)
    fake_api.fail[("PUT", "Deployment")] = ApiError(422, "Invalid", "spec.selector: field is immutable")
    current = fake_api.objects[("Deployment", "ns", "llm")]
    execute(fake_api, Action("update", dep, current, reason="changed"), "uid-1")
    assert [m for m, _ in fake_api.calls] == ["PUT", "DELETE", "POST"]


def test_service_update_keeps_the_cluster_ip(fake_api):
    service = desired()[1]
    live = copy.deepcopy(service)
    live["spec"]["clusterIP"] = "10.0.0.9"
    fake_api.put_object(live)
    execute(fake_api, Action("update", service, fake_api.objects[("Service", "ns", "llm")]), "uid-1")
    assert fake_api.objects[("Service", "ns", "llm")]["spec"]["clusterIP"] == "10.0.0.9"
