"""handlers: what is registered with kopf, kopf settings, and the error contract of one handler call."""
from __future__ import annotations

import logging

import kopf
import pytest

from kubeinfer.operator import handlers
from kubeinfer.operator.apply import ApiError
from tests.operator.helpers import FakeApi, inference_service, make_settings


@pytest.fixture
def events(monkeypatch):
    posted = []
    monkeypatch.setattr(kopf, "event", lambda body, *, type, reason, message: posted.append((type, reason)))
    return posted


def handler(registry, name):
    for h in (*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers()):
        if h.id.startswith(name):
            return h.fn
    raise LookupError(name)


def test_registered_handlers():
    registry = handlers.build_registry(make_settings(resync_seconds=2), api=FakeApi())
    changing = registry._changing.get_all_handlers()
    assert {(h.selector.group, h.selector.version, h.selector.any_name) for h in changing} == \
        {("kubeinfer.io", "v1alpha1", "inferenceservices")}
    assert {h.id for h in changing} == {"reconcile"}
    assert {h.reason for h in changing} == {"create", "update", None}   # None: resume
    assert [h.id for h in registry._activities.get_all_handlers()] == ["login"]   # no default login otherwise
    timers = registry._spawning.get_all_handlers()
    assert [t.interval for t in timers] == [2]
    watched = {(h.selector.group, h.selector.any_name) for h in registry._watching.get_all_handlers()}
    assert watched == {("apps", "deployments"), ("apps", "statefulsets"), ("", "services"),
                       ("policy", "poddisruptionbudgets")}


def test_kopf_settings():
    s = handlers.kopf_settings(make_settings())
    assert s.peering.standalone and s.scanning.disabled
    assert s.persistence.progress_storage.prefix == "kubeinfer.io"
    assert s.persistence.finalizer == "kubeinfer.io/finalizer"
    assert s.posting.level == logging.WARNING
    assert handlers._run_kwargs(make_settings()) == {
        "standalone": True, "clusterwide": True, "liveness_endpoint": "http://0.0.0.0:8080/healthz"}
    assert handlers._run_kwargs(make_settings(namespaces=("a",), liveness_port=0)) == {
        "standalone": True, "namespaces": ["a"]}


def test_retry_delay_backs_off():
    assert [handlers.retry_delay(r) for r in (0, 1, 2, 5, 50)] == [1, 2, 4, 32, 60]


def test_create_patches_status_and_posts_events(events):
    api = FakeApi()
    on_change = handler(handlers.build_registry(make_settings(), api=api), "reconcile")
    patch = kopf.Patch()
    on_change(body=inference_service(), patch=patch, logger=logging.getLogger(), retry=0)
    assert patch["status"]["phase"] == "Pending"
    assert ("Normal", "Created") in events


def test_invalid_spec_is_permanent_on_change_but_not_in_the_timer(events):
    registry = handlers.build_registry(make_settings(), api=FakeApi())
    body = inference_service({"replicas": -1})
    with pytest.raises(kopf.PermanentError, match="spec.replicas"):
        handler(registry, "reconcile")(body=body, patch=(p := kopf.Patch()), logger=logging.getLogger(), retry=0)
    assert p["status"]["phase"] == "Failed" and events == [("Warning", "InvalidSpec")]
    body["status"] = dict(p["status"])
    events.clear()
    handler(registry, "resync")(body=body, patch=(p2 := kopf.Patch()), logger=logging.getLogger(), retry=0)
    assert events == [] and "status" not in p2     # nothing new: no event, no patch, no error


def test_api_errors_are_temporary(events):
    api = FakeApi()
    api.fail[("GET", "Deployment")] = ApiError(500, "InternalError", "etcd timeout")
    on_change = handler(handlers.build_registry(make_settings(), api=api), "reconcile")
    with pytest.raises(kopf.TemporaryError) as info:
        on_change(body=inference_service(), patch=kopf.Patch(), logger=logging.getLogger(), retry=3)
    assert info.value.delay == 8


def test_deleted_child_is_recreated_at_once():
    api = FakeApi()
    registry = handlers.build_registry(make_settings(), api=api)
    body = inference_service()
    api.put_object(body)
    on_event = next(iter(registry._watching.get_all_handlers())).fn
    on_event(type="DELETED", body={"kind": "Service", "metadata": {
        "name": "llm", "namespace": "ns", "labels": {"kubeinfer.io/inferenceservice": "llm"}}},
        logger=logging.getLogger())
    assert ("Service", "llm") in api.kinds()
