"""POST /classify (and /v1/classify): a sequence classifier's class probabilities, as vLLM's
classification API (request: model, input, truncate_prompt_tokens, add_special_tokens; response:
`ClassificationResponse`, one `{index, label, probs, num_classes}` per input).

Each input becomes one pooling request with task "classify"; the engine batches them with whatever
else is waiting, as for /v1/embeddings. The request body lives here rather than in protocol.py:
this route is its only user.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, field_validator

from kubeinfer.engine.pooling_params import PoolingParams
from kubeinfer.engine.server.errors import APIError
from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from kubeinfer.engine.server.pooling_requests import run_pooling
from kubeinfer.engine.server.response_parts import now

logger = logging.getLogger("kubeinfer.server")


class ClassificationRequest(BaseModel):
    """vLLM's ClassificationRequest. Strict types, so true is no token id and "1" is no number."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    # a string, a batch of strings, token ids, or a batch of token-id lists
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    user: str | None = None
    truncate_prompt_tokens: StrictInt | None = None
    add_special_tokens: StrictBool = True

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        # one message instead of pydantic's per-union-member list
        def is_id(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        ok = isinstance(value, str) or (isinstance(value, list) and (
            all(isinstance(x, str) for x in value) or all(is_id(x) for x in value)
            or all(isinstance(x, list) and all(is_id(t) for t in x) for x in value)))
        if not ok:
            raise ValueError("must be a string, a list of strings, a list of token ids "
                             "(integers) or a list of token-id lists")
        return value

    def inputs(self) -> list[str | list[int]]:
        if isinstance(self.input, str):
            return [self.input]
        if not self.input:
            raise APIError("input is empty: send a string, a list of strings, a list of token "
                           "ids or a list of token-id lists.", 400, param="input")
        if isinstance(self.input[0], int):
            return [self.input]
        return list(self.input)


async def create_classification(lifecycle: ModelLifecycle, req: ClassificationRequest,
                                raw: Request) -> Response:
    engine = lifecycle.ready_engine()
    model = lifecycle.resolve_model(req.model)
    if engine.runner_type != "pooling":
        raise APIError(f"The model `{model}` is a text generation model, not a classifier: use "
                       "/v1/completions or /v1/chat/completions with it, or serve a "
                       "*ForSequenceClassification model for /classify.", 400, param="model")
    params = PoolingParams(task="classify")
    inputs = req.inputs()
    request_id, prompts, results = await run_pooling(
        lifecycle, engine, inputs, params, req.truncate_prompt_tokens, req.add_special_tokens,
        "classify", raw)
    if results is None:
        return Response(status_code=499)  # nobody is listening
    num_tokens = sum(len(p) for p in prompts)
    return JSONResponse({
        "id": request_id, "object": "list", "created": now(), "model": model,
        "data": [{"index": i, "label": results[i].label, "probs": results[i].probs,
                  "num_classes": len(results[i].probs)} for i in range(len(prompts))],
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens,
                  "completion_tokens": 0, "prompt_tokens_details": None}})
