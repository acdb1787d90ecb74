"""Built-in autoscaling: spec.autoscaling parsing, the pure decision, the metrics parser, and the loop
body (Autoscaler.tick) against the fake API with an injected scraper and clock."""
from __future__ import annotations

import copy
import logging

import pytest

from kubeinfer.operator.apply import ApiError
from kubeinfer.operator.autoscale import Autoscaler, Below, decide, parse_load, target_replicas
from kubeinfer.operator.spec import Autoscaling, InvalidSpec
from tests.operator.helpers import FakeApi, inference_service, make_spec

A = Autoscaling(min_replicas=1, max_replicas=5, target_requests=8, scale_down_delay_seconds=300,
                interval_seconds=10)


# --- spec --------------------------------------------------------------------------------------

def test_autoscaling_absent_is_off():
    assert make_spec({}).autoscaling is None
    assert make_spec({"autoscaling": None}).autoscaling is None


def test_autoscaling_defaults():
    assert make_spec({"autoscaling": {"maxReplicas": 4}}).autoscaling == Autoscaling(
        min_replicas=1, max_replicas=4, target_requests=8, scale_down_delay_seconds=300, interval_seconds=10)


def test_autoscaling_all_fields():
    got = make_spec({"autoscaling": {"minReplicas": 2, "maxReplicas": 2, "targetRequests": 3,
                                     "scaleDownDelaySeconds": 0, "intervalSeconds": 1}}).autoscaling
    assert got == Autoscaling(2, 2, 3, 0, 1)


BAD = [
    ({"minReplicas": -1, "maxReplicas": 2}, "spec.autoscaling.minReplicas", "integer >= 0"),
    ({"minReplicas": "1", "maxReplicas": 2}, "spec.autoscaling.minReplicas", "integer >= 0"),
    ({"minReplicas": True, "maxReplicas": 2}, "spec.autoscaling.minReplicas", "integer >= 0"),
    ({"minReplicas": 0, "maxReplicas": 0}, "spec.autoscaling.maxReplicas", "integer >= 1"),
    ({"minReplicas": 2}, "spec.autoscaling.maxReplicas", "is required"),
    ({"maxReplicas": 0}, "spec.autoscaling.maxReplicas", "integer >= 1"),
    ({"maxReplicas": 1.5}, "spec.autoscaling.maxReplicas", "integer >= 1"),
    ({"minReplicas": 3, "maxReplicas": 2}, "spec.autoscaling.maxReplicas", "must be >= spec.autoscaling.minReplicas (3)"),
    ({"maxReplicas": 2, "targetRequests": 0}, "spec.autoscaling.targetRequests", "integer >= 1"),
    ({"maxReplicas": 2, "targetRequests": "8"}, "spec.autoscaling.targetRequests", "integer >= 1"),
    ({"maxReplicas": 2, "scaleDownDelaySeconds": -1}, "spec.autoscaling.scaleDownDelaySeconds", "integer >= 0"),
    ({"maxReplicas": 2, "intervalSeconds": 0}, "spec.autoscaling.intervalSeconds", "integer >= 1"),
    ({"maxReplicas": 2, "scaleToZero": True}, "spec.autoscaling.scaleToZero", "allowed fields are minReplicas"),
]


@pytest.mark.parametrize("autoscaling,field,allowed", BAD, ids=[f"{f}={a}" for a, f, _ in BAD])
def test_bad_autoscaling_is_named(autoscaling, field, allowed):
    with pytest.raises(InvalidSpec) as e:
        make_spec({"autoscaling": autoscaling})
    problems = {p.field: p.allowed for p in e.value.problems}
    assert field in problems, e.value
    assert allowed in problems[field]


def test_autoscaling_not_a_mapping():
    with pytest.raises(InvalidSpec, match="spec.autoscaling: got 3; must be a mapping"):
        make_spec({"autoscaling": 3})


# --- decide ------------------------------------------------------------------------------------

def test_target_is_ceil_of_load_over_target_clamped():
    assert [target_replicas(load, A) for load in (0, 1, 8, 9, 16, 17, 1000)] == [1, 1, 1, 2, 2, 3, 5]
    assert target_replicas(-3, A) == 1   # nonsense from a broken exporter is no load


def test_scales_up_at_once():
    d = decide(1, 30, A, None, now=0)
    assert (d.replicas, d.below) == (4, None)
    assert "load 30 requests, target 8 per replica -> 4" in d.reason


def test_scale_up_resets_a_pending_scale_down():
    d = decide(3, 40, A, Below(since=0, peak=1), now=100)
    assert (d.replicas, d.below) == (5, None)


def test_steady_load_keeps_the_count():
    assert decide(2, 16, A, None, now=0) == decide(2, 16, A, None, now=0)
    assert decide(2, 16, A, None, now=0).replicas == 2 and decide(2, 16, A, None, now=0).below is None


