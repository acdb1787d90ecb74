"""The part of /v1/embeddings and /classify that is the same: every input becomes one pooling
request (the engine batches them with whatever else is waiting), and the results come back by
input index, or None when the client went away."""
from __future__ import annotations

import contextlib
import logging
from typing import Any

from fastapi import Request

from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.pooling_params import PoolingParams
from kubeinfer.engine.protocol import EngineClient
from kubeinfer.engine.server.drain import first_of
from kubeinfer.engine.server.engine_stream import generate, merge, until_disconnect
from kubeinfer.engine.server.errors import APIError
from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from kubeinfer.engine.server.response_parts import random_id

logger = logging.getLogger("kubeinfer.server")


def split_inputs(value: str | list) -> list[str | list[int]]:
    """A pooling request's `input` as a list of inputs (a string, or one list of token ids, is one
    input); a 400 for an empty one."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise APIError("input is empty: send a string, a list of strings, a list of token ids or "
                       "a list of token-id lists.", 400, param="input")
    if isinstance(value[0], int):
        return [value]
    return list(value)


async def run_pooling(lifecycle: ModelLifecycle, engine: EngineClient,
                      inputs: list[str | list[int]], params: PoolingParams,
                      truncate_prompt_tokens: int | None, add_special_tokens: bool,
                      id_prefix: str, raw: Request
                      ) -> tuple[str, list[list[int]], dict[int, Any] | None]:
    """(request id, each input's token ids, index -> output or None if the client left); a 400
    naming the input for one the model cannot take."""
    prompts = []
    for i, item in enumerate(inputs):
        label = "input" if len(inputs) == 1 else f"input[{i}]"
        try:
            prompts.append(engine.prepare_embedding_input(
                item, params, truncate_prompt_tokens, add_special_tokens, label))
        except RequestError as e:
            raise APIError(str(e), 400, param=e.param or "input") from None
    request_id = random_id(id_prefix)
    if lifecycle.log_requests:
        logger.info("request %s: %d %s input(s), %s tokens", request_id, len(prompts), params.task,
                    [len(p) for p in prompts])
    streams = [generate(engine, ids, params,
                        request_id if len(prompts) == 1 else f"{request_id}-{i}", tag=i)
               for i, ids in enumerate(prompts)]

    async def collect() -> dict[int, Any]:
        results: dict[int, Any] = {}
        async with contextlib.aclosing(merge(streams)) as outputs:
            async for tag, out in outputs:
                results[tag] = out
        return results

    results = await until_disconnect(raw, first_of(collect(), lifecycle.drain))
    return request_id, prompts, results
