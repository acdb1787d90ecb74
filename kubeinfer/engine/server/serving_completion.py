"""POST /v1/completions: a prompt (or a batch of them) in, text out, streamed or whole."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, AsyncIterator

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.server.errors import APIError
from kubeinfer.engine.server.protocol import CompletionRequest
from kubeinfer.engine.protocol import EngineClient
from kubeinfer.engine.server.drain import first_of
from kubeinfer.engine.server.engine_stream import generate, merge, until_disconnect
from kubeinfer.engine.server.logprobs_format import (CompletionLogprobs, TokenText, echo_logprobs,
                                                     merge_logprobs, prompt_logprobs_json)
from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from kubeinfer.engine.server.request_prologue import (check_token_ids, context_budget,
                                                      start_generation)
from kubeinfer.engine.server.response_parts import now, random_id, usage
from kubeinfer.engine.server.sse import SSEResponse

logger = logging.getLogger("kubeinfer.server")


@dataclasses.dataclass
class _Prompt:
    token_ids: list[int]
    text: str  # for echo
    params: SamplingParams


def _prompts(req: CompletionRequest, engine: EngineClient, params: SamplingParams) -> list[_Prompt]:
    prompt = req.prompt
    if isinstance(prompt, str):
        batch: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        batch = [prompt]
    else:
        batch = list(prompt)
    if not batch:
        raise APIError("prompt is empty: send a string, a list of strings or a list of token ids.",
                       400, param="prompt")
    tokenizer = engine.tokenizer
    if tokenizer is None and any(isinstance(p, str) for p in batch):
        raise APIError("this server was started with --skip-tokenizer-init, so it takes token ids "
                       "only: send `prompt` as a list of token ids (or a list of such lists).",
                       400, param="prompt")
    out = []
    for p in batch:
        if isinstance(p, str):
            ids = tokenizer.encode(p)
            check_token_ids(ids, len(tokenizer), "prompt")
            text = p
        else:
            ids = list(p)
            check_token_ids(ids, engine.vocab_size, "prompt")  # the model's, which may be padded
            text = tokenizer.decode(ids) if req.echo and tokenizer is not None else ""
        max_tokens = context_budget(len(ids), params.max_tokens, engine.max_model_len, "prompt")
        out.append(_Prompt(ids, text, dataclasses.replace(params, max_tokens=max_tokens)))
    return out


async def create_completion(lifecycle: ModelLifecycle, req: CompletionRequest,
                            raw: Request) -> Response:
    engine, model, params = start_generation(lifecycle, req)
    prompts = _prompts(req, engine, params)
    request_id = random_id("cmpl")
    if lifecycle.log_requests:
        logger.info("request %s: %d prompt(s), %s prompt tokens, %s", request_id, len(prompts),
                    [len(p.token_ids) for p in prompts], prompts[0].params)
    streams = [generate(engine, p.token_ids, p.params,
                        request_id if len(prompts) == 1 else f"{request_id}-{i}", tag=i,
                        priority=req.priority)
               for i, p in enumerate(prompts)]
    header = {"id": request_id, "object": "text_completion", "created": now(), "model": model}
    text = TokenText(engine.tokenizer, req.return_tokens_as_token_ids)
    if req.stream:
        return SSEResponse(_stream(req, prompts, merge(streams), header, text), lifecycle.drain)
    result = await until_disconnect(raw, first_of(_collect(req, prompts, merge(streams), header,
                                                           text), lifecycle.drain))
    if result is None:
        return Response(status_code=499)  # nobody is listening
    return JSONResponse(result)


class _Choice:
    """One choice's text, tokens and logprobs so far."""

    def __init__(self, index: int, prompt: _Prompt, req: CompletionRequest, text: TokenText):
        self.index = index
        self.prompt = prompt
        self.echo = req.echo
        self.num_logprobs = req.logprobs
        self.logprobs = CompletionLogprobs(text) if req.logprobs is not None else None
        self.prompt_logprobs = None  # the engine's, from the first output that carries them
        self.started = False
        self.num_tokens = 0
        self.num_cached_tokens = 0

    def delta(self, out) -> tuple[str, dict | None]:
        """Text and logprobs to send for this engine output (the echo goes first)."""
        text, lps = out.new_text, None
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if self.logprobs is not None:
            lps = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if not self.started:
            self.started = True
            if self.echo:
                text = self.prompt.text + text
                if self.logprobs is not None:
                    prompt_lps = echo_logprobs(self.prompt.token_ids, self.prompt_logprobs,
                                               self.num_logprobs)
                    merge_logprobs(lps, self.logprobs.add(self.prompt.token_ids, prompt_lps))
        if self.logprobs is not None:
            merge_logprobs(lps, self.logprobs.add(out.new_token_ids, out.new_logprobs or
                                                  [(0.0, [])] * len(out.new_token_ids)))
        self.num_tokens = out.num_output_tokens
        self.num_cached_tokens = out.num_cached_tokens
        return text, lps


