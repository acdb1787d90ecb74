"""Offline API, as vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`, `.chat(...)`,
`.embed(...)` and `.classify(...)`. It drives a synchronous `Engine` (from
`engine_factory.make_engine`) in the caller's thread; nothing here depends on the asyncio front
the server uses.
"""
from __future__ import annotations

import itertools
from dataclasses import replace
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from tqdm import tqdm

from kubeinfer.engine.args import EngineArgs
from kubeinfer.engine.engine_factory import make_engine
from kubeinfer.engine.multimodal import (MultiModalConfig, MultiModalInputs, MultiModalPreprocessor,
                                         has_media_parts)
from kubeinfer.engine.outputs import (ClassificationOutput, CompletionOutput, EmbeddingOutput,
                                     FinishedRequest)
from kubeinfer.engine.pooling_params import PoolingParams
from kubeinfer.engine.protocol import Engine, RunnerType
from kubeinfer.engine.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from kubeinfer.engine.embedding_engine import EmbeddingEngine
    from kubeinfer.engine.llm_engine import LLMEngine

Prompt = str | list[int] | dict


class LLM:
    """`LLM(model, **kwargs)`: the keywords are the engine's settings by vLLM's names, the flags of
    `kubeinfer serve` with _ for - (dtype, max_model_len, gpu_memory_utilization, kv_cache_memory,
    enable_prefix_caching, block_size, max_num_seqs, tensor_parallel_size, device, ...; see
    `args.ENGINE_FIELDS`). An unknown keyword or a bad value raises ConfigError saying which.
    With no model, the default model (config.DEFAULT_MODEL) runs."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        config = EngineArgs(model=model, **kwargs).create_engine_config()
        self.engine: Engine = make_engine(config)
        self.runner_type: RunnerType = self.engine.runner_type
        self._ids = itertools.count()
        self._mm: MultiModalPreprocessor | None = None

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (they also end with this process)."""
        if self._mm is not None:
            self._mm.close()
        self.engine.shutdown()

    @property
    def mm_preprocessor(self) -> MultiModalPreprocessor:
        """Images -> MultiModalInputs under the engine's limits (built on first use; a text-only
        model's refuses images)."""
        if self._mm is None:
            engine = cast("LLMEngine", self.engine)
            self._mm = MultiModalPreprocessor.from_model(
                engine.model_path, MultiModalConfig.from_model_config(engine.config.model),
                engine.config.model.model)
        return self._mm

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _to_ids(self, prompt: Prompt) -> tuple[str | None, list[int] | MultiModalInputs]:
        if isinstance(prompt, dict) and isinstance(prompt.get("mm_inputs"), MultiModalInputs):
            return prompt.get("prompt"), prompt["mm_inputs"]  # processed already (chat)
        if isinstance(prompt, dict) and prompt.get("multi_modal_data") is not None:
            return prompt.get("prompt"), self.mm_preprocessor.process_prompt(
                prompt.get("prompt"), prompt["multi_modal_data"])
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return None, list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids "
                                 "({'prompt_token_ids': [...]}) with skip_tokenizer_init")
            return prompt, self.engine.tokenizer.encode(prompt)
        return None, list(prompt)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, priority: Sequence[int] | None = None
                 ) -> list[FinishedRequest]:
        """Run every prompt to completion with continuous batching; results in prompt order.
        `priority` (one per prompt) needs scheduling_policy="priority"."""
        self._check_runner("generate", "embed()")
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = cast("LLMEngine", self.engine).default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} sampling params")
        # one output per sample, its text decoded once at the end (as vLLM's LLM asks for)
        final: dict[int, SamplingParams] = {}
        for p in sampling_params:
            if id(p) not in final:
                final[id(p)] = replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
        sampling_params = [final[id(p)] for p in sampling_params]
        priority = list(priority) if priority is not None else [0] * len(prompts)
        if len(priority) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(priority)} priorities")
        results: dict[str, FinishedRequest] = {}
        order = []
        for prompt, params, prio in zip(prompts, sampling_params, priority):
            text, ids = self._to_ids(prompt)
            request_id = str(next(self._ids))
            if isinstance(ids, MultiModalInputs):  # a prompt with images
                mm_inputs, ids = ids, ids.prompt_token_ids
                cast("LLMEngine", self.engine).add_request(request_id, ids, params, prio,
                                                           mm_inputs=mm_inputs)
            else:
                self.engine.add_request(request_id, ids, params, prio)
            results[request_id] = FinishedRequest(
                request_id, text, ids,
                [CompletionOutput(i, "", [], [] if params.logprobs is not None else None, None)
                 for i in range(params.n)])
            order.append(request_id)
        bar = tqdm(total=len(order), desc="Processed prompts", disable=not use_tqdm)
        pending = {rid: sampling_params[k].n for k, rid in enumerate(order)}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                res = results[out.request_id]
                comp = res.outputs[out.index]
                comp.text += out.new_text
                comp.token_ids.extend(out.new_token_ids)
                if comp.logprobs is not None and out.new_logprobs:
                    comp.logprobs.extend(out.new_logprobs)
                res.num_cached_tokens = out.num_cached_tokens
                if out.prompt_logprobs is not None and res.prompt_logprobs is None:
                    res.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    comp.finish_reason, comp.stop_reason = out.finish_reason, out.stop_reason
                    pending[out.request_id] -= 1
                    if pending[out.request_id] == 0:
                        bar.update(1)
        bar.close()
        return [results[rid] for rid in order]

    def embed(self, prompts: Prompt | Sequence[Prompt], pooling_params: PoolingParams | None = None,
              truncate_prompt_tokens: int | None = None,
              use_tqdm: bool = False) -> list[EmbeddingOutput]:
        """Embeddings of strings or token-id lists (pooling runner), batched as the server batches
        them; results in prompt order. Raises RequestError for an input the model cannot take."""
        self._check_runner("pooling", "generate() or chat()")
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = pooling_params or PoolingParams()
        engine = cast("EmbeddingEngine", self.engine)  # the pooling runner's engine
        order = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, dict):
                prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
            ids = engine.prepare_input(prompt, params, truncate_prompt_tokens, label=f"prompts[{i}]")
            request_id = str(next(self._ids))
            engine.add_request(request_id, ids, params)
            order.append(request_id)
        results: dict[str, EmbeddingOutput] = {}
        with tqdm(total=len(order), desc="Embedded prompts", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    results[out.request_id] = out
                    bar.update(1)
        return [results[rid] for rid in order]

    def classify(self, prompts: Prompt | Sequence[Prompt], truncate_prompt_tokens: int | None = None,
                 use_tqdm: bool = False) -> list[ClassificationOutput]:
        """Class probabilities of strings or token-id lists from a sequence classifier
        (*ForSequenceClassification), as vLLM's `LLM.classify`; results in prompt order."""
        return self.embed(prompts, PoolingParams(task="classify"), truncate_prompt_tokens,
                          use_tqdm)

    def _check_runner(self, wanted: str, instead: str) -> None:
        if self.runner_type != wanted:
            kind = "an embedding model" if self.runner_type == "pooling" else "a text generation model"
            raise ValueError(f"{self.engine.config.model.model} is {kind} (runner "
                             f"{self.runner_type!r}): use {instead}")

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = False) -> list[FinishedRequest]:
        """Apply the chat template to one conversation or a list of them, then generate. Content
        parts may carry images (`image_url` with a data/https URL, or `image_pil`) for a
        vision-language model."""
        self._check_runner("generate", "embed()")
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer; this LLM was built with skip_tokenizer_init")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        template = chat_template or self.engine.config.model.chat_template
        if any(has_media_parts(conv) for conv in conversations):
            mm = self.mm_preprocessor
            inputs = [mm.chat(conv, template, add_generation_prompt) for conv in conversations]
            outs = self.generate([{"prompt": i.prompt, "mm_inputs": i} for i in inputs],
                                 sampling_params, use_tqdm)
            return outs
        prompts = [tok.apply_chat_template(conv, tokenize=False, chat_template=template,
                                           add_generation_prompt=add_generation_prompt)
                   for conv in conversations]
        # the template already holds the special tokens (BOS), so don't add them twice
        ids = [{"prompt_token_ids": tok.encode(p, add_special_tokens=False)} for p in prompts]
        outs = self.generate(ids, sampling_params, use_tqdm)
        for out, text in zip(outs, prompts):
            out.prompt = text
        return outs
