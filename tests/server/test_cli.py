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


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become healthy"
        time.sleep(0.1)


def assert_clean_failure(proc: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr


def test_tensor_parallel_that_does_not_divide_the_heads_is_refused_clearly():
    # the default model, SmolLM2-135M, has 9 attention heads and 3 KV heads
    proc = run_serve("--tensor-parallel-size", "2")
    assert_clean_failure(proc, 1, "error: --tensor-parallel-size=2 does not divide the model's "
                                  "num_attention_heads (9); use one of [1, 3]")
    assert proc.stderr.count("does not divide") == 1  # said once, found when the model's config is read


def test_a_pipeline_partition_that_does_not_fit_is_refused_clearly():
    proc = run_serve("--pipeline-parallel-size", "2", "--pp-layer-partition", "1,2,3")
    assert_clean_failure(proc, 1, "error: --pp-layer-partition (KUBEINFER_PP_LAYER_PARTITION) "
                                  "1,2,3 names 3 stages but --pipeline-parallel-size is 2")
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


def test_sigterm_stops_accepting_and_drains_running_requests(tiny_model):
    # One request runs at a time (--max-num-seqs 1), so of the several sent at once most are still
    # queued or running when the signal arrives; all must complete.
    num_requests, max_tokens = 4, 100
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        serve_cmd(str(tiny_model), "--device", "cpu", "--port", str(port), "--host", "127.0.0.1",
                  "--served-model-name", "tiny", "--max-num-seqs", "1",
                  "--timeout-graceful-shutdown", "300", "--disable-log-requests"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_healthy(proc, base)
        events: list[list[str]] = [[] for _ in range(num_requests)]
        first_event = threading.Event()

        def consume(i: int) -> None:
            with httpx.stream("POST", base + "/v1/completions", timeout=300, json={
                    "model": "tiny", "prompt": f"Once upon a time {i}", "max_tokens": max_tokens,
                    "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}) as resp:
                for line in resp.iter_lines():
                    if line:
                        events[i].append(line)
                        first_event.set()

        readers = [threading.Thread(target=consume, args=(i,)) for i in range(num_requests)]
        for r in readers:
            r.start()
        assert first_event.wait(60)
        time.sleep(0.05)  # let every request's connection reach the server
        proc.send_signal(signal.SIGTERM)
        assert _wait_refused(port), "new connections were still accepted after SIGTERM"
        assert any(r.is_alive() for r in readers), "all requests ended before the server stopped"
        for r in readers:
            r.join(300)
        for lines in events:
            assert lines[-1] == "data: [DONE]", lines[-3:]
            usage = json.loads(lines[-2][len("data: "):])["usage"]
            assert usage["completion_tokens"] == max_tokens  # drained, not cut off
        assert proc.wait(timeout=60) == 0
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_override_generation_config_bad_json_is_a_usage_error():
    proc = run_serve("--override-generation-config", "{temperature: 0.2")
    assert_clean_failure(proc, 2, "not valid JSON", '{"temperature": 0.2, "top_p": 0.9}')


def test_override_generation_config_unknown_key_names_the_allowed_ones(tiny_model):
    proc = run_serve(str(tiny_model), "--override-generation-config", '{"temprature": 0.2}')
    assert_clean_failure(proc, 1, "unknown keys ['temprature']", "temperature, top_p")


def _descendants(pid: int) -> list[int]:
    """Processes below pid (children, and theirs: a CPU rank is forked by multiprocessing's fork
    server), from /proc (Linux)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_tensor_parallel_server_with_an_api_key_from_the_environment(tiny_model):
    """One server start for two things a user runs: the API key from $KUBEINFER_API_KEY, and a
    tensor-parallel server that answers and stops its workers on SIGTERM."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        serve_cmd(str(tiny_model), "--device", "cpu", "--port", str(port), "--host", "127.0.0.1",
                  "--served-model-name", "tiny", "--tensor-parallel-size", "2"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "KUBEINFER_API_KEY": "s3cret"})
    auth = {"Authorization": "Bearer s3cret"}
    try:
        wait_healthy(proc, base)
        assert httpx.get(base + "/v1/models").status_code == 401
        assert httpx.get(base + "/v1/models", headers=auth).status_code == 200
        children = _descendants(proc.pid)
        assert len(children) >= 2  # the worker, and multiprocessing's resource tracker (and fork server)
        resp = httpx.post(base + "/v1/completions", timeout=60, headers=auth, json={
            "model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 8
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert "Traceback" not in out and "tensor parallel: 2 ranks" in out
        deadline = time.monotonic() + 10
        while any(_running(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(c) for c in children)  # no orphaned worker keeps a GPU
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_an_embedding_model(minilm_dir):
    from tests.fixtures.tiny_bert import reference

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        serve_cmd(str(minilm_dir), "--device", "cpu", "--port", str(port), "--host", "127.0.0.1",
                  "--served-model-name", "minilm"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_healthy(proc, base)
        resp = httpx.post(base + "/v1/embeddings", timeout=60,
                          json={"model": "minilm", "input": ["Hello world", "a cat"]})
        assert resp.status_code == 200, resp.text
        got = [d["embedding"] for d in resp.json()["data"]]
        expected = reference(minilm_dir, ["Hello world", "a cat"]).tolist()
        assert all(abs(a - b) < 1e-5 for g, e in zip(got, expected) for a, b in zip(g, e))
        chat = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": "minilm", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "/v1/embeddings" in chat.json()["error"]["message"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert "Traceback" not in out and "pooling runner: MEAN pooling, normalize=True" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_generate_runner_on_an_embedding_model_is_refused_clearly(minilm_dir):
    proc = run_serve(str(minilm_dir), "--device", "cpu", "--runner", "generate",
                     "--port", str(free_port()))
    assert_clean_failure(proc, 1, "error: BertModel is an embedding or classification model",
                         "--runner pooling")


def test_pooler_config_bad_json_is_a_usage_error():
    proc = run_serve("--pooler-config", "{pooling_type: MEAN")
    assert_clean_failure(proc, 2, "not valid JSON", '"pooling_type": "MEAN"')


@pytest.mark.parametrize("flags,says", [
    (["--tool-call-parser", "nope"], "choose one of hermes, llama3_json, mistral, pythonic"),
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser"),
    (["--reasoning-parser", "nope"], "choose one of deepseek_r1, qwen3"),
    (["--reasoning-parser", "qwen3"], "does not reason in that format"),
])
def test_tool_and_reasoning_flags_are_checked_at_start(tiny_model, flags, says):
    proc = run_serve(str(tiny_model), "--device", "cpu", *flags)
    assert_clean_failure(proc, 1, says)
