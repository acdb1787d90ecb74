"""handlers: what is registered with kopf, kopf settings, the error contract of one handler call, and
the status refresh on pod and workload events (StatusFollower)."""
from __future__ import annotations

import asyncio
import logging
import time

import kopf
import pytest

from kubeinfer.operator import handlers
from kubeinfer.operator.apply import ApiError
from kubeinfer.operator.reconcile import LwsDiscovery
from tests.operator.helpers import FakeApi, inference_service, make_settings


@pytest.fixture
def events(monkeypatch):
    posted = []
    monkeypatch.setattr(kopf, "event", lambda body, *, type, reason, message: posted.append((type, reason)))
    return posted


def handler(registry, name):
    for h in (*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers(),
              *registry._watching.get_all_handlers()):
        if h.id.startswith(name):
            return h.fn
    raise LookupError(name)


def test_registered_handlers():
    registry = handlers.build_registry(make_settings(resync_seconds=2), api=FakeApi())
    changing = registry._changing.get_all_handlers()
    assert {(h.selector.group, h.selector.version, h.selector.any_name) for h in changing} == \
        {("kubeinfer.io", "v1alpha1", "inferenceservices")}
    assert {(h.id, h.reason) for h in changing} == {
        ("reconcile", "create"), ("reconcile", "update"), ("reconcile", None), ("forget", "delete")}
    forget = next(h for h in changing if h.id == "forget")
    assert forget.requires_finalizer is False   # optional: it only drops in-memory state
    assert [h.id for h in registry._activities.get_all_handlers()] == ["login"]   # no default login otherwise
    timers = {t.id: t for t in registry._spawning.get_all_handlers()}
    assert {i: t.interval for i, t in timers.items()} == {"resync": 2, "autoscale": handlers.AUTOSCALE_TICK}
    assert timers["autoscale"].when is handlers.has_autoscaling
    watched = {(h.id, h.selector.group, h.selector.any_name) for h in registry._watching.get_all_handlers()}
    assert watched == {
        ("child-deployments", "apps", "deployments"), ("child-statefulsets", "apps", "statefulsets"),
        ("child-services", "", "services"), ("child-poddisruptionbudgets", "policy", "poddisruptionbudgets"),
        ("child-leaderworkersets", "leaderworkerset.x-k8s.io", "leaderworkersets"),
        ("child-jobs", "batch", "jobs"), ("child-persistentvolumeclaims", "", "persistentvolumeclaims"),
        ("status-pods", "", "pods"), ("status-deployments", "apps", "deployments"),
        ("status-statefulsets", "apps", "statefulsets")}
    for h in registry._watching.get_all_handlers():
        assert h.labels == {"app.kubernetes.io/managed-by": "kubeinfer-operator"}
    off = handlers.build_registry(make_settings(leaderworkerset="off"), api=FakeApi())
    assert "child-leaderworkersets" not in {h.id for h in off._watching.get_all_handlers()}


def test_kopf_settings():
    s = handlers.kopf_settings(make_settings())
    assert s.peering.standalone and s.scanning.disabled
    assert s.persistence.progress_storage.prefix == "kubeinfer.io"
    assert s.persistence.finalizer == "kubeinfer.io/finalizer"
    assert s.posting.level == logging.WARNING
    # every watch is filtered by the API server on the operator's label, not cluster-wide
    selectors = {(k.group, k.any_name): v for k, v in s.watching.label_selectors.items()}
    assert selectors == {(g, p): "app.kubernetes.io/managed-by=kubeinfer-operator" for g, p in (
        ("", "pods"), ("apps", "deployments"), ("apps", "statefulsets"), ("", "services"),
        ("policy", "poddisruptionbudgets"), ("leaderworkerset.x-k8s.io", "leaderworkersets"),
        ("batch", "jobs"), ("", "persistentvolumeclaims"))}
    assert max(s.networking.error_backoffs) <= 5
    assert max(s.batching.error_delays) <= 10  # throttled objects come back within 10 s
    assert handlers._run_kwargs(make_settings()) == {
        "standalone": True, "clusterwide": True, "liveness_endpoint": "http://0.0.0.0:8080/healthz"}
    assert handlers._run_kwargs(make_settings(namespaces=("a",), liveness_port=0)) == {
        "standalone": True, "namespaces": ["a"]}