def _choices(req: CompletionRequest, prompts: list[_Prompt], text: TokenText) -> dict[int, _Choice]:
    return {i * req.n + k: _Choice(i * req.n + k, p, req, text)
            for i, p in enumerate(prompts) for k in range(req.n)}


def _usage(prompts: list[_Prompt], choices: dict[int, _Choice], n: int) -> dict:
    cached = sum(choices[i * n].num_cached_tokens for i in range(len(prompts)))
    return usage(sum(len(p.token_ids) for p in prompts),
                 sum(c.num_tokens for c in choices.values()), cached)


async def _collect(req: CompletionRequest, prompts: list[_Prompt], outputs: AsyncIterator,
                   header: dict, text: TokenText) -> dict:
    choices = _choices(req, prompts, text)
    texts: dict[int, list[str]] = {i: [] for i in choices}
    token_ids: dict[int, list[int]] = {i: [] for i in choices}
    lps: dict[int, dict | None] = {i: None for i in choices}
    final: dict[int, Any] = {}
    async with contextlib.aclosing(outputs):
        async for tag, out in outputs:
            idx = tag * req.n + out.index
            t, lp = choices[idx].delta(out)
            texts[idx].append(t)
            token_ids[idx].extend(out.new_token_ids)
            if lp is not None:
                lps[idx] = merge_logprobs(lps[idx], lp)
            if out.finished:
                final[idx] = out
    body = dict(header)
    body["choices"] = [{
        "index": i, "text": "".join(texts[i]), "logprobs": lps[i],
        "finish_reason": final[i].finish_reason if i in final else None,
        "stop_reason": final[i].stop_reason if i in final else None,
        "prompt_logprobs": prompt_logprobs_json(choices[i].prompt_logprobs),
        **({"prompt_token_ids": choices[i].prompt.token_ids, "token_ids": token_ids[i]}
           if req.return_token_ids else {}),
    } for i in sorted(choices)]
    body["usage"] = _usage(prompts, choices, req.n)
    return body


async def _stream(req: CompletionRequest, prompts: list[_Prompt], outputs: AsyncIterator,
                  header: dict, text: TokenText) -> AsyncIterator[dict]:
    choices = _choices(req, prompts, text)
    async with contextlib.aclosing(outputs):
        async for tag, out in outputs:
            idx = tag * req.n + out.index
            first = not choices[idx].started
            t, lp = choices[idx].delta(out)
            if not t and not out.finished and lp is None and not req.return_token_ids:
                continue
            choice = {"index": idx, "text": t, "logprobs": lp,
                      "finish_reason": out.finish_reason if out.finished else None,
                      "stop_reason": out.stop_reason if out.finished else None}
            if req.return_token_ids:
                choice["token_ids"] = list(out.new_token_ids)
                if first:
                    choice["prompt_token_ids"] = choices[idx].prompt.token_ids
            chunk = {**header, "choices": [choice]}
            if req.continuous_usage:
                chunk["usage"] = _usage(prompts, choices, req.n)
            yield chunk
    if req.include_usage:
        yield {**header, "choices": [], "usage": _usage(prompts, choices, req.n)}
