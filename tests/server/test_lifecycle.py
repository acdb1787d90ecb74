"""Loading, load failure, clients that hang up, and many clients at once."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

from kubeinfer.engine.errors import ConfigError
from tests.server.conftest import MODEL_NAME

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell me a long story."}]}


def _success_count(http) -> float:
    lines = [line for line in http.get("/metrics").text.splitlines()
             if line.startswith("vllm:request_success_total{")]
    return sum(float(line.split()[-1]) for line in lines)


def test_503_until_the_model_is_loaded(server_factory, engine_factory):
    gate = threading.Event()

    def slow_factory(config, stat_loggers):
        gate.wait(60)
        return engine_factory(config, stat_loggers)

    server = server_factory(engine_factory=slow_factory, wait_ready=False)
    with server.http() as http:
        r = http.get("/health")
        assert r.status_code == 503
        assert "loading" in r.json()["error"]
        for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", CHAT),
                                   ("POST", "/v1/completions", {"prompt": "hi"}),
                                   ("POST", "/tokenize", {"prompt": "hi"})):
            r = http.request(method, path, json=body)
            assert r.status_code == 503, path
            err = r.json()["error"]
            assert err["code"] == 503 and "loading" in err["message"]
        assert http.get("/version").status_code == 200
        assert http.get("/metrics").status_code == 200
        gate.set()
        server.wait_ready()
        assert http.get("/health").status_code == 200
        assert http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2}).status_code == 200


def test_a_failed_load_is_reported_not_hidden(server_factory):
    message = "The model's max seq len (4096) is larger than the maximum number of tokens that " \
              "can be stored in KV cache (64)."

    def broken_factory(config, stat_loggers):
        raise ConfigError(message)

    server = server_factory(engine_factory=broken_factory, wait_ready=False)
    deadline = time.monotonic() + 10
    while server.state.load_error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.state.load_error == message
    with server.http() as http:
        r = http.get("/health")
        assert r.status_code == 503 and message in r.json()["error"]


def _send_raw(server, path: str, body: dict) -> socket.socket:
    """POST over a bare socket, so the test decides the moment the connection goes away."""
    payload = json.dumps(body).encode()
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def _wait_running(server, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while server.engine.num_unfinished_requests() == 0:
        assert time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.001)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_the_request(server, stream):
    with server.http() as http:
        successes = _success_count(http)
        path = "/v1/chat/completions" if stream else "/v1/completions"
        body = {**CHAT, "stream": True} if stream else {"prompt": "Once upon a time"}
        sock = _send_raw(server, path, {**body, "max_tokens": 200, "ignore_eos": True})
        _wait_running(server)
        if stream:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # headers and the first events
        sock.close()
        server.wait_idle()  # every block back in the pool
        time.sleep(0.05)  # a request that finished instead would be counted by now
        assert _success_count(http) == successes  # aborted, not finished


def test_32_concurrent_streams_each_get_all_their_tokens(server):
    num_requests, max_tokens = 32, 12

    async def one(client, i: int) -> tuple[int, int]:
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": f"Request number {i}"}],
            max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            temperature=1.0, seed=i, extra_body={"ignore_eos": True})
        usage, finish = None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
        assert finish == "length"
        return usage.completion_tokens, usage.prompt_tokens

    async def run_all():
        client = server.async_client()
        try:
            return await asyncio.gather(*(one(client, i) for i in range(num_requests)))
        finally:
            await client.close()

    results = asyncio.run(run_all())
    assert [c for c, _ in results] == [max_tokens] * num_requests
    server.wait_idle()
