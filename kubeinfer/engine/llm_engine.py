"""The engine: add requests, then step(): schedule -> execute -> update.

One pipeline for both scheduling modes: `step()` schedules, launches the step on every rank through
the executor (`execute_model`), and updates the scheduler with a step's results. With async
scheduling the update of step N happens after step N+1 is launched; synchronously the same code
reads the step it just launched. With N pipeline stages up to N steps are in flight (vLLM's batch
queue): each takes requests that no step in flight holds, and they are read in launch order, so
stage 0 computes a step while later stages compute the earlier ones; a call reads the oldest step
before launching the next and detokenizes after, so the stages do not wait for outputs. A request
the runner could not prepare fails alone (status FINISHED_ERROR, finish_reason "error"); anything
else raised by a step propagates to the caller, which must treat the engine as dead.
"""
from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kubeinfer.engine import cpu_threads
from kubeinfer.engine.attention_spans import check_span_budget
from kubeinfer.engine.loader.hf_config import get_eos_token_ids, load_tokenizer
from kubeinfer.engine.loader.resolve import resolve_model
from kubeinfer.engine.config import (DEFAULT_MODEL, DEFAULT_MODEL_SAMPLING, GENERATION_KEYS,
                                     EngineConfig)
from kubeinfer.engine.errors import ConfigError, RequestError
from kubeinfer.engine.executor import Executor
from kubeinfer.engine.kv_cache.manager import KVCacheManager
from kubeinfer.engine.model_runner import GiB, PendingStep
from kubeinfer.engine.multimodal.config import MultiModalConfig
from kubeinfer.engine.multimodal.inputs import MultiModalInputs
from kubeinfer.engine.output_processor import OutputProcessor
from kubeinfer.engine.outputs import RequestOutput
from kubeinfer.engine.request import Request, RequestStatus
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.scheduler import Scheduler
from kubeinfer.engine.scheduler_output import SchedulerOutput
from kubeinfer.engine.stats import FinishedRequestStats, IterationStats, StatLogger
from kubeinfer.engine.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)


@dataclass
class LaunchedStep:
    """A step on its way: the executor's handle, and the scheduler's placeholders to resolve."""

    sched_out: SchedulerOutput
    handle: PendingStep
    placeholders: list  # Scheduler.advance's (request, output index) pairs


