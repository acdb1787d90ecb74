"""POST /classify (and /v1/classify): a sequence classifier's class probabilities, as vLLM's
classification API (request: model, input, truncate_prompt_tokens, add_special_tokens; response:
`ClassificationResponse`, one `{index, label, probs, num_classes}` per input).

Each input becomes one pooling request with task "classify"; the engine batches them with whatever
else is waiting, as for /v1/embeddings (server/pooling_requests.py).
"""
from __future__ import annotations


from fastapi import Request, Response
from fastapi.responses import JSONResponse

from kubeinfer.engine.pooling_params import PoolingParams
from kubeinfer.engine.server.errors import APIError
from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from kubeinfer.engine.server.pooling_requests import run_pooling, split_inputs
from kubeinfer.engine.server.protocol import ClassificationRequest
from kubeinfer.engine.server.response_parts import now

async def create_classification(lifecycle: ModelLifecycle, req: ClassificationRequest,
                                raw: Request) -> Response:
    engine = lifecycle.ready_engine()
    model = lifecycle.resolve_model(req.model)
    if engine.runner_type != "pooling":
        raise APIError(f"The model `{model}` is a text generation model, not a classifier: use "
                       "/v1/completions or /v1/chat/completions with it, or serve a "
                       "*ForSequenceClassification model for /classify.", 400, param="model")
    params = PoolingParams(task="classify")
    inputs = split_inputs(req.input)
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
