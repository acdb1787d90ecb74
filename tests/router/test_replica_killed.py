"""A replica killed mid-load (SIGKILL of its process) costs no request that had not started
streaming: those are retried on the other replica; a stream that had started ends with an error
event and [DONE]. Prefix-hash keeps a conversation on one replica."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.router.conftest import backend, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def doomed_replica():
    """A fake replica in its own process that holds every answer (streams: after one chunk)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.router.fake_upstream", "--port", str(port),
                             "--name", "doomed", "--hold"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})

    def listening() -> bool:
        assert proc.poll() is None, "the doomed replica exited early"
        try:
            return httpx.post(f"http://127.0.0.1:{port}/nowhere", timeout=1).status_code == 404
        except httpx.TransportError:
            return False

    wait_for(listening, "the doomed replica to listen", timeout=60)
    yield proc, f"127.0.0.1:{port}"
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_killed_replica_costs_no_unstarted_request(make_router, make_upstream, doomed_replica):
    proc, doomed = doomed_replica
    survivor = make_upstream("survivor", hold=True)
    router = make_router([backend("alpha", doomed)])
    url = router.base_url + "/v1/chat/completions"
    body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
    in_flight = router.proxy.in_flight
    with ThreadPoolExecutor(7) as pool:
        # one stream that starts on the doomed replica (its first chunk is read before the kill)
        stream_lines: list[str] = []
        started = pool.submit(_stream, url, {**body, "stream": True}, stream_lines)
        wait_for(lambda: in_flight.get(doomed) == 1 and stream_lines, "a started stream on the doomed replica")
        router.source.set([backend("alpha", doomed, survivor)])
        wait_for(lambda: len(router.proxy.table.get("alpha").endpoints) == 2, "the second replica")
        # six requests, least-load alternating: three on each replica, none answered yet
        futures = []
        for i in range(6):
            futures.append(pool.submit(httpx.post, url, json=body, timeout=60))
            wait_for(lambda: in_flight.total() == i + 2, f"request {i} in flight")
        assert in_flight.get(doomed) == 4 and in_flight.get(survivor.address) == 3
        proc.send_signal(signal.SIGKILL)
        survivor.behaviour.release.set()
        answers = [f.result() for f in futures]
        started.result()
    assert [r.status_code for r in answers] == [200] * 6
    assert [r.json()["served_by"] for r in answers] == ["survivor"] * 6
    # the stream had started: it cannot move, it ends with an error event and [DONE]
    assert json.loads(stream_lines[0].removeprefix("data: "))["choices"][0]["delta"]["content"] == "doomed"
    assert "error" in json.loads(stream_lines[-2].removeprefix("data: ")) and stream_lines[-1] == "data: [DONE]"
    # the router lets go of a request after its last byte went out, which the client may see first
    wait_for(lambda: in_flight.total() == 0, "the router to count no request in flight")


def _stream(url: str, body: dict, lines: list[str]) -> None:
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)


def test_prefix_hash_keeps_a_conversation_on_its_replica(make_router, make_upstream):
    ups = [make_upstream(f"r{i}") for i in range(3)]
    router = make_router([backend("alpha", *ups, strategy="prefix-hash")])
    served: dict[int, set[str]] = {}
    with router.http() as http:
        for conversation in range(12):
            messages = [{"role": "system", "content": "You are helpful."},
                        {"role": "user", "content": f"conversation {conversation}: tell me a story"}]
            for turn in range(3):
                r = http.post("/v1/chat/completions", json={"model": "alpha", "messages": messages})
                served.setdefault(conversation, set()).add(r.json()["served_by"])
                messages += [{"role": "assistant", "content": f"turn {turn}"},
                             {"role": "user", "content": f"and then {turn}?"}]
    assert all(len(names) == 1 for names in served.values()), served
    # different conversations spread over the replicas (a key per conversation, not one for all)
    assert len(set().union(*served.values())) >= 2
