"""The router over HTTP: routing by model name, errors in OpenAI's shape, streaming without
buffering, holding requests until a replica appears, retry before the first byte."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.router.conftest import backend, free_port, wait_for


def chat(model: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


def test_two_models_answer_by_name(make_router, make_upstream):
    a, b = make_upstream("a"), make_upstream("b")
    router = make_router([backend("alpha", a), backend("beta", b)])
    client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="secret", max_retries=0)
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "beta"]
    with router.http() as http:
        for model, name in (("alpha", "a"), ("beta", "b"), ("alpha", "a")):
            r = http.post("/v1/chat/completions?x=1", json=chat(model),
                          headers={"Authorization": "Bearer secret"})
            assert r.status_code == 200, r.text
            body = r.json()
            # the body, path, query and credentials reach the replica untouched
            assert (body["served_by"], body["model"], body["query"], body["auth"]) == (
                name, model, "x=1", "Bearer secret")
        assert http.post("/v1/completions", json={"model": "beta", "prompt": "x"}).json()["served_by"] == "b"
        assert http.post("/v1/embeddings", json={"model": "alpha", "input": "x"}).json()["path"] == "/v1/embeddings"
        assert http.get("/v1/models/beta").json()["inferenceservice"] == "is-beta"
        metrics = http.get("/metrics").text
    assert 'kubeinfer_router_requests_total{code="200",model="alpha"} 3.0' in metrics
    assert [len(a.behaviour.bodies), len(b.behaviour.bodies)] == [3, 2]


@pytest.mark.parametrize("send, status, needle", [
    (dict(json=chat("nope")), 404, "`nope` does not exist"),
    (dict(content=b"{not json"), 400, "not valid JSON"),
    (dict(content=b"[1, 2]"), 400, "JSON object"),
    (dict(json={"messages": []}), 400, "'model' is required"),
    (dict(json={"model": 7}), 400, "'model' is required"),
    (dict(content=b"{" + b" " * 5000 + b"}"), 413, "larger than 4096 bytes"),
])
def test_bad_requests_get_openai_errors(make_router, make_upstream, send, status, needle):
    router = make_router([backend("alpha", make_upstream("a"))], max_body_bytes=4096)
    with router.http() as http:
        r = http.post("/v1/chat/completions", **send)
        assert r.status_code == status
        err = r.json()["error"]
        assert needle in err["message"] and err["code"] == status
        assert http.get("/v1/models/nope").status_code == 404
        assert http.post("/v1/nothing-here", json=chat("alpha")).json()["error"]["code"] == 404
        assert http.get("/v1/chat/completions").status_code == 405
        assert http.get("/health").status_code == 200


def test_stream_passes_through_without_buffering(make_router, make_upstream):
    up = make_upstream("a", hold=True)    # sends one chunk, then holds the rest until released
    router = make_router([backend("alpha", up)])
    # a router that buffered would send nothing until the replica's hold ends: the read times out
    with httpx.Client(base_url=router.base_url, timeout=10) as http, \
            http.stream("POST", "/v1/chat/completions", json=chat("alpha", stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        # the first event arrives while the replica still holds the rest: nothing is buffered
        first = next(line for line in lines if line)
        assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["content"] == "a"
        up.behaviour.release.set()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and len(rest) == 2


def test_held_until_a_replica_appears(make_router, make_upstream):
    router = make_router([backend("alpha")], max_queue_wait=60)
    up = make_upstream("a")
    with ThreadPoolExecutor(3) as pool, router.http() as http:
        futures = [pool.submit(lambda: httpx.post(router.base_url + "/v1/chat/completions",
                                                  json=chat("alpha"), timeout=60)) for _ in range(3)]
        wait_for(lambda: http.get("/queue").json()["models"][0]["held"] == 3, "3 held requests")
        assert 'kubeinfer_router_queued_requests{inferenceservice="is-alpha",model="alpha",namespace="ns"} 3.0' \
            in http.get("/metrics").text
        assert not any(f.done() for f in futures)      # held, not failed
        router.source.set([backend("alpha", up)])
        assert [f.result().json()["served_by"] for f in futures] == ["a"] * 3
        assert http.get("/queue").json()["models"][0]["held"] == 0


def test_held_before_the_first_sync_then_unknown_is_404(make_router):
    router = make_router(None, max_queue_wait=60)
    with ThreadPoolExecutor(1) as pool, router.http() as http:
        assert http.get("/health").status_code == 503
        future = pool.submit(lambda: httpx.post(router.base_url + "/v1/chat/completions",
                                                json=chat("ghost"), timeout=60))
        wait_for(lambda: http.get("/queue").json()["models"], "a held request")
        router.source.set([backend("alpha")])
        assert future.result().status_code == 404
        assert http.get("/health").status_code == 200


def test_hold_times_out_with_retry_after_and_the_queue_is_bounded(make_router):
    router = make_router([backend("alpha")], max_queue_wait=0.2, max_queue_size=1, retry_after=7)
    with router.http() as http:
        r = http.post("/v1/chat/completions", json=chat("alpha"))
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        assert "became ready within 0.2 s" in r.json()["error"]["message"]
    full = make_router([backend("alpha")], max_queue_wait=60, max_queue_size=1)
    with ThreadPoolExecutor(1) as pool, full.http() as http:
        held = pool.submit(lambda: httpx.post(full.base_url + "/v1/chat/completions", json=chat("alpha"), timeout=60))
        wait_for(lambda: http.get("/queue").json()["models"][0]["held"] == 1, "a held request")
        r = http.post("/v1/chat/completions", json=chat("alpha"))
        assert r.status_code == 503 and "already waiting" in r.json()["error"]["message"]
        full.source.set([])    # the InferenceService went away: the held request ends as unknown
        assert held.result().status_code == 404


@pytest.mark.parametrize("failing", ["dead", "busy"])
def test_connection_failure_and_503_are_retried_on_another_replica(make_router, make_upstream, failing):
    good = make_upstream("good")
    if failing == "dead":
        bad = f"127.0.0.1:{free_port()}"     # nothing listens there
    else:
        busy = make_upstream("busy")
        busy.behaviour.status = 503
        bad = busy.address
    router = make_router([backend("alpha", bad, good)], max_failures=2, eject_seconds=600)
    with router.http() as http:
        for _ in range(6):
            r = http.post("/v1/chat/completions", json=chat("alpha"))
            assert r.status_code == 200 and r.json()["served_by"] == "good"
        # least-load sent every other request to the failing replica until it failed twice in a
        # row; then it is skipped
        assert router.proxy.outliers.is_ejected(bad)
        if failing == "busy":
            assert len(busy.behaviour.bodies) == 2
        metrics = http.get("/metrics").text
    assert 'kubeinfer_router_ejections_total{model="alpha"} 1.0' in metrics
    assert 'kubeinfer_router_upstream_retries_total{model="alpha",reason=' in metrics


def test_only_one_retry_then_503(make_router, make_upstream):
    a, b = make_upstream("a"), make_upstream("b")
    a.behaviour.status = b.behaviour.status = 503
    router = make_router([backend("alpha", a, b)], retry_after=3)
    with router.http() as http:
        r = http.post("/v1/chat/completions", json=chat("alpha"))
    # the second replica's own 503 is the answer: it may carry the replica's reason
    assert r.status_code == 503 and len(a.behaviour.bodies) + len(b.behaviour.bodies) == 2


def test_a_client_that_leaves_while_held_is_no_longer_counted(make_router):
    router = make_router([backend("alpha")], max_queue_wait=60)
    with ThreadPoolExecutor(1) as pool, router.http() as http:
        # the client gives up after 2 s: its connection closes while the router holds it
        gone = pool.submit(lambda: httpx.post(router.base_url + "/v1/chat/completions", json=chat("alpha"),
                                              timeout=2))
        wait_for(lambda: http.get("/queue").json()["models"][0]["held"] == 1, "a held request")
        with pytest.raises(httpx.TimeoutException):
            gone.result()
        wait_for(lambda: http.get("/queue").json()["models"][0]["held"] == 0, "the held count to drop")
        wait_for(lambda: 'kubeinfer_router_requests_total{code="499",model="alpha"} 1.0' in http.get("/metrics").text,
                 "the request counted as gone")
