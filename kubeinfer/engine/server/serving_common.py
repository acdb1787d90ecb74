"""What the completions and chat handlers share: ids, context-length checks, logprob shapes, SSE,
driving the engine, and noticing a client that went away."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Iterable

from fastapi import Request
from fastapi.responses import StreamingResponse

from kubeinfer.engine.outputs import PromptLogprobs, RequestOutput, SampleLogprobs
from kubeinfer.engine.server.errors import APIError, error_body

logger = logging.getLogger("kubeinfer.server")


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def context_budget(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                   where: str) -> int:
    """max_tokens to run with: the caller's, or the rest of the context when it gave none.

    `where` is "messages" or "prompt", as the user wrote the input. Raises a 400 whose message names
    both numbers, in OpenAI's words.
    """
    if max_tokens is None:
        if num_prompt_tokens >= max_model_len:
            raise APIError(
                f"This model's maximum context length is {max_model_len} tokens. However, your "
                f"{where} resulted in {num_prompt_tokens} tokens. Please reduce the length of the "
                f"{where}.", 400, param=where)
        return max_model_len - num_prompt_tokens
    total = num_prompt_tokens + max_tokens
    if total > max_model_len:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{total} tokens ({num_prompt_tokens} in the {where}, {max_tokens} in the completion). "
            f"Please reduce the length of the {where} or completion.", 400, param=where)
    return max_tokens


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    if not ids:
        raise APIError(f"{param} is empty: send at least one token.", 400, param=param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(f"token id {bad} in {param} is out of range: the vocabulary has {vocab_size} "
                       "tokens.", 400, param=param)


# ---- logprobs ------------------------------------------------------------------------------------

def _finite(x: float) -> float:
    # JSON has no -Infinity; OpenAI clients expect a number
    return max(x, -9999.0) if not math.isnan(x) else -9999.0


class TokenText:
    """Token id -> the text it stands for, cached (logprob responses ask for the same ids often)."""

    def __init__(self, tokenizer: Any, as_ids: bool = False):
        self._tokenizer = tokenizer
        # vLLM's return_tokens_as_token_ids: "token_id:123"; the only choice with no tokenizer
        self._as_ids = as_ids or tokenizer is None
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = f"token_id:{token_id}" if self._as_ids else self._tokenizer.decode([token_id])
            self._cache[token_id] = s
        return s


def chat_logprobs(token_ids: list[int], logprobs: list[SampleLogprobs],
                  text: TokenText) -> list[dict]:
    """OpenAI chat shape: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    content = []
    for tid, (lp, top) in zip(token_ids, logprobs):
        s = text(tid)
        content.append({"token": s, "logprob": _finite(lp), "bytes": list(s.encode()),
                        "top_logprobs": [{"token": text(t), "logprob": _finite(v),
                                          "bytes": list(text(t).encode())} for t, v in top]})
    return content


class CompletionLogprobs:
    """OpenAI legacy completions shape, grown one delta at a time; text_offset counts from the
    start of the choice's text (the echoed prompt included)."""

    def __init__(self, text: TokenText, offset: int = 0):
        self._text = text
        self.offset = offset

    def add(self, token_ids: Iterable[int],
            logprobs: list[SampleLogprobs | None] | None) -> dict:
        """Entries for these tokens; a None (or all of them, for None) reports null, as OpenAI does
        for an echoed prompt's first token."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        for i, tid in enumerate(token_ids):
            s = self._text(tid)
            out["tokens"].append(s)
            out["text_offset"].append(self.offset)
            self.offset += len(s)
            entry = None if logprobs is None else logprobs[i]
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            lp, top = entry
            out["token_logprobs"].append(_finite(lp))
            # keyed by text, so two ids that decode alike (byte fallbacks) keep the first, and the
            # sampled token always shows its own logprob
            top_map = {s: _finite(lp)}
            for t, v in top:
                top_map.setdefault(self._text(t), _finite(v))
            out["top_logprobs"].append(top_map)
        return out


def echo_logprobs(prompt_token_ids: list[int], prompt_logprobs: PromptLogprobs | None,
                  num_top: int) -> list[SampleLogprobs | None] | None:
    """An echoed prompt's logprobs in the sampled tokens' shape, for the legacy completions
    format: None for the first token, then (its logprob, the num_top most likely)."""
    if prompt_logprobs is None:
        return None
    out: list[SampleLogprobs | None] = [None]
    for token_id, entry in zip(prompt_token_ids[1:], prompt_logprobs[1:]):
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
        out.append((entry[token_id].logprob,
                    [(t, lp.logprob) for t, lp in ranked if lp.rank <= num_top]))
    return out


def prompt_logprobs_json(prompt_logprobs: PromptLogprobs | None) -> list | None:
    """vLLM's JSON of prompt logprobs: None, then {"token_id": {logprob, rank, decoded_token}}."""
    if prompt_logprobs is None:
        return None
    return [None if entry is None else
            {str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank,
                      "decoded_token": lp.decoded_token} for t, lp in entry.items()}
            for entry in prompt_logprobs]


