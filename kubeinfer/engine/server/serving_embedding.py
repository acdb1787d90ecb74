"""POST /v1/embeddings: strings or token ids in, one vector each out (the pooling runner).

Each input becomes one engine request; the engine batches them with whatever else is waiting.
`encoding_format: "base64"` sends each vector as its little-endian float32 bytes, as OpenAI does
(the `openai` client asks for it by default and decodes it).
"""
from __future__ import annotations

import base64

import numpy as np
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from kubeinfer.engine.pooling_params import PoolingParams
from kubeinfer.engine.server.errors import APIError
from kubeinfer.engine.server.protocol import EmbeddingRequest
from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from kubeinfer.engine.server.pooling_requests import run_pooling, split_inputs
from kubeinfer.engine.server.response_parts import now

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
    inputs = split_inputs(req.input)
    request_id, prompts, results = await run_pooling(
        lifecycle, engine, inputs, params, req.truncate_prompt_tokens, req.add_special_tokens,
        "embd", raw)
    if results is None:
        return Response(status_code=499)  # nobody is listening
    num_tokens = sum(len(p) for p in prompts)
    return JSONResponse({
        "id": request_id, "object": "list", "created": now(), "model": model,
        "data": [{"object": "embedding", "index": i,
                  "embedding": _encode(results[i].embedding, req.encoding_format)}
                 for i in range(len(prompts))],
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}})
