"""The router in-process (uvicorn in a background thread) in front of fake replicas on 127.0.0.1.

`MutableSource` is the test's endpoint source: `set()` rewrites the routing table from the test's
thread, as the EndpointSlice watcher does from its own.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import httpx
import pytest
import uvicorn

from kubeinfer.router.app import build_app
from kubeinfer.router.config import RouterConfig
from kubeinfer.router.endpoints import Backend, Endpoint, EndpointTable
from tests.router.fake_upstream import Upstream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], object], what: str, timeout: float = 20.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def backend(model: str, *upstreams: Upstream | str, strategy: str = "least-load") -> Backend:
    addrs = [u if isinstance(u, str) else u.address for u in upstreams]
    return Backend(model, "ns", f"is-{model}", strategy, tuple(Endpoint(a) for a in addrs))


class MutableSource:
    def __init__(self, backends: list[Backend] | None) -> None:
        self.initial = backends
        self.table: EndpointTable | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, table: EndpointTable, loop: asyncio.AbstractEventLoop) -> None:
        self.table, self.loop = table, loop
        if self.initial is not None:   # None: stay unsynced, as a watcher before its first list
            table.replace(self.initial)

    def stop(self) -> None:
        pass

    def set(self, backends: list[Backend]) -> None:
        assert self.loop is not None and self.table is not None
        self.loop.call_soon_threadsafe(self.table.replace, backends)


class RunningRouter:
    def __init__(self, config: RouterConfig, backends: list[Backend] | None, source=None) -> None:
        self.source = source or MutableSource(backends)
        self.app = build_app(config, self.source)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=config.port,
                                                    log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = f"http://127.0.0.1:{config.port}"

    @property
    def proxy(self):
        return self.app.state.proxy

    def start(self) -> RunningRouter:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), "the router to start")
        assert self.thread.is_alive(), "the router did not start"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60)


@pytest.fixture
def make_router():
    started: list[RunningRouter] = []

    def make(backends: list[Backend] | None, source=None, **config) -> RunningRouter:
        r = RunningRouter(RouterConfig(port=free_port(), **config), backends, source).start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


@pytest.fixture
def make_upstream():
    started: list[Upstream] = []

    def make(name: str, hold: bool = False) -> Upstream:
        u = Upstream(name, free_port(), hold).start()
        started.append(u)
        return u

    yield make
    for u in started:
        u.stop()
