"""Offline API, as vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))` and `.chat(...)`."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm import tqdm

from kubeinfer.engine.config import (CacheConfig, DeviceConfig, EngineConfig, ModelConfig,
                                     ParallelConfig, SchedulerConfig, parse_bytes)
from kubeinfer.engine.async_engine import make_engine
from kubeinfer.engine.outputs import CompletionOutput, EmbeddingOutput, FinishedRequest
from kubeinfer.engine.pooling_params import PoolingParams
from kubeinfer.engine.sampling_params import SamplingParams

Prompt = str | list[int] | dict


class LLM:
    """Keyword arguments take vLLM's names: dtype, max_model_len, gpu_memory_utilization,
    kv_cache_memory, enable_prefix_caching, block_size, max_num_seqs, max_num_batched_tokens,
    load_format, seed, enforce_eager, tensor_parallel_size, device, ..."""

    def __init__(self, model: str | None = None, *, tokenizer: str | None = None,
                 dtype: str = "auto", load_format: str = "auto", max_model_len: int | None = None,
                 seed: int = 0, trust_remote_code: bool = False, revision: str | None = None,
                 served_model_name: str | None = None, skip_tokenizer_init: bool = False,
                 block_size: int = 16, gpu_memory_utilization: float = 0.9,
                 kv_cache_memory: int | str | None = None, enable_prefix_caching: bool = True,
                 num_gpu_blocks_override: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, enable_chunked_prefill: bool = True,
                 async_scheduling: bool | None = None, scheduling_policy: str = "fcfs",
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 device: str = "auto", enforce_eager: bool = False, chat_template: str | None = None,
                 generation_config: str = "auto",
                 override_generation_config: dict[str, float] | None = None,
                 runner: str = "auto", pooler_config: dict | None = None, model_impl: str = "auto"):
        from kubeinfer.engine.arg_utils import DEFAULT_MODEL

        config = EngineConfig(
            model=ModelConfig(model=model or DEFAULT_MODEL, tokenizer=tokenizer, revision=revision,
                              dtype=dtype, load_format=load_format, max_model_len=max_model_len,
                              seed=seed, trust_remote_code=trust_remote_code,
                              served_model_name=(served_model_name,) if served_model_name else (),
                              chat_template=chat_template, skip_tokenizer_init=skip_tokenizer_init,
                              generation_config=generation_config,
                              override_generation_config=tuple(sorted(
                                  (override_generation_config or {}).items())),
                              runner=runner,
                              pooler_config=tuple(sorted((pooler_config or {}).items())),
                              model_impl=model_impl),
            cache=CacheConfig(block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
                              kv_cache_memory=None if kv_cache_memory is None else parse_bytes(kv_cache_memory),
                              enable_prefix_caching=enable_prefix_caching,
                              num_gpu_blocks_override=num_gpu_blocks_override),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                      max_num_seqs=max_num_seqs,
                                      enable_chunked_prefill=enable_chunked_prefill,
                                      async_scheduling=async_scheduling,
                                      scheduling_policy=scheduling_policy),
            parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                                    pipeline_parallel_size=pipeline_parallel_size),
            device=DeviceConfig(device=device, enforce_eager=enforce_eager))
        self.engine = make_engine(config)
        self.runner_type = getattr(self.engine, "runner_type", "generate")
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (they also end with this process)."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _to_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
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
            sampling_params = self.engine.default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} sampling params")
        priority = list(priority) if priority is not None else [0] * len(prompts)
        if len(priority) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(priority)} priorities")
        results: dict[str, FinishedRequest] = {}
        order = []
        for prompt, params, prio in zip(prompts, sampling_params, priority):
            text, ids = self._to_ids(prompt)
            request_id = str(next(self._ids))
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
        engine = self.engine
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

    def _check_runner(self, wanted: str, instead: str) -> None:
        if self.runner_type != wanted:
            kind = "an embedding model" if self.runner_type == "pooling" else "a text generation model"
            raise ValueError(f"{self.engine.config.model.model} is {kind} (runner "
                             f"{self.runner_type!r}): use {instead}")

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = False) -> list[FinishedRequest]:
        """Apply the chat template to one conversation or a list of them, then generate."""
        self._check_runner("generate", "embed()")
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer; this LLM was built with skip_tokenizer_init")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        template = chat_template or self.engine.config.model.chat_template
        prompts = [tok.apply_chat_template(conv, tokenize=False, chat_template=template,
                                           add_generation_prompt=add_generation_prompt)
                   for conv in conversations]
        # the template already holds the special tokens (BOS), so don't add them twice
        ids = [{"prompt_token_ids": tok.encode(p, add_special_tokens=False)} for p in prompts]
        outs = self.generate(ids, sampling_params, use_tqdm)
        for out, text in zip(outs, prompts):
            out.prompt = text
        return outs
