"""Real uvicorn servers on 127.0.0.1, each in a background thread, driven over HTTP.

Each test module that needs a server starts its own (module scope) so modules stay independent;
the tiny random-weight model loads in well under a second.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from kubeinfer.engine.config import (CacheConfig, DeviceConfig, EngineConfig, ModelConfig,
                                     SchedulerConfig)
from kubeinfer.engine.server.api import build_app
from kubeinfer.engine.server.model_lifecycle import ModelLifecycle

MODEL_NAME = "tiny"
MAX_MODEL_LEN = 256
API_KEY = "test-key"  # what api-key servers are started with


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    state: ModelLifecycle
    server: uvicorn.Server
    thread: threading.Thread
    base_url: str

    @property
    def engine(self) -> Any:
        return self.state.engine

    def client(self, api_key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0,
                             timeout=120, **kw)

    def async_client(self, api_key: str = "none", **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0,
                                  timeout=120, **kw)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=120, **kw)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state.load_error is not None:
                raise RuntimeError(f"server failed to load: {self.state.load_error}")
            if self.state.engine is not None and self.state.engine.is_alive():
                return
            time.sleep(0.02)
        raise TimeoutError("model did not load in time")

    def wait_idle(self, timeout: float = 10) -> None:
        """Until the engine has no requests and every KV block is free again."""
        engine = self.engine
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (engine.num_unfinished_requests() == 0
                    and engine.kv_cache_free_blocks() == engine.kv_cache_num_blocks()):
                return
            time.sleep(0.02)
        raise AssertionError(
            f"engine not idle: {engine.num_unfinished_requests()} unfinished requests, "
            f"{engine.kv_cache_free_blocks()}/{engine.kv_cache_num_blocks()} blocks free")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(state: ModelLifecycle, *, wait_ready: bool = True) -> RunningServer:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    running = RunningServer(state, server, thread, f"http://127.0.0.1:{port}")
    if wait_ready:
        running.wait_ready()
    return running


def tiny_config(model_dir: str, scheduling_policy: str = "fcfs", **model_kw) -> EngineConfig:
    model_kw.setdefault("served_model_name", (MODEL_NAME,))
    model_kw.setdefault("max_model_len", MAX_MODEL_LEN)
    return EngineConfig(
        model=ModelConfig(model=str(model_dir), **model_kw),
        cache=CacheConfig(block_size=16, kv_cache_memory=None, num_gpu_blocks_override=256),
        scheduler=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=64,
                                  scheduling_policy=scheduling_policy),
        device=DeviceConfig(device="cpu"))


@pytest.fixture(scope="session")
def engine_factory():
    """The real engine's loader, as `kubeinfer serve` uses it."""
    from kubeinfer.engine.server.model_lifecycle import default_engine_factory

    return default_engine_factory


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def server_factory(tiny_model, engine_factory):
    """start(api_key=..., engine_factory=..., wait_ready=..., trust_request_chat_template=...,
    **ModelConfig fields) -> a running
    server on the tiny model; every server started is stopped at the end of the module."""
    started: list[RunningServer] = []
    default_factory = engine_factory

    def start(*, api_key: str | None = None, engine_factory=None, wait_ready: bool = True,
              trust_request_chat_template: bool = False, **model_kw) -> RunningServer:
        engine_factory = engine_factory or default_factory
        state = ModelLifecycle(tiny_config(tiny_model, **model_kw), api_key=api_key,
                               engine_factory=engine_factory, log_requests=False,
                               trust_request_chat_template=trust_request_chat_template)
        running = start_server(state, wait_ready=wait_ready)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture(scope="module")
def server(server_factory) -> RunningServer:
    return server_factory()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def http(server):
    with server.http() as c:
        yield c