def test_scales_down_only_after_the_delay_to_the_peak_of_the_window():
    d = decide(4, 0, A, None, now=1000)          # load gone: window opens, count kept
    assert (d.replicas, d.below) == (4, Below(1000, 1))
    assert "waiting 300s more" in d.reason
    d = decide(4, 20, A, d.below, now=1100)      # a smaller dip later: still below 4, peak 3
    assert (d.replicas, d.below) == (4, Below(1000, 3))
    d = decide(4, 0, A, d.below, now=1299)       # not yet
    assert d.replicas == 4
    d = decide(4, 0, A, d.below, now=1300)       # held 300 s: down to the highest target seen
    assert (d.replicas, d.below) == (3, None)
    d = decide(3, 0, A, d.below, now=1310)       # and a new window for the rest
    assert (d.replicas, d.below) == (3, Below(1310, 1))


def test_zero_delay_scales_down_at_once():
    fast = Autoscaling(1, 5, 8, 0, 10)
    assert decide(5, 0, fast, None, now=0).replicas == 1


def test_load_zero_goes_to_min_replicas_after_the_delay():
    a = Autoscaling(2, 5, 8, 60, 10)
    d = decide(5, 0, a, None, now=0)
    assert d.replicas == 5
    assert decide(5, 0, a, d.below, now=60).replicas == 2


def test_below_min_is_corrected_at_once():
    a = Autoscaling(2, 5, 8, 300, 10)
    d = decide(0, 0, a, None, now=0)
    assert (d.replicas, d.below) == (2, None)
    assert "0 is outside [2, 5]" in d.reason
    assert decide(1, 30, a, None, now=0).replicas == 4   # below min and loaded: straight to the load


def test_above_max_is_corrected_at_once():
    d = decide(9, 1000, A, None, now=0)
    assert (d.replicas, d.below) == (5, None)
    d = decide(9, 0, A, None, now=0)             # clamped to max at once, the rest waits for the delay
    assert (d.replicas, d.below) == (5, Below(0, 1))
    assert "9 is outside [1, 5]" in d.reason


