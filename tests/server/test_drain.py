"""SIGTERM's drain: /health turns 503 at once; what the deadline cuts gets an answer, is counted in
one log line, and makes the process exit non-zero."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import httpx
import pytest
import uvicorn

from kubeinfer.engine.server.api import build_app
from kubeinfer.engine.server.drain import CUT_MESSAGE, DrainingServer
from tests.server.conftest import MODEL_NAME, free_port
from tests.server.test_cli import REPO, serve_cmd, wait_healthy

USER = [{"role": "user", "content": "Tell me a long story."}]


def test_health_is_503_the_moment_a_drain_begins(server_factory):
    server = server_factory()
    with server.http() as http:
        assert http.get("/health").status_code == 200
        server.state.drain.begin()  # what the SIGTERM handler does first
        r = http.get("/health")
        assert r.status_code == 503 and "shutting down" in r.json()["error"]


def test_the_signal_handler_begins_the_drain_before_uvicorn_notices(server_factory):
    lifecycle = server_factory(wait_ready=False).state
    server = DrainingServer(uvicorn.Config(build_app(lifecycle)), lifecycle.drain)
    assert not lifecycle.drain.is_draining
    server.handle_exit(signal.SIGTERM, None)
    assert lifecycle.drain.is_draining and server.should_exit


def _in_engine(base: str) -> int:
    text = httpx.get(base + "/metrics", timeout=5).text
    return int(sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{"))))


@pytest.mark.timeout(300)
def test_the_deadline_answers_every_open_request_and_exits_non_zero(tiny_model):
    # --max-num-seqs 1: one request runs, the rest wait, so all are open when SIGTERM comes; a
    # deadline of 0 cuts whatever is open at once.
    num_streams = 4
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        serve_cmd(str(tiny_model), "--device", "cpu", "--port", str(port), "--host", "127.0.0.1",
                  "--served-model-name", MODEL_NAME, "--max-num-seqs", "1",
                  "--timeout-graceful-shutdown", "0", "--disable-log-requests"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_healthy(proc, base)
        streams: list[list[str]] = [[] for _ in range(num_streams)]
        plain: list[httpx.Response] = []
        body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 200, "ignore_eos": True}

        def consume(i: int) -> None:
            with httpx.stream("POST", base + "/v1/chat/completions", timeout=120,
                              json={**body, "stream": True}) as resp:
                streams[i].extend(line for line in resp.iter_lines() if line)

        def post() -> None:
            plain.append(httpx.post(base + "/v1/chat/completions", json=body, timeout=120))

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(num_streams)]
        threads.append(threading.Thread(target=post))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while _in_engine(base) < num_streams + 1:
            assert time.monotonic() < deadline, "the requests never reached the engine"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        try:  # the listener may already be closed; an open one must not say "healthy"
            assert httpx.get(base + "/health", timeout=5).status_code == 503
        except httpx.TransportError:
            pass
        for t in threads:
            t.join(60)
        assert proc.wait(timeout=60) == 1
        log = proc.stdout.read()

        num_cut = 0
        for lines in streams:
            assert lines[-1] == "data: [DONE]", lines[-3:]  # every stream ends well-formed
            last = json.loads(lines[-2].removeprefix("data: "))
            if "error" in last:
                assert last["error"]["code"] == 503 and last["error"]["message"] == CUT_MESSAGE
                num_cut += 1
        (response,) = plain
        if response.status_code != 200:
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["message"] == CUT_MESSAGE
            num_cut += 1
        assert num_cut >= num_streams  # at most the one running request may have finished
        lines = [line for line in log.splitlines() if "graceful shutdown deadline" in line]
        assert len(lines) == 1, log
        counts = re.search(r"cutting (\d+) open stream\(s\).* (\d+) open request\(s\)", lines[0])
        assert int(counts[1]) + int(counts[2]) == num_cut, lines[0]
        assert "Traceback" not in log and "CancelledError" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
