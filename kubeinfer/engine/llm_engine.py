"""The engine: add requests, then step(): schedule -> execute -> update."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from kubeinfer.engine import cpu_threads, model_loader
from kubeinfer.engine.arg_utils import DEFAULT_MODEL, DEFAULT_MODEL_SAMPLING
from kubeinfer.engine.config import GENERATION_KEYS, EngineConfig
from kubeinfer.engine.errors import ConfigError, RequestError
from kubeinfer.engine.distributed import TPWorkers, check_tensor_parallel
from kubeinfer.engine.kv_cache.manager import KVCacheManager
from kubeinfer.engine.model_runner import GiB, ModelRunner, PendingStep
from kubeinfer.engine.output_processor import OutputProcessor
from kubeinfer.engine.outputs import RequestOutput
from kubeinfer.engine.request import Request, RequestStatus
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.scheduler import Scheduler
from kubeinfer.engine.stats import FinishedRequestStats, IterationStats, StatLogger

logger = logging.getLogger(__name__)


class LLMEngine:
    runner_type = "generate"  # EmbeddingEngine's is "pooling"; self.runner is the ModelRunner

    def __init__(self, config: EngineConfig, stat_loggers: list[StatLogger] | tuple = ()):
        self.device = torch.device(config.device.resolve())
        cpu_threads.configure(self.device, config.parallel.tensor_parallel_size)
        if config.scheduler.async_scheduling is None:
            config = replace(config, scheduler=replace(
                config.scheduler, async_scheduling=self.device.type == "cuda"))
        self.config = config
        self.stat_loggers = list(stat_loggers)
        torch.manual_seed(config.model.seed)
        path = model_loader.resolve_model(config.model)
        self.workers: TPWorkers | None = None
        tp = config.parallel.tensor_parallel_size
        if tp > 1:
            check_tensor_parallel(model_loader.load_hf_config(path, config.model), tp,
                                  self.device.type, torch.cuda.device_count())
            self.workers = TPWorkers(config, path, self.device)
        try:
            self._build(path)
        except BaseException:
            self.shutdown()
            raise

    def _build(self, path: Path) -> None:
        config = self.config
        self.model, self.hf_config = model_loader.load_model(config.model, self.device, path=path)
        if self.workers is not None:
            self.workers.check_loaded()
        self.dtype = next(self.model.parameters()).dtype
        self.max_model_len = model_loader.get_max_model_len(self.hf_config, config.model.max_model_len)
        self.tokenizer = None
        if not config.model.skip_tokenizer_init:
            self.tokenizer = model_loader.load_tokenizer(path, config.model)
        self.eos_token_ids = frozenset(model_loader.get_eos_token_ids(path, self.tokenizer,
                                                                      self.hf_config))
        self.vocab_size = self.hf_config.vocab_size
        self.default_sampling = self._default_sampling(path)

        self.runner = ModelRunner(config, self.model, self.hf_config, self.device, self.dtype,
                                  self.max_model_len, self.workers)
        num_blocks = self.runner.determine_num_blocks()
        block_size = config.cache.block_size
        capacity = num_blocks * block_size
        logger.info("# %s blocks: %d (%d tokens of KV cache, %.2f GiB)", self.device.type.upper(),
                    num_blocks, capacity, num_blocks * self.runner.bytes_per_block / GiB)
        if self.max_model_len > capacity:
            raise ConfigError(
                f"The model's max seq len ({self.max_model_len}) is larger than the maximum number "
                f"of tokens that can be stored in KV cache ({capacity}). Try increasing "
                "`gpu_memory_utilization` (or `--kv-cache-memory` on CPU) or decreasing "
                "`max_model_len` when initializing the engine.")
        self.runner.init_kv_cache(num_blocks)
        self.kv = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.num_blocks = num_blocks
        self._pending: PendingStep | None = None  # the launched, unread step (async scheduling)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (their processes end with this one anyway)."""
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None

    def _default_sampling(self, path) -> dict[str, float]:
        """Default sampling parameters, as vLLM sets them: the model's generation_config.json
        (with --generation-config auto), then --override-generation-config on top."""
        mc = self.config.model
        defaults: dict[str, float] = {}
        gen_file = Path(path) / "generation_config.json"
        if mc.generation_config == "auto" and mc.model == DEFAULT_MODEL:
            defaults.update(DEFAULT_MODEL_SAMPLING)
        if mc.generation_config == "auto" and gen_file.is_file():
            gen = json.loads(gen_file.read_text())
            defaults.update({k: gen[k] for k in GENERATION_KEYS
                             if isinstance(gen.get(k), (int, float)) and not isinstance(gen[k], bool)})
        defaults.update(dict(mc.override_generation_config))
        if defaults:
            logger.info("default sampling parameters: %s", defaults)
        return defaults

    def default_sampling_params(self) -> SamplingParams:
        d = dict(self.default_sampling)
        max_new = d.pop("max_new_tokens", None)
        return SamplingParams(max_tokens=None if max_new is None else int(max_new), **d)

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, priority: int = 0) -> None:
        """Queue a request (params.n samples of it). Raises RequestError for what the caller sent."""
        if request_id in self.output_processor.parent_to_children:
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        self.validate_priority(priority)
        max_tokens = self.validate_request(prompt_token_ids, params)
        for i in range(params.n):
            child = params.clone_for_child(i)
            child.max_tokens = max_tokens
            req_id = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(req_id, list(prompt_token_ids), child, self.eos_token_ids,
                          priority=priority)
            self.output_processor.add(request_id, i, req, params.prompt_logprobs is not None)
            self.scheduler.add_request(req)

    def validate_priority(self, priority: int) -> None:
        if priority and self.config.scheduler.scheduling_policy != "priority":
            raise RequestError(f"priority={priority} needs a server started with "
                               "--scheduling-policy priority; leave it out or 0.", "priority")

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request against the model's limits; returns its max_tokens (the rest of the
        context when unset). Reads only immutable state, so any thread may call it."""
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise RequestError("the prompt is empty: send at least one token", "prompt")
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is out of vocabulary [0, {self.vocab_size})", "prompt")
        bad = next((t for t in params.logit_bias or () if t >= self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"logit_bias names token id {bad}, outside the vocabulary "
                               f"[0, {self.vocab_size})", "logit_bias")
        max_tokens = params.max_tokens
        if max_tokens is None:
            if num_prompt >= self.max_model_len:
                raise RequestError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, "
                    f"your prompt has {num_prompt} tokens. Please reduce the length of the prompt.",
                    "messages")
            return self.max_model_len - num_prompt
        if num_prompt + max_tokens > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or "
                "completion.", "max_tokens")
        return max_tokens

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """Abort every sample of a request; its blocks go back to the pool."""
        outputs = []
        for req_id in list(self.output_processor.parent_to_children.get(request_id, ())):
            req = self.scheduler.finish_request(req_id, RequestStatus.FINISHED_ABORTED)
            if req is not None:
                outputs.append(self.output_processor.aborted(req))
                self.runner.free_request(req_id)
            self.output_processor.remove(req_id)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._pending is not None

    @property
    def num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished_requests

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule -> execute -> update. With async scheduling, step N+1 is launched before
        step N's tokens are read, and this returns step N's outputs."""
        if self.config.scheduler.async_scheduling:
            return self._step_async()
        sched_out = self.scheduler.schedule()
        stats = IterationStats()
        outputs: list[RequestOutput] = []
        if not sched_out.is_empty:
            result = self.runner.execute(sched_out, self._block_ids(sched_out))
            self._count_prompt_tokens(sched_out, stats)
            updates = self.scheduler.update(sched_out, result.sampled, result.logprobs,
                                            result.prompt_logprobs)
            outputs = self._process(updates, stats)
        self._record(stats)
        return outputs

    def _step_async(self) -> list[RequestOutput]:
        stats = IterationStats()
        if self._pending is not None and self._needs_known_tokens():
            launched = None  # let the step in flight land before scheduling on its tokens
        else:
            sched_out = self.scheduler.schedule()
            launched = None
            if not sched_out.is_empty:
                launched = self.runner.launch(sched_out, self._block_ids(sched_out), self._pending)
                self._count_prompt_tokens(sched_out, stats)
                launched.pending = self.scheduler.advance(sched_out)
        outputs: list[RequestOutput] = []
        if self._pending is not None:
            result = self.runner.resolve(self._pending)
            updates = self.scheduler.resolve(self._pending.pending, result.sampled, result.logprobs,
                                             result.prompt_logprobs)
            outputs = self._process(updates, stats)
        self._pending = launched
        self._record(stats)
        return outputs

    def _needs_known_tokens(self) -> bool:
        # Penalties count the previous tokens on the device, so they need them on the host first.
        return any(r.sampling_params.presence_penalty or r.sampling_params.frequency_penalty
                   or r.sampling_params.repetition_penalty != 1.0
                   for r in self.scheduler.running)

    def _block_ids(self, sched_out) -> dict[str, list[int]]:
        return {req.req_id: self.kv.get_block_ids(req.req_id) for req, _ in sched_out.scheduled}

    @staticmethod
    def _count_prompt_tokens(sched_out, stats: IterationStats) -> None:
        for req, n in sched_out.scheduled:
            stats.num_prompt_tokens += max(0, min(n, req.num_prompt_tokens - req.num_computed_tokens))
            stats.num_scheduled_tokens += n

    def _process(self, updates, stats: IterationStats) -> list[RequestOutput]:
        """Token updates -> outputs: latency stats, text and stop strings, finished requests."""
        outputs = []
        now = time.monotonic()
        for update in updates:
            req = update.req
            stats.num_generation_tokens += 1
            if req.last_token_time is None:
                stats.time_to_first_tokens.append(now - req.arrival_time)
            else:
                stats.inter_token_latencies.append(now - req.last_token_time)
            req.last_token_time = now
            out, stop_str = self.output_processor.process(update)
            if stop_str is not None and not update.finished:
                self.scheduler.finish_request(req.req_id, RequestStatus.FINISHED_STOPPED)
                req.truncate_outputs(req.num_output_tokens - req.num_pending_tokens)
            if out.finished:
                self._finish(req, stats)
                self.output_processor.remove(req.req_id)
            outputs.append(out)
        return outputs

    def _finish(self, req: Request, stats: IterationStats) -> None:
        self.runner.free_request(req.req_id)
        now = time.monotonic()
        scheduled = req.first_scheduled_time or now
        first_token = req.first_token_time or now
        params = req.sampling_params
        stats.finished_requests.append(FinishedRequestStats(
            finish_reason=req.status.finish_reason or "abort", e2e_latency=now - req.arrival_time,
            queue_time=scheduled - req.arrival_time,
            num_prompt_tokens=req.num_prompt_tokens, num_generation_tokens=req.num_output_tokens,
            prefill_time=max(0.0, first_token - scheduled), decode_time=max(0.0, now - first_token),
            max_tokens=params.max_tokens))

    def _record(self, stats: IterationStats) -> None:
        if not self.stat_loggers:
            return
        sched_stats = self.scheduler.make_stats()
        for stat_logger in self.stat_loggers:
            stat_logger.record(sched_stats, stats)