# --- metrics -----------------------------------------------------------------------------------

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 3.0
vllm:num_requests_running{model_name="b"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 4.0
# HELP vllm:num_preemptions_total Preemptions.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{model_name="a"} 100.0
"""


def test_parse_load_sums_running_and_waiting_over_models():
    assert parse_load(METRICS) == 9.0
    assert parse_load("") == 0.0


def test_parse_load_of_the_engines_own_metrics():
    from prometheus_client import CollectorRegistry, generate_latest

    from kubeinfer.engine.server.metrics import PrometheusStatLogger

    registry = CollectorRegistry()
    exporter = PrometheusStatLogger("m", registry)
    exporter.running.set(2)
    exporter.waiting.set(5)
    assert parse_load(generate_latest(registry).decode()) == 7.0


# --- the loop body -----------------------------------------------------------------------------

def pod(name: str, ip: str | None, ready: bool = True, service: str = "llm", deleting: bool = False) -> dict:
    meta = {"name": name, "namespace": "ns",
            "labels": {"app.kubernetes.io/name": "kubeinfer", "kubeinfer.io/inferenceservice": service,
                       "app.kubernetes.io/managed-by": "kubeinfer-operator"}}
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    status = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": status}


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def setup(spec: dict, pods: list[dict], loads: dict[str, float]):
    api, clock, scraped = FakeApi(), Clock(), []

    def scrape(ip):
        scraped.append(ip)
        value = loads[ip]
        if isinstance(value, Exception):
            raise value
        return value

    api.put_object(inference_service(spec))
    for p in pods:
        api.put_object(p)
    return api, clock, scraped, Autoscaler(api, "img", scrape=scrape, clock=clock)


def current(api) -> dict:
    return api.objects[("InferenceService", "ns", "llm")]


def test_tick_scrapes_ready_pods_and_patches_spec_replicas():
    spec = {"replicas": 1, "autoscaling": {"maxReplicas": 4, "targetRequests": 2}}
    pods = [pod("a", "10.0.0.1"), pod("b", "10.0.0.2"), pod("c", "10.0.0.3", ready=False),
            pod("d", None), pod("e", "10.0.0.5", deleting=True), pod("x", "10.0.9.9", service="other")]
    api, clock, scraped, scaler = setup(spec, pods, {"10.0.0.1": 3, "10.0.0.2": 2})
    tick = scaler.tick(current(api))
    assert sorted(scraped) == ["10.0.0.1", "10.0.0.2"]
    assert (tick.load, tick.pods, tick.decision.replicas, tick.patched) == (5, 2, 3, True)
    assert current(api)["spec"]["replicas"] == 3
    assert current(api)["spec"]["autoscaling"] == spec["autoscaling"]   # a merge patch
    assert ("PATCH", "/apis/kubeinfer.io/v1alpha1/namespaces/ns/inferenceservices/llm") in api.calls
    type_, reason, message = tick.event()
    assert (type_, reason) == ("Normal", "ScaledUp")
    assert "spec.replicas 1 -> 3" in message and "load 5 requests, target 2 per replica" in message


def test_tick_runs_once_per_interval_and_scales_down_after_the_delay():
    spec = {"replicas": 3, "autoscaling": {"maxReplicas": 4, "scaleDownDelaySeconds": 30, "intervalSeconds": 10}}
    api, clock, scraped, scaler = setup(spec, [pod("a", "10.0.0.1")], {"10.0.0.1": 0})
    first = scaler.tick(current(api))
    assert first.decision.replicas == 3 and not first.patched and first.event() is None
    clock.t += 5
    assert scaler.tick(current(api)) is None       # intervalSeconds not passed: nothing read
    assert len(scraped) == 1
    clock.t += 25                                  # 30 s after the window opened
    tick = scaler.tick(current(api))
    assert tick.patched and current(api)["spec"]["replicas"] == 1
    assert tick.event()[1] == "ScaledDown"


def test_unreadable_metrics_count_as_zero_and_are_logged_once_per_streak(caplog):
    spec = {"replicas": 1, "autoscaling": {"maxReplicas": 4, "targetRequests": 1, "intervalSeconds": 1}}
    loads = {"10.0.0.1": OSError("connection refused"), "10.0.0.2": 2}
    api, clock, scraped, scaler = setup(spec, [pod("a", "10.0.0.1"), pod("b", "10.0.0.2")], loads)
    with caplog.at_level(logging.WARNING, logger="kubeinfer.operator.autoscale"):
        for _ in range(3):
            tick = scaler.tick(current(api))
            clock.t += 1
        assert tick.load == 2
        assert sum("cannot read the metrics of pod a" in r.message for r in caplog.records) == 1
        loads["10.0.0.1"] = 1                        # answers again: the streak ends
        scaler.tick(current(api))
        clock.t += 1
        loads["10.0.0.1"] = ValueError("garbage")    # a new streak is logged again
        scaler.tick(current(api))
        assert sum("cannot read the metrics of pod a" in r.message for r in caplog.records) == 2


def test_without_autoscaling_nothing_is_scraped_or_patched():
    api, clock, scraped, scaler = setup({"replicas": 2}, [pod("a", "10.0.0.1")], {"10.0.0.1": 100})
    assert scaler.tick(current(api)) is None
    assert scraped == [] and not any(m == "PATCH" for m, _ in api.calls)
    assert not any(m == "GET" and "pods" in p for m, p in api.calls)


def test_invalid_spec_is_left_to_the_reconcile():
    spec = {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}
    api, clock, scraped, scaler = setup(spec, [pod("a", "10.0.0.1")], {"10.0.0.1": 100})
    assert scaler.tick(current(api)) is None and scraped == []


def test_patch_carries_the_resource_version_so_a_newer_spec_wins():
    spec = {"replicas": 1, "autoscaling": {"maxReplicas": 4, "targetRequests": 1}}
    api, clock, scraped, scaler = setup(spec, [pod("a", "10.0.0.1")], {"10.0.0.1": 3})
    stale = copy.deepcopy(current(api))
    api.objects[("InferenceService", "ns", "llm")]["metadata"]["resourceVersion"] = "changed"
    with pytest.raises(ApiError) as e:
        scaler.tick(stale)
    assert e.value.status == 409


def test_scrape_via_apiserver_reads_the_pods_proxy():
    from kubeinfer.operator.autoscale import Autoscaler, proxy_path
    from tests.operator.helpers import FakeApi, inference_service

    class ProxyApi(FakeApi):
        def __init__(self):
            super().__init__()
            self.paths = []

        def request_text(self, path):
            self.paths.append(path)
            return 'vllm:num_requests_running{model_name="m"} 5\nvllm:num_requests_waiting{model_name="m"} 4\n'

    api = ProxyApi()
    api.put_object(inference_service({"replicas": 1, "autoscaling": {"maxReplicas": 4, "targetRequests": 3}}))
    api.put_object({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "llm-a", "namespace": "ns",
        "labels": {"app.kubernetes.io/name": "kubeinfer", "kubeinfer.io/inferenceservice": "llm"}},
        "status": {"podIP": "10.0.0.9", "conditions": [{"type": "Ready", "status": "True"}]}})

    def no_direct_scrape(ip):
        raise AssertionError("pod-ip scraping in apiserver mode")

    scaler = Autoscaler(api, "img", scrape=no_direct_scrape, scrape_via="apiserver")
    tick = scaler.tick(api.objects[("InferenceService", "ns", "llm")])
    assert api.paths == [proxy_path("ns", "llm-a")] == ["/api/v1/namespaces/ns/pods/llm-a:8000/proxy/metrics"]
    assert (tick.load, tick.decision.replicas) == (9, 3)
