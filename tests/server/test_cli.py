"""`kubeinfer serve` as a user runs it: a subprocess, its exit status and what it prints."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kubeinfer.cli", "serve", *args]


def run_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(serve_cmd(*args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def assert_clean_failure(proc: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr


def test_tensor_parallel_2_is_refused_clearly():
    proc = run_serve("--tensor-parallel-size", "2")
    assert_clean_failure(proc, 1, "error: --tensor-parallel-size=2 is not supported")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_gpu_memory_utilization_above_one_is_a_usage_error():
    proc = run_serve("--gpu-memory-utilization", "1.5")
    assert_clean_failure(proc, 2, "--gpu-memory-utilization", "(0, 1]", "1.5")
    assert len(proc.stderr.strip().splitlines()) <= 2  # usage line + the error


def test_bad_port_is_a_usage_error():
    assert_clean_failure(run_serve("--port", "http"), 2, "--port")


def test_max_model_len_beyond_the_kv_cache_exits_with_the_guide_message(tiny_model):
    # 512 bytes of K/V per token in the tiny model: 32 KiB hold 64 tokens, far below 256
    proc = run_serve(str(tiny_model), "--device", "cpu", "--max-model-len", "256",
                     "--kv-cache-memory", "32KiB", "--port", str(free_port()))
    assert_clean_failure(proc, 1, "error: ", "is larger than the maximum number of tokens that can "
                                             "be stored in KV cache")


def test_missing_model_exits_instead_of_hanging(tmp_path):
    proc = run_serve(str(tmp_path / "no-such-model"), "--device", "cpu",
                     "--port", str(free_port()))
    assert_clean_failure(proc, 1, "error: ", "no-such-model")


def _wait_refused(port: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.02)
    return False


def test_sigterm_stops_accepting_and_drains_running_requests(smollm2_dir):
    # SmolLM2 rather than the tiny model: its tokens take long enough (~10 ms each on CPU) that
    # the request is surely still running when the signal arrives.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        serve_cmd(str(smollm2_dir), "--device", "cpu", "--port", str(port), "--host", "127.0.0.1",
                  "--served-model-name", "smol", "--max-model-len", "512",
                  "--kv-cache-memory", "64MiB", "--timeout-graceful-shutdown", "300"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.1)
        events: list[str] = []
        first_event = threading.Event()

        def consume() -> None:
            with httpx.stream("POST", base + "/v1/completions", timeout=300, json={
                    "model": "smol", "prompt": "Once upon a time", "max_tokens": 100,
                    "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}) as resp:
                for line in resp.iter_lines():
                    events.append(line)
                    first_event.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert first_event.wait(60)
        proc.send_signal(signal.SIGTERM)
        assert _wait_refused(port), "new connections were still accepted after SIGTERM"
        assert reader.is_alive(), "the request ended before the server stopped listening"
        reader.join(300)
        data = [json.loads(e[len("data: "):]) for e in events
                if e.startswith("data: ") and e != "data: [DONE]"]
        assert events[-1] == "data: [DONE]" or events[-2] == "data: [DONE]"
        assert data[-1]["usage"]["completion_tokens"] == 100  # the running request finished
        assert proc.wait(timeout=60) == 0
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
