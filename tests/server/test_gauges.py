"""The gauges follow the scheduler, not only its steps: clients that open streams and go away leave
vllm:num_requests_running, vllm:num_requests_waiting and vllm:kv_cache_usage_perc at 0 once their
requests are aborted, with no step after the last abort."""
from __future__ import annotations

import contextlib
import threading
import time

from tests.server.conftest import MODEL_NAME

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def gauges(http) -> dict[str, float]:
    values = {}
    for line in http.get("/metrics").text.splitlines():
        name, _, rest = line.partition("{")
        if name in GAUGES and f'model_name="{MODEL_NAME}"' in rest:
            values[name] = float(line.rsplit(" ", 1)[1])
    assert set(values) == set(GAUGES), values
    return values


def poll(http, done, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        values = gauges(http)
        if done(values) or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def test_gauges_return_to_zero_after_clients_drop_their_streams(server, http, monkeypatch):
    # A tiny model writes 200 tokens in a fraction of a second: 50 ms per step keeps the streams
    # generating while the test opens them all, then the engine holds still (between steps: the
    # gauges show the last step's state) until the test has read the busy gauges, so a slow
    # machine cannot see the streams finish first.
    engine = server.engine.engine
    step = engine.step
    opened, read = threading.Event(), threading.Event()

    def slow_step():
        if opened.is_set():
            read.wait(60)
        time.sleep(0.05)
        return step()
    monkeypatch.setattr(engine, "step", slow_step)
    # as long as the context allows, so the streams are still generating when they are dropped
    body = dict(model=MODEL_NAME, max_tokens=200, stream=True, ignore_eos=True, temperature=0.8)
    with contextlib.ExitStack() as stack:
        for i in range(4):
            clients = stack.enter_context(server.http())
            resp = stack.enter_context(clients.stream(
                "POST", "/v1/completions", json=dict(body, prompt=f"stream {i} " * (3 + i))))
            assert resp.status_code == 200
            next(resp.iter_lines())  # the stream is open and generating
        opened.set()
        try:
            busy = poll(http, lambda v: v["vllm:num_requests_running"] > 0
                        and v["vllm:kv_cache_usage_perc"] > 0)
        finally:
            read.set()
        assert busy["vllm:num_requests_running"] > 0 and busy["vllm:kv_cache_usage_perc"] > 0
    # every client has gone away without reading to the end
    assert poll(http, lambda v: not any(v.values())) == dict.fromkeys(GAUGES, 0.0)
    server.wait_idle()