def merge_logprobs(into: dict | None, more: dict) -> dict:
    if into is None:
        return more
    for k, v in more.items():
        into[k].extend(v)
    return into


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": max(num_cached_tokens, 0)}}


def start_generation(state: Any, req: Any) -> tuple[Any, str, Any]:
    """What /v1/completions and /v1/chat/completions do first: the ready engine, the model name the
    response carries, the request's SamplingParams; a 400 on an embedding model, and a warning that
    names the request fields this server ignored (as vLLM logs them)."""
    engine = state.ready_engine()
    model = state.resolve_model(req.model)
    if getattr(engine, "runner_type", "generate") == "pooling":
        raise APIError(f"The model `{model}` is an embedding model and does not generate text: "
                       "use /v1/embeddings.", 400, param="model")
    params = req.to_sampling_params(engine.default_sampling)
    if req.ignored_fields:
        logger.warning("The following fields were present in the request but ignored: %s",
                       req.ignored_fields)
    return engine, model, params


# ---- engine driving --------------------------------------------------------------------------------

def _engine_error_types() -> tuple[type[BaseException], type[BaseException]]:
    try:
        from kubeinfer.engine.errors import EngineDeadError, RequestError
    except ImportError:  # engine not importable; nothing to translate
        class RequestError(Exception):  # type: ignore[no-redef]
            pass

        class EngineDeadError(Exception):  # type: ignore[no-redef]
            pass
    return RequestError, EngineDeadError


async def generate(engine: Any, prompt_token_ids: list[int], params: Any, request_id: str,
                   tag: int = 0, priority: int = 0) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The engine's outputs tagged with `tag`; a per-request engine error becomes a 400.

    `aclosing` makes sure the engine's generator is closed (and so the request aborted) however
    this one ends: finished, cancelled, or closed by a client that went away.
    """
    request_error, engine_dead = _engine_error_types()
    try:
        async with contextlib.aclosing(engine.generate(prompt_token_ids, params, request_id,
                                                       priority)) as gen:
            async for out in gen:
                yield tag, out
    except request_error as e:
        raise APIError(str(e.args[0] if e.args else e), 400,
                       param=getattr(e, "param", None)) from None
    except engine_dead as e:
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


# ---- server-sent events ------------------------------------------------------------------------------

def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_stream(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """`data: {...}` events then `data: [DONE]`; an error after the headers went out is an event."""
    try:
        async with contextlib.aclosing(chunks) as it:
            async for chunk in it:
                yield sse(chunk)
    except APIError as e:
        yield sse(error_body(e.message, e.status, e.param, e.type))
    yield SSE_DONE


class SSEResponse(StreamingResponse):
    """A streamed response that closes its generator however the stream ends."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[dict]):
        super().__init__(sse_stream(chunks), headers={"Cache-Control": "no-cache",
                                                      "X-Accel-Buffering": "no"})

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()
