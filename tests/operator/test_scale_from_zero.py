"""Scale from zero: the requests the router holds are load (router_queue.py), so minReplicas 0
scales up from no pod at all and back down to zero after the delay without requests."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kubeinfer.operator.autoscale import Autoscaler
from kubeinfer.operator.router_queue import RouterQueue, fetch_queue, parse_queue
from kubeinfer.operator.settings import OperatorSettings
from tests.operator.helpers import FakeApi, inference_service
from tests.operator.test_autoscale import Clock, current, pod


def rows(*entries: tuple[str, str, int]) -> dict:
    return {"models": [{"model": f"m-{name}", "namespace": ns, "inferenceservice": name, "held": held,
                        "in_flight": 5, "ready_replicas": 0} for ns, name, held in entries]}


def test_parse_queue_keeps_held_requests_by_inference_service():
    payload = rows(("ns", "llm", 2), ("ns", "idle", 0), ("other", "llm", 1), ("", "", 4))
    payload["models"] += [{"namespace": "ns", "inferenceservice": "bad", "held": "3"}, "junk"]
    assert parse_queue(payload) == {("ns", "llm"): 2, ("other", "llm"): 1}


@pytest.mark.parametrize("payload", [[], {"models": 3}, {}, "text"])
def test_parse_queue_refuses_other_shapes(payload):
    with pytest.raises(ValueError, match="models"):
        parse_queue(payload)


def test_router_queue_reuses_a_reading_and_counts_an_unreadable_router_as_zero(caplog):
    clock, answers, calls = Clock(), [{("ns", "llm"): 3}, OSError("refused"), OSError("refused"),
                                      {("ns", "llm"): 1}], []

    def fetch(url):
        calls.append(url)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    queue = RouterQueue("http://router:8080", fetch=fetch, clock=clock, max_age=0.5)
    assert queue.held("ns", "llm") == 3 and queue.held("ns", "other") == 0 and len(calls) == 1
    clock.t += 1
    assert queue.held("ns", "llm") == 0
    clock.t += 1
    assert queue.held("ns", "llm") == 0
    assert sum("cannot read the router" in r.message for r in caplog.records) == 1   # once a streak
    clock.t += 1
    assert queue.held("ns", "llm") == 1 and calls == ["http://router:8080"] * 4


def test_fetch_queue_reads_the_routers_queue_endpoint():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(rows(("ns", "llm", 2)) if self.path == "/queue" else {}).encode()
            self.send_response(200 if self.path == "/queue" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert fetch_queue(f"http://127.0.0.1:{server.server_port}/") == {("ns", "llm"): 2}
    finally:
        server.shutdown()
        server.server_close()


class Router:
    """A RouterQueue stand-in whose held counts the test sets."""

    def __init__(self):
        self.counts: dict[tuple[str, str], int] = {}

    def held(self, namespace, name):
        return self.counts.get((namespace, name), 0)


def setup(spec: dict, pods=(), loads=None, router=None):
    api, clock, scraped = FakeApi(), Clock(), []

    def scrape(ip):
        scraped.append(ip)
        return (loads or {})[ip]

    api.put_object(inference_service(spec))
    for p in pods:
        api.put_object(p)
    return api, clock, scraped, Autoscaler(api, "img", scrape=scrape, clock=clock, router=router)


ZERO = {"replicas": 0, "autoscaling": {"minReplicas": 0, "maxReplicas": 3, "targetRequests": 2,
                                       "scaleDownDelaySeconds": 30, "intervalSeconds": 10}}


def test_a_held_request_scales_up_from_zero_within_a_tick():
    router = Router()
    api, clock, scraped, scaler = setup(ZERO, router=router)
    idle = scaler.tick(current(api))
    assert idle.decision.replicas == 0 and not idle.patched and idle.event() is None
    # less than intervalSeconds later: at zero every tick reads the router
    clock.t += 1
    router.counts[("ns", "llm")] = 3
    tick = scaler.tick(current(api))
    assert tick.patched and current(api)["spec"]["replicas"] == 2   # ceil(3 held / 2)
    assert scraped == []                                           # no pod to read at zero
    type_, reason, message = tick.event()
    assert (type_, reason) == ("Normal", "ScaledUp") and "3 held by the router" in message


def test_held_requests_add_to_the_pods_load():
    router = Router()
    spec = {**ZERO, "replicas": 1}
    api, clock, scraped, scaler = setup(spec, [pod("a", "10.0.0.1")], {"10.0.0.1": 2}, router)
    router.counts[("ns", "llm")] = 3
    tick = scaler.tick(current(api))
    assert (tick.load, tick.held, tick.decision.replicas) == (5, 3, 3)


def test_idle_scales_down_to_zero_only_after_the_delay():
    router = Router()
    spec = {**ZERO, "replicas": 1}
    api, clock, scraped, scaler = setup(spec, [pod("a", "10.0.0.1")], {"10.0.0.1": 0}, router)
    assert not scaler.tick(current(api)).patched          # the window opens
    clock.t += 20
    assert not scaler.tick(current(api)).patched          # 20 s of the 30 s
    clock.t += 10
    tick = scaler.tick(current(api))
    assert tick.patched and current(api)["spec"]["replicas"] == 0 and tick.event()[1] == "ScaledDown"


def test_a_request_in_the_window_keeps_the_replica():
    router = Router()
    spec = {**ZERO, "replicas": 1}
    api, clock, scraped, scaler = setup(spec, [pod("a", "10.0.0.1")], {"10.0.0.1": 0}, router)
    scaler.tick(current(api))
    clock.t += 10
    router.counts[("ns", "llm")] = 1    # one request held (e.g. the replica is restarting)
    assert scaler.tick(current(api)).decision.replicas == 1
    router.counts.clear()
    clock.t += 25                       # 25 s since the request: the window restarted then
    assert not scaler.tick(current(api)).patched and current(api)["spec"]["replicas"] == 1


def test_min_replicas_zero_without_a_router_warns_once():
    api, clock, scraped, scaler = setup(ZERO)
    first = scaler.tick(current(api))
    assert first.warning[:2] == ("Warning", "NoRouter") and "--router-url" in first.warning[2]
    clock.t += 1
    assert scaler.tick(current(api)).warning is None
    # one replica at least: no warning needed
    api2, _, _, scaler2 = setup({**ZERO, "autoscaling": {**ZERO["autoscaling"], "minReplicas": 1}})
    assert scaler2.tick(current(api2)).warning is None


@pytest.mark.parametrize("url", ["kubeinfer-router:8080", "ftp://router"])
def test_router_url_must_be_http(url):
    with pytest.raises(ValueError, match="router URL must start with http://"):
        OperatorSettings(router_url=url)


def test_router_url_from_the_environment():
    settings = OperatorSettings.from_env({"KUBEINFER_ROUTER_URL": " http://r.ns.svc:8080/ "})
    assert settings.router_url == "http://r.ns.svc:8080"
    with pytest.raises(ValueError, match="invalid operator setting"):
        OperatorSettings.from_env({"KUBEINFER_ROUTER_URL": "r.ns.svc"})