def test_retry_delay_is_short():
    assert [handlers.retry_delay(r) for r in (0, 1, 2, 3, 50)] == [1, 2, 4, 5, 5]


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


def test_api_errors_apply_the_rest_and_retry_soon(events):
    api = FakeApi()
    api.fail[("GET", "Deployment")] = ApiError(500, "InternalError", "etcd timeout")
    on_change = handler(handlers.build_registry(make_settings(), api=api), "reconcile")
    patch = kopf.Patch()
    with pytest.raises(kopf.TemporaryError) as info:
        on_change(body=inference_service(), patch=patch, logger=logging.getLogger(), retry=3)
    assert info.value.delay == 5
    assert "InferenceService ns/llm" in str(info.value) and "list Deployments: 500" in str(info.value)
    # what could be applied was, and recorded
    assert api.kinds() == [("PodDisruptionBudget", "llm"), ("Service", "llm")]
    assert events.count(("Normal", "Created")) == 2 and patch["status"]["phase"] == "Pending"
    with pytest.raises(kopf.TemporaryError):   # the resync timer retries soon the same way
        api.fail[("POST", "Deployment")] = ApiError(503, "ServiceUnavailable", "try later")
        handler(handlers.build_registry(make_settings(), api=api), "resync")(
            body=inference_service(), patch=kopf.Patch(), logger=logging.getLogger(), retry=0)
    handler(handlers.build_registry(make_settings(), api=api), "resync")(
        body=inference_service(), patch=kopf.Patch(), logger=logging.getLogger(), retry=1)
    assert ("Deployment", "llm") in api.kinds()


def test_deleted_child_is_recreated_with_events_and_status(events):
    api = FakeApi()
    body = reconciled(api, events)
    status_before = dict(body["status"])
    del api.objects[("Service", "ns", "llm")]
    registry = handlers.build_registry(make_settings(), api=api)
    api.calls.clear()
    handler(registry, "child-services")(type="DELETED", body={"kind": "Service", "metadata": {
        "name": "llm", "namespace": "ns", "labels": {"kubeinfer.io/inferenceservice": "llm"}}},
        logger=logging.getLogger())
    assert ("Service", "llm") in api.kinds()
    assert events == [("Normal", "Created")]   # the restore is visible in `kubectl describe`
    assert status_before["phase"] == "Pending"
    # the status was already right: no patch; now change what it depends on and restore again
    assert not [c for c in api.calls if c[0] == "PATCH"]
    engine_pod(api, "llm-a", ready=True)
    del api.objects[("Service", "ns", "llm")]
    handler(registry, "child-services")(type="DELETED", body={"kind": "Service", "metadata": {
        "name": "llm", "namespace": "ns", "labels": {"kubeinfer.io/inferenceservice": "llm"}}},
        logger=logging.getLogger())
    assert api.objects[("InferenceService", "ns", "llm")]["status"]["phase"] == "Ready"
    assert ("PATCH", "/apis/kubeinfer.io/v1alpha1/namespaces/ns/inferenceservices/llm/status") in api.calls


def test_a_failed_restore_names_the_inference_service_and_the_child(events, caplog):
    api = FakeApi()
    reconciled(api, events)
    del api.objects[("Service", "ns", "llm")]
    api.fail[("POST", "Service")] = ApiError(500, "InternalError", "etcd timeout")
    with caplog.at_level(logging.WARNING):
        handler(handlers.build_registry(make_settings(), api=api), "child-services")(
            type="DELETED", body={"kind": "Service", "metadata": {
                "name": "llm", "namespace": "ns", "labels": {"kubeinfer.io/inferenceservice": "llm"}}},
            logger=logging.getLogger())
    assert "InferenceService ns/llm: restoring the deleted Service llm" in caplog.text
    assert "create Service llm: 500 InternalError: etcd timeout" in caplog.text


# --- status on pod and workload events ---------------------------------------------------------------

def reconciled(api: FakeApi, events: list, **spec) -> dict:
    """An InferenceService stored with the status its create handler wrote; events cleared."""
    body = inference_service(spec)
    api.put_object(body)
    handler(handlers.build_registry(make_settings(), api=api), "reconcile")(
        body=body, patch=(p := kopf.Patch()), logger=logging.getLogger(), retry=0)
    api.objects[("InferenceService", "ns", "llm")]["status"] = dict(p["status"])
    events.clear()
    return api.objects[("InferenceService", "ns", "llm")]