class LLMEngine:
    runner_type = "generate"  # EmbeddingEngine's is "pooling"; self.runner is the ModelRunner

    def __init__(self, config: EngineConfig, stat_loggers: list[StatLogger] | tuple = ()):
        self.device = torch.device(config.device.resolve())
        # every rank of this node shares its CPUs (a pipeline stage's too, not only the tensor
        # group's): rank 0 taking them all slowed the other stages' forwards on CPU
        par = config.parallel
        cpu_threads.configure(self.device, par.world_size // par.nnodes)
        if config.scheduler.async_scheduling is None:
            config = replace(config, scheduler=replace(
                config.scheduler, async_scheduling=self.device.type == "cuda"))
        self.config = config
        self.stat_loggers = list(stat_loggers)
        # the media limits (--limit-mm-per-prompt, ...) fail the start, not a later request
        MultiModalConfig.from_model_config(config.model)
        torch.manual_seed(config.model.seed)
        path = resolve_model(config.model, self.device.type)  # GGUF: dequantized for it
        self.executor: Executor | None = Executor(config, path, self.device)
        try:
            self._build(path)
        except BaseException:
            self.shutdown()
            raise

    def _build(self, path: Path) -> None:
        config = self.config
        self.model_path = path  # the resolved folder (the multimodal processor is read from it)
        self.runner = self.executor.driver  # rank 0's runner, for its model and sizes
        self.model, self.hf_config = self.runner.model, self.runner.hf_config
        self.dtype, self.max_model_len = self.runner.dtype, self.runner.max_model_len
        self.tokenizer = None
        if not config.model.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(path, config.model)
        self.eos_token_ids = frozenset(get_eos_token_ids(path, self.tokenizer,
                                                                      self.hf_config))
        self.vocab_size = self.hf_config.vocab_size
        self.default_sampling = self._default_sampling(path)

        # every rank sizes its own memory; the smallest wins
        num_blocks = self.runner.num_blocks_for(min(self.executor.collective_rpc("available_kv_bytes")))
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
        self.executor.collective_rpc("init_kv_cache", num_blocks)
        self.kv = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.structured_output = StructuredOutputManager(
            self.tokenizer, self.vocab_size, self.eos_token_ids, config.scheduler.max_num_seqs,
            reasoning=self._reasoning_parser(),
            pin_memory=self.device.type == "cuda" and bool(config.scheduler.async_scheduling))
        # only rank 0 samples, so only its runner masks logits (workers never see the manager)
        self.runner.sampling.grammar_bitmask = self.structured_output.start_grammar_bitmask
        pp = config.parallel.pipeline_parallel_size
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len,
                                   self.structured_output, pipeline_depth=pp)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.num_blocks = num_blocks
        # launched, unread steps, oldest first: at most one synchronously, two with async
        # scheduling (launch N+1, then read N), one per stage with pipeline stages
        self._in_flight: deque[LaunchedStep] = deque()
        self._max_in_flight = pp if pp > 1 else 1 + bool(config.scheduler.async_scheduling)
        self.peak_steps_in_flight = 0  # the deepest the queue got (benchmarks report it)

    def _reasoning_parser(self):
        """--reasoning-parser's parser over this tokenizer (ConfigError for an unknown name or a
        tokenizer without its tags), or None."""
        name = self.config.model.reasoning_parser
        if not name:
            return None
        from kubeinfer.engine.reasoning.registry import get_reasoning_parser

        if self.tokenizer is None:
            raise ConfigError("--reasoning-parser needs the model's tokenizer: drop "
                              "--skip-tokenizer-init or --reasoning-parser")
        return get_reasoning_parser(name)(self.tokenizer)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (their processes end with this one anyway)."""
        if getattr(self, "structured_output", None) is not None:
            self.structured_output.shutdown()
        if self.executor is not None:
            self.executor.shutdown()

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
                    params: SamplingParams, priority: int = 0,
                    mm_inputs: MultiModalInputs | None = None) -> None:
        """Queue a request (params.n samples of it). Raises RequestError for what the caller sent.
        `mm_inputs` (a vision-language model's prompt from multimodal.MultiModalPreprocessor)
        brings its images; its expanded ids are the prompt."""
        if request_id in self.output_processor.parent_to_children:
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        self.validate_priority(priority)
        mm_features = self.validate_mm_inputs(mm_inputs)
        if mm_inputs is not None:
            prompt_token_ids = mm_inputs.prompt_token_ids
        max_tokens = self.validate_request(prompt_token_ids, params)
        spans = self.bidirectional_spans(len(prompt_token_ids), mm_features)
        for i in range(params.n):
            child = params.clone_for_child(i)
            child.max_tokens = max_tokens
            req_id = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(req_id, list(prompt_token_ids), child, self.eos_token_ids,
                          priority=priority, mm_features=mm_features, bidir_spans=spans)
            self.output_processor.add(request_id, i, req, params.prompt_logprobs is not None)
            self.scheduler.add_request(req)
        self._record(IterationStats())  # the waiting gauge moved

    @property
    def is_multimodal(self) -> bool:
        return getattr(self.model, "is_multimodal", False)

    def validate_mm_inputs(self, mm_inputs: MultiModalInputs | None) -> tuple:
        """The request's images, checked against the model and the step budget: a text-only
        model takes none, and each image's embeddings must fit one step's encoder budget (the
        encoder runs whole in the step that first needs it). Any thread may call it."""
        if mm_inputs is None or not mm_inputs.features:
            return ()
        if not self.is_multimodal:
            raise RequestError(f"{self.config.model.model} is a text-only model and cannot take "
                               "images; send text only, or serve a vision-language model",
                               "messages")
        budget = self.config.scheduler.max_num_batched_tokens
        for i, f in enumerate(mm_inputs.features):
            if f.placeholder.num_embeds > budget:
                raise RequestError(
                    f"image {i} becomes {f.placeholder.num_embeds} embedding tokens, more than one "
                    f"engine step computes (--max-num-batched-tokens {budget}); send a smaller "
                    "image or raise --max-num-batched-tokens", "messages")
        return tuple(mm_inputs.features)

    def bidirectional_spans(self, num_prompt_tokens: int, mm_features: tuple) -> tuple:
        """The prompt's bidirectional attention spans, from the model (Gemma 3's images,
        PaliGemma's prefix; attention_spans.py), each checked to fit one step's token budget."""
        rule = getattr(self.model, "bidirectional_spans", None)
        if rule is None:
            return ()
        spans = tuple(rule(num_prompt_tokens, mm_features))
        check_span_budget(spans, self.config.scheduler.max_num_batched_tokens)
        return spans

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
        params.check_vocab(self.vocab_size)  # top_k, stop ids and logit_bias within the vocabulary
        self.bidirectional_spans(num_prompt, ())  # PaliGemma: the prompt must fit one step
        if params.structured_outputs is not None and self.tokenizer is None:
            raise RequestError("structured outputs need the model's tokenizer, and this engine was "
                               "started with --skip-tokenizer-init: leave the constraint out",
                               params.structured_outputs.param)
        if params.structured_outputs is not None and self.config.parallel.pipeline_parallel_size > 1:
            # the last stage samples, and the grammar masks live with rank 0 (not wired for stages)
            raise RequestError("structured outputs are not supported with "
                               "--pipeline-parallel-size > 1 yet: serve the model with tensor "
                               "parallelism only, or leave the constraint out",
                               params.structured_outputs.param)
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
                outputs.append(self.output_processor.finished_early(req))
            self.output_processor.remove(req_id)
        if outputs:
            self._record(IterationStats())  # gauges follow aborts, not only steps
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    @property
    def num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished_requests

    def kv_cache_usage(self) -> tuple[int, int]:
        """(free blocks, total blocks) of the KV cache."""
        return self.kv.num_free_blocks, self.num_blocks

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule -> execute -> update. A step is launched while fewer than `_max_in_flight`
        are; the oldest is read once the queue is full or nothing new was launched. With async
        scheduling, step N+1 is launched before step N's results are read, and this returns step
        N's outputs; synchronously the step launched is the step read. With pipeline stages one
        step per stage stays in flight between calls: a call reads the oldest, launches the next
        (often with the requests just read) and only then makes the read step's outputs."""
        stats = IterationStats()
        queue = self._in_flight
        failed: list[RequestOutput] = []  # requests that could not join a step read here
        landed = []
        pipelined = self.scheduler.in_flight.enabled
        if pipelined and len(queue) >= self._max_in_flight:
            # with stages the queue stays full between calls: read the oldest step first, so its
            # requests can go into the step launched now, and turn its tokens into outputs
            # (detokenizing, stop strings) only after that launch, while the stages compute
            landed.append(self._land(queue.popleft(), stats, failed))
        launched = None
        # penalties count the previous tokens on the device: let the step in flight land first
        # (with pipeline stages a request waits for its step anyway: in_flight.py)
        if len(queue) < self._max_in_flight and (
                not queue or pipelined or not self._needs_known_tokens()):
            sched_out = self.scheduler.schedule()
            if not sched_out.is_empty:
                handle = self.executor.execute_model(sched_out)
                launched = LaunchedStep(sched_out, handle, self.scheduler.advance(sched_out))
                stats.num_scheduled_tokens += sched_out.total_num_scheduled_tokens
                queue.append(launched)
                self.peak_steps_in_flight = max(self.peak_steps_in_flight, len(queue))
        if queue and not landed and (launched is None or
                                     (not pipelined and len(queue) >= self._max_in_flight)):
            landed.append(self._land(queue.popleft(), stats, failed))
        if launched is None and not landed and self.scheduler.compiling:
            self.structured_output.wait_for_any(0.05)  # only grammars are left: no busy loop
        outputs = self._grammar_failures(stats) + failed
        for updates in landed:
            outputs += self._process(updates, stats)
        self._record(stats)
        return outputs

    def _land(self, step: LaunchedStep, stats: IterationStats, failed: list[RequestOutput]):
        """Read a step's results into the scheduler (requests that could not join end in
        `failed`); returns its token updates, for `_process`."""
        result = self.executor.get_output(step.handle)
        for req_id in result.failed_req_ids:
            out = self._fail(req_id, stats)
            if out is not None:
                failed.append(out)
        return self.scheduler.resolve(step.placeholders, result)

    def _fail(self, req_id: str, stats: IterationStats) -> RequestOutput | None:
        """A request the runner could not prepare ends with an error; the rest go on. The
        exception is in the log with the request id; callers get a generic failure."""
        req = self.scheduler.finish_request(req_id, RequestStatus.FINISHED_ERROR)
        if req is None:
            return None
        out = self.output_processor.finished_early(req)
        self._finish(req, stats)
        self.output_processor.remove(req_id)
        return out

    def _grammar_failures(self, stats: IterationStats) -> list[RequestOutput]:
        """Requests whose constraint did not compile end alone, with the compiler's message."""
        outputs = []
        failures, self.scheduler.grammar_failures = self.scheduler.grammar_failures, []
        for req, error in failures:
            logger.info("request %s: its constraint did not compile: %s", req.req_id, error)
            out = self.output_processor.finished_early(req)
            out.error = error
            self._finish(req, stats)
            self.output_processor.remove(req.req_id)
            outputs.append(out)
        return outputs

    def _needs_known_tokens(self) -> bool:
        # penalties count the previous tokens on the device. (A grammar's mask follows them too,
        # but the runner waits for them itself after launching the forward: sample_step.py.)
        return any(r.sampling_params.presence_penalty
                   or r.sampling_params.frequency_penalty
                   or r.sampling_params.repetition_penalty != 1.0
                   for r in self.scheduler.running)

    def _process(self, updates, stats: IterationStats) -> list[RequestOutput]:
        """Token updates -> outputs: latency stats, text and stop strings, finished requests."""
        outputs = []
        now = time.monotonic()
        for update in updates:
            req = update.req
            stats.num_generation_tokens += 1
            if req.last_token_time is None:
                # as vLLM: the whole prompt, cached or not, once its first token is out
                stats.num_prompt_tokens += req.num_prompt_tokens
                stats.time_to_first_tokens.append(now - req.arrival_time)
            else:
                stats.inter_token_latencies.append(now - req.last_token_time)
            req.last_token_time = now
            out, stop_str = self.output_processor.process(update)
            if out is None:  # a final-only request between its first and last token
                continue
            if stop_str is not None and not update.finished:
                self.scheduler.finish_request(req.req_id, RequestStatus.FINISHED_STOPPED)
                req.truncate_outputs(req.num_output_tokens - req.num_pending_tokens)
            if out.finished:
                self._finish(req, stats)
                self.output_processor.remove(req.req_id)
            outputs.append(out)
        return outputs

    def _finish(self, req: Request, stats: IterationStats) -> None:
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
