"""`EndpointTable`: which InferenceService serves each model name, and its ready replicas.

A source writes the table (`EndpointSliceWatcher` in a cluster, `StaticSource` in tests and for
`--static`); the proxy reads it. Every write replaces the whole picture and wakes the requests held
for a model with no ready replica. Everything here runs on the router's event loop; a source that
lives in a thread posts its writes with `loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Endpoint:
    """One replica's HTTP address, "host:port" (an IPv6 host in brackets)."""

    address: str

    @property
    def url(self) -> str:
        return f"http://{self.address}"


@dataclass(frozen=True)
class Backend:
    """What serves one model name: an InferenceService, how to balance it, its ready replicas."""

    model: str
    namespace: str
    inference_service: str
    strategy: str = "least-load"
    endpoints: tuple[Endpoint, ...] = field(default=())
    # prefix-hash's parameters from spec.loadBalancing.prefixHash; None: the router's own
    prefix_chars: int | None = None
    prefix_tokens: int | None = None
    load_factor: float | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.inference_service}"


class EndpointTable:
    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}
        self._synced = False
        self._waiters: list[asyncio.Future] = []

    @property
    def synced(self) -> bool:
        """False until a source wrote the table once: before that an unknown model may exist."""
        return self._synced

    def get(self, model: str) -> Backend | None:
        return self._backends.get(model)

    def backends(self) -> list[Backend]:
        return [self._backends[m] for m in sorted(self._backends)]

    def replace(self, backends: Iterable[Backend]) -> None:
        """The whole table. Two InferenceServices serving one name: the first by namespace/name
        wins (deterministic across router replicas) and the clash is logged."""
        table: dict[str, Backend] = {}
        for b in sorted(backends, key=lambda b: b.key):
            if b.model in table:
                log.warning("model %r is served by both %s and %s; routing it to %s",
                            b.model, table[b.model].key, b.key, table[b.model].key)
                continue
            table[b.model] = dataclasses.replace(b, endpoints=tuple(sorted(set(b.endpoints))))
        self._backends = table
        self._synced = True
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_for_change(self, timeout: float) -> None:
        """Until the next `replace` or `timeout` seconds, whichever comes first."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)


class StaticSource:
    """A fixed table (tests, `kubeinfer router --static`): written once at start."""

    def __init__(self, backends: Iterable[Backend]) -> None:
        self._backends = list(backends)

    def start(self, table: EndpointTable, loop: asyncio.AbstractEventLoop) -> None:
        table.replace(self._backends)

    def stop(self) -> None:
        pass