def engine_pod(api: FakeApi, name: str, *, ready: bool = False, crash: bool = False) -> None:
    template = api.objects[("Deployment", "ns", "llm")]["spec"]["template"]
    cs = {"name": "engine", "ready": ready, "restartCount": 0, "state": {"running": {}}}
    if crash:
        cs.update(restartCount=4, state={"waiting": {"reason": "CrashLoopBackOff"}},
                  lastState={"terminated": {"exitCode": 1, "message": "Error: boom"}})
    api.put_object({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": "ns", "labels": dict(template["metadata"]["labels"])},
        "status": {"phase": "Running", "containerStatuses": [cs], "conditions": [
            {"type": "Ready", "status": "True" if ready else "False"}]}})


def follower(api: FakeApi, window: float = 0.0) -> handlers.StatusFollower:
    return handlers.StatusFollower(api, make_settings(), LwsDiscovery("off"), window=window)


def status_patches(api: FakeApi) -> list[tuple[str, str]]:
    return [c for c in api.calls if c[0] == "PATCH"]


def test_refresh_follows_a_pod_turning_ready_and_then_patches_nothing(events):
    api = FakeApi()
    assert reconciled(api, events)["status"]["phase"] == "Pending"
    engine_pod(api, "llm-a", ready=True)
    api.calls.clear()
    assert follower(api).refresh("ns", "llm") is True
    status = api.objects[("InferenceService", "ns", "llm")]["status"]
    assert (status["phase"], status["readyReplicas"]) == ("Ready", 1)
    assert events == [("Normal", "Ready")]
    assert status_patches(api) == [
        ("PATCH", "/apis/kubeinfer.io/v1alpha1/namespaces/ns/inferenceservices/llm/status")]
    assert not [c for c in api.calls if c[0] not in ("GET", "PATCH")]   # reads only, besides the status
    api.calls.clear()
    for _ in range(3):   # the same pods again: nothing to write
        assert follower(api).refresh("ns", "llm") is False
    assert status_patches(api) == [] and events == [("Normal", "Ready")]


def test_refresh_reports_a_crash_loop(events):
    api = FakeApi()
    reconciled(api, events, replicas=2)
    engine_pod(api, "llm-a", ready=True)
    engine_pod(api, "llm-b", crash=True)
    assert follower(api).refresh("ns", "llm") is True
    status = api.objects[("InferenceService", "ns", "llm")]["status"]
    assert status["phase"] == "Degraded" and events == [("Warning", "CrashLoop")]
    engine_pod(api, "llm-a", crash=True)
    assert follower(api).refresh("ns", "llm") is True
    assert api.objects[("InferenceService", "ns", "llm")]["status"]["phase"] == "Failed"


def test_refresh_leaves_a_generation_the_reconcile_has_not_handled(events):
    api = FakeApi()
    reconciled(api, events)["metadata"]["generation"] = 2   # spec edited; the update handler is due
    engine_pod(api, "llm-a", ready=True)
    api.calls.clear()
    assert follower(api).refresh("ns", "llm") is False
    assert [m for m, _ in api.calls] == ["GET"] and events == []


def test_refresh_reads_again_after_a_conflict(events):
    api = FakeApi()
    reconciled(api, events)
    engine_pod(api, "llm-a", ready=True)
    api.fail[("PATCH", "InferenceService")] = ApiError(409, "Conflict", "the object has been modified")
    api.calls.clear()
    assert follower(api).refresh("ns", "llm") is True
    gets = [p for m, p in api.calls if m == "GET" and p.endswith("/inferenceservices/llm")]
    assert len(gets) == 2 and len(status_patches(api)) == 2 and events == [("Normal", "Ready")]


