"""Server-sent events: the `data:` lines of a stream, its `[DONE]`, and the streamed response."""
from __future__ import annotations

import contextlib
import json
import logging
from typing import AsyncIterator

from fastapi.responses import StreamingResponse

from kubeinfer.engine.server.drain import CUT_MESSAGE, Drain, DrainExpired
from kubeinfer.engine.server.errors import REQUEST_FAILED_MESSAGE, APIError, error_body

logger = logging.getLogger("kubeinfer.server")


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_stream(chunks: AsyncIterator[dict], drain: Drain) -> AsyncIterator[str]:
    """`data: {...}` events then `data: [DONE]`. An error after the headers went out (the
    status is sent by then) is an error event before the `[DONE]`: the engine's, a drain that
    ran out of time, or a bug (whose text stays in the log)."""
    try:
        async with contextlib.aclosing(drain.until_expired(chunks)) as it:
            async for chunk in it:
                yield sse(chunk)
    except APIError as e:
        yield sse(error_body(e.message, e.status, e.param, e.type))
    except DrainExpired:
        yield sse(error_body(CUT_MESSAGE, 503))
    except Exception:  # noqa: BLE001 - the client still gets a well-formed end of stream
        logger.exception("a stream failed")
        yield sse(error_body(REQUEST_FAILED_MESSAGE, 500))
    yield SSE_DONE


class SSEResponse(StreamingResponse):
    """A streamed response that closes its generator however the stream ends."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[dict], drain: Drain):
        super().__init__(sse_stream(chunks, drain), headers={"Cache-Control": "no-cache",
                                                             "X-Accel-Buffering": "no"})

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()
