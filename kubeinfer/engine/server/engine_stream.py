"""Driving the engine for one HTTP request: its outputs tagged and merged, its errors turned into
API errors, and its requests aborted when the client goes away."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable

from fastapi import Request

from kubeinfer.engine.errors import EngineDeadError, RequestError, RequestFailedError
from kubeinfer.engine.outputs import RequestOutput
from kubeinfer.engine.pooling_params import PoolingParams
from kubeinfer.engine.protocol import EngineClient
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.server.errors import REQUEST_FAILED_MESSAGE, APIError

logger = logging.getLogger("kubeinfer.server")


async def generate(engine: EngineClient, prompt_token_ids: list[int],
                   params: SamplingParams | PoolingParams, request_id: str, tag: int = 0,
                   priority: int = 0, mm_inputs: Any = None
                   ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The engine's outputs tagged with `tag`, with the engine's errors as API errors: a request
    the engine cannot take is a 400 in its words; a failure on this request a 500 whose text stays
    in the log (it may hold internals); a dead engine loop a 503.

    `aclosing` makes sure the engine's generator is closed (and so the request aborted) however
    this one ends: finished, cancelled, or closed by a client that went away.
    """
    try:
        # only a prompt with images passes mm_inputs (multimodal.MultiModalInputs)
        extra = {} if mm_inputs is None else {"mm_inputs": mm_inputs}
        async with contextlib.aclosing(engine.generate(prompt_token_ids, params, request_id,
                                                       priority, **extra)) as gen:
            async for out in gen:
                yield tag, out
    except RequestError as e:
        raise APIError(str(e.args[0] if e.args else e), 400, param=e.param) from None
    except RequestFailedError as e:
        logger.error("request %s failed in the engine: %s", request_id, e)
        raise APIError(REQUEST_FAILED_MESSAGE, 500) from None
    except EngineDeadError as e:
        raise APIError(str(e), 503) from None


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """Items of several async iterators as they come; closing this closes them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[Any]) -> None:
        try:
            async with contextlib.aclosing(stream) as s:
                async for item in s:
                    await queue.put((item, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((None, e))
            return
        await queue.put((done, None))

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is done:
                remaining -= 1
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`, cancelling it (and so aborting its engine requests) if the client hangs up.

    Returns None when the client went away. The body has been read by now, so the next message
    the server can deliver is the disconnect.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # let the engine requests' aborts run
    if task.cancelled():
        return None
    return task.result()