def test_refresh_of_a_gone_or_deleting_service_does_nothing(events):
    api = FakeApi()
    assert follower(api).refresh("ns", "llm") is False
    reconciled(api, events)["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    engine_pod(api, "llm-a", ready=True)
    assert follower(api).refresh("ns", "llm") is False and status_patches(api) == []


def test_a_burst_of_events_is_one_refresh_and_events_during_one_are_one_more():
    f = follower(FakeApi(), window=0.05)
    refreshed: list[str] = []

    def slow_refresh(namespace: str, name: str) -> bool:
        refreshed.append(name)
        time.sleep(0.2)
        return True

    f.refresh = slow_refresh
    log = logging.getLogger()

    async def scenario() -> None:
        for _ in range(20):
            f.follow("ns", "llm", log)
        for _ in range(5):
            f.follow("ns", "other", log)
        f.follow("ns", "", log)               # a pod without the label: nothing to refresh
        assert len(f._tasks) == 2             # follow returned at once; one refresh due per service
        await f.settle()
        assert sorted(refreshed) == ["llm", "other"]
        refreshed.clear()
        f.follow("ns", "llm", log)
        await asyncio.sleep(0.15)             # the window is over, the refresh is running: 5 more events
        for _ in range(5):
            f.follow("ns", "llm", log)
        assert refreshed == ["llm"]           # they only asked for another round ...
        await f.settle()
        assert refreshed == ["llm", "llm"]    # ... which ran once, after the first
        assert f._busy == set() and f._again == set()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_a_failed_refresh_is_logged_and_the_next_event_refreshes_again(caplog):
    api = FakeApi()
    api.fail[("GET", "InferenceService")] = ApiError(500, "InternalError", "etcd timeout")
    f = follower(api)

    async def scenario() -> None:
        f.follow("ns", "llm", logging.getLogger())
        await f.settle()
        f.follow("ns", "llm", logging.getLogger())   # answered now: no such InferenceService, nothing to do
        await f.settle()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert "etcd timeout" in caplog.text and "resync timer" in caplog.text
    assert [m for m, p in api.calls if p.endswith("/inferenceservices/llm")] == ["GET", "GET"]


# --- the autoscale timer -----------------------------------------------------------------------

def _engine_pod(name: str, ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns",
                         "labels": {"app.kubernetes.io/name": "kubeinfer", "kubeinfer.io/inferenceservice": "llm"}},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}


def _autoscale_setup(spec: dict, load: float):
    from kubeinfer.operator.autoscale import Autoscaler

    api, scraped = FakeApi(), []
    api.put_object(inference_service(spec))
    api.put_object(_engine_pod("llm-a", "10.0.0.1"))

    def scrape(ip):
        scraped.append(ip)
        return load

    scaler = Autoscaler(api, "img", scrape=scrape)
    registry = handlers.build_registry(make_settings(), api=api, autoscaler=scaler)
    return api, scraped, handler(registry, "autoscale")


def test_autoscale_timer_patches_spec_replicas_and_posts_the_event(monkeypatch):
    posted = []
    monkeypatch.setattr(kopf, "event", lambda body, *, type, reason, message: posted.append((type, reason, message)))
    api, scraped, autoscale = _autoscale_setup(
        {"replicas": 1, "autoscaling": {"maxReplicas": 3, "targetRequests": 4}}, load=10)
    body = api.objects[("InferenceService", "ns", "llm")]
    autoscale(body=dict(body), logger=logging.getLogger())
    assert scraped == ["10.0.0.1"]
    assert api.objects[("InferenceService", "ns", "llm")]["spec"]["replicas"] == 3
    [(type_, reason, message)] = posted
    assert (type_, reason) == ("Normal", "ScaledUp")
    assert "load 10 requests, target 4 per replica" in message


def test_autoscale_timer_runs_only_with_autoscaling(events):
    assert handlers.has_autoscaling(spec={"autoscaling": {"maxReplicas": 2}})
    assert not handlers.has_autoscaling(spec={"replicas": 2})
    assert not handlers.has_autoscaling(spec={})
    api, scraped, autoscale = _autoscale_setup({"replicas": 2}, load=100)
    # kopf's `when` filter keeps the timer off; called anyway, it reads and writes nothing
    autoscale(body=dict(api.objects[("InferenceService", "ns", "llm")]), logger=logging.getLogger())
    assert scraped == [] and events == []
    assert not any(m == "PATCH" for m, _ in api.calls)


def test_autoscale_timer_survives_api_errors(events, caplog):
    api, scraped, autoscale = _autoscale_setup(
        {"replicas": 1, "autoscaling": {"maxReplicas": 3, "targetRequests": 1}}, load=10)
    api.fail[("GET", "Pod")] = ApiError(503, "ServiceUnavailable", "try later")
    with caplog.at_level(logging.WARNING):
        autoscale(body=dict(api.objects[("InferenceService", "ns", "llm")]), logger=logging.getLogger("t"))
    assert "try later" in caplog.text and events == []
