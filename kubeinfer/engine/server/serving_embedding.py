"""POST /v1/embeddings: strings or token ids in, one vector each out (the pooling runner).

Each input becomes one engine request; the engine batches them with whatever else is waiting.
`encoding_format: "base64"` sends each vector as its little-endian float32 bytes, as OpenAI does
(the `openai` client asks for it by default and decodes it).
"""
from __future__ import annotations

import base64
import contextlib
import logging
from typing import Any

import numpy as np
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.pooling_params import PoolingParams
from kubeinfer.engine.server.errors import APIError
from kubeinfer.engine.server.protocol import EmbeddingRequest
from kubeinfer.engine.server.drain import first_of
from kubeinfer.engine.server.engine_stream import generate, merge, until_disconnect
from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from kubeinfer.engine.server.response_parts import now, random_id

logger = logging.getLogger("kubeinfer.server")


def _inputs(req: EmbeddingRequest) -> list[str | list[int]]:
    value = req.input
    if isinstance(value, str):
        return [value]
    if not value:
        raise APIError("input is empty: send a string, a list of strings, a list of token ids or "
                       "a list of token-id lists.", 400, param="input")
    if isinstance(value[0], int):
        return [value]
    return list(value)


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


async def create_embedding(lifecycle: ModelLifecycle, req: EmbeddingRequest,
                           raw: Request) -> Response:
    engine = lifecycle.ready_engine()
    model = lifecycle.resolve_model(req.model)
    if engine.runner_type != "pooling":
        raise APIError(f"The model `{model}` is a text generation model and has no embeddings: "
                       "use /v1/completions or /v1/chat/completions with it, or serve an "
                       "embedding model (such as a BertModel sentence-transformers model, "
                       "--runner pooling) for /v1/embeddings.", 400, param="model")
    params = PoolingParams(dimensions=req.dimensions, normalize=req.normalize)
    inputs = _inputs(req)
    prompts = []
    for i, item in enumerate(inputs):
        label = "input" if len(inputs) == 1 else f"input[{i}]"
        try:
            prompts.append(engine.prepare_embedding_input(
                item, params, req.truncate_prompt_tokens, req.add_special_tokens, label))
        except RequestError as e:
            raise APIError(str(e), 400, param=e.param or "input") from None
    request_id = random_id("embd")
    if lifecycle.log_requests:
        logger.info("request %s: %d embedding input(s), %s tokens", request_id, len(prompts),
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
    if results is None:
        return Response(status_code=499)  # nobody is listening
    num_tokens = sum(len(p) for p in prompts)
    return JSONResponse({
        "id": request_id, "object": "list", "created": now(), "model": model,
        "data": [{"object": "embedding", "index": i,
                  "embedding": _encode(results[i].embedding, req.encoding_format)}
                 for i in range(len(prompts))],
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}})
