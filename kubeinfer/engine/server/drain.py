"""The drain on SIGTERM: /health turns 503 at once, open requests get until the deadline
(--timeout-graceful-shutdown) to finish, and whatever is still open then is cut with an answer.

Kubernetes sends SIGTERM and removes the pod from its Service's endpoints at about the same time;
a readiness probe that turns 503 at once takes it out even where the endpoint update lags. When
the deadline passes, each open stream gets an error event and `data: [DONE]` and each open
non-stream request a 503 with Retry-After, so a client sees a clean error it can retry rather than
a truncated chunked read. One log line gives the count, and the process then exits non-zero
(`cut_count`), so an operator can tell a clean drain from a cut one.

uvicorn does the rest (stop accepting, wait for connections); its own deadline is set a little
after ours (`CUT_GRACE_S`) so the cut answers go out before it would cancel the handlers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Awaitable, TypeVar

import uvicorn

logger = logging.getLogger("kubeinfer.server")

T = TypeVar("T")

# seconds uvicorn waits after our deadline, for the cut answers to be written
CUT_GRACE_S = 5
RETRY_AFTER_S = 1
CUT_MESSAGE = ("The server is shutting down and this request did not finish before its drain "
               "deadline; retry it (another replica will take it).")


class DrainExpired(Exception):
    """The drain deadline passed while this request was open."""


class Drain:
    """The state of one server's drain. `begin()` may be called from a signal handler; the rest
    runs on the event loop."""

    def __init__(self, timeout_s: float = 30):
        self.timeout_s = timeout_s
        self.is_draining = False  # read by /health; set in the signal handler itself
        self.cut_count = 0  # requests and streams answered with the drain error
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expired: asyncio.Event | None = None
        self._num_open = {"stream": 0, "request": 0}
        self._cut_callbacks: set = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called once the server's loop runs (the app's lifespan)."""
        self._loop = loop
        self._expired = asyncio.Event()

    def begin(self) -> None:
        """SIGTERM arrived: /health answers 503 from now on, and the deadline starts."""
        if self.is_draining:
            return
        self.is_draining = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.call_later, self.timeout_s, self._expire)

    @property
    def is_expired(self) -> bool:
        return self._expired is not None and self._expired.is_set()

    def _expire(self) -> None:
        num_streams, num_requests = self._num_open["stream"], self._num_open["request"]
        if num_streams or num_requests:
            logger.warning("graceful shutdown deadline (%gs) passed: cutting %d open stream(s) "
                           "with an error event and [DONE] and %d open request(s) with a 503",
                           self.timeout_s, num_streams, num_requests)
        self._expired.set()
        for cut in list(self._cut_callbacks):
            cut()

    @contextlib.contextmanager
    def _tracked(self, kind: str):
        self._num_open[kind] += 1
        try:
            yield
        finally:
            self._num_open[kind] -= 1

    def _cut(self) -> DrainExpired:
        self.cut_count += 1
        return DrainExpired()

    async def until_expired(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """`items` until the deadline passes, then DrainExpired. Closing this closes `items` (and
        so aborts its engine requests). One pump task per stream, not one per item."""
        if self.is_expired:
            raise self._cut()
        queue: asyncio.Queue = asyncio.Queue()
        end, cut = object(), object()

        async def pump() -> None:
            try:
                async with contextlib.aclosing(items) as it:
                    async for item in it:
                        queue.put_nowait((item, None))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((end, e))
                return
            queue.put_nowait((end, None))

        def on_cut() -> None:
            queue.put_nowait((cut, None))

        task = asyncio.ensure_future(pump())
        self._cut_callbacks.add(on_cut)
        try:
            with self._tracked("stream"):
                while True:
                    item, exc = await queue.get()
                    # checked per item too, so a backlog of a slow reader is not sent first
                    if item is cut or self.is_expired:
                        raise self._cut()
                    if item is end:
                        if exc is not None:
                            raise exc
                        return
                    yield item
        finally:
            self._cut_callbacks.discard(on_cut)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def wait_expired(self) -> None:
        """Returns when the deadline passes (never, unless draining)."""
        if self._expired is None:
            await asyncio.Event().wait()
        await self._expired.wait()

    def track_request(self):
        """Count a non-stream request as open for the expiry's log line."""
        return self._tracked("request")

    def cut_request(self) -> DrainExpired:
        return self._cut()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with the drain started inside the signal handler itself: uvicorn only
    notices `should_exit` on its next tick (up to 0.1 s later), and a probe in between must
    already see 503."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig, frame) -> None:
        self.drain.begin()
        super().handle_exit(sig, frame)


async def first_of(work: Awaitable[T], drain: Drain) -> T:
    """`work`'s result, or DrainExpired (with `work` cancelled) if the deadline passes first."""
    task = asyncio.ensure_future(work)
    expiry = asyncio.ensure_future(drain.wait_expired())
    with drain.track_request():
        try:
            await asyncio.wait({task, expiry}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            expiry.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    if task.cancelled():
        raise drain.cut_request()
    return task.result()
