"""What a generation request goes through before the engine sees it: the ready engine, the model
name, the SamplingParams bounded by the model's vocabulary, and the prompt's context budget."""
from __future__ import annotations

import logging

from kubeinfer.engine.protocol import EngineClient
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.server.errors import APIError
from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from kubeinfer.engine.server.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger("kubeinfer.server")


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


def start_generation(lifecycle: ModelLifecycle, req: CompletionRequest | ChatCompletionRequest
                     ) -> tuple[EngineClient, str, SamplingParams]:
    """What /v1/completions and /v1/chat/completions do first: the ready engine, the model name the
    response carries, the request's SamplingParams checked against the model's vocabulary; a 400
    on an embedding model, and a warning that names the request fields this server ignored (as
    vLLM logs them)."""
    engine = lifecycle.ready_engine()
    model = lifecycle.resolve_model(req.model)
    if engine.runner_type == "pooling":
        raise APIError(f"The model `{model}` is an embedding model and does not generate text: "
                       "use /v1/embeddings.", 400, param="model")
    params = req.to_sampling_params(engine.default_sampling)
    params.check_vocab(engine.vocab_size)
    if req.ignored_fields:
        logger.warning("The following fields were present in the request but ignored: %s",
                       req.ignored_fields)
    return engine, model, params
