"""Runs the model for a scheduled step: the persistent batch, inputs to the device, forward,
logits; the sampling half (grammar masks, sampler, prompt logprobs) is sample_step.py's. Every rank
runs the same methods on the same plain-data step (executor.py); the runner knows nothing of
workers.

`execute_model(SchedulerOutput)` launches a step and returns it unread (`PendingStep`); rank 0 reads
the results with `get_output`, at once (synchronous scheduling) or after launching the next step
(async scheduling): one code path for both. The runner appends sampled tokens to its own batch
(placeholders first, ids once read), so it never needs a Request. Only rank 0 samples; with tensor
parallelism it broadcasts the sampled ids on the device, so every rank fills the next step's inputs
from them without a host round trip and keeps the same batch.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kubeinfer.engine import rank_profiler
from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.cuda_graphs import CUDAGraphRunner
from kubeinfer.engine.encoder_runner import EncoderRunner
from kubeinfer.engine.forward_context import AttentionMetadata, set_forward_context
from kubeinfer.engine.input_batch import CachedRequestState, InputBatch, StepInputs
from kubeinfer.engine.kv_cache_setup import GiB, KVCacheSetup
from kubeinfer.engine.layers.attention import get_attention_layers
from kubeinfer.engine.outputs import ModelRunnerOutput
from kubeinfer.engine.parallel_state import (global_rank, is_last_stage, pp_size,
                                             tp_rank)
from kubeinfer.engine.pipeline_step import execute_stage_step, pipeline_output
from kubeinfer.engine.sample_step import KnownTokens, StepSampler
from kubeinfer.engine.sampler import SamplingMetadata, unpack, unpack_prompt_logprobs
from kubeinfer.engine.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)

__all__ = ["GiB", "ModelRunner", "PendingStep"]


@dataclass
class PendingStep:
    """A launched step whose results have not been read on the host yet."""

    failed_req_ids: list[str] = field(default_factory=list)  # requests that could not join
    # (state, output index) of each sampled token's placeholder, in row order
    slots: list[tuple[CachedRequestState, int]] = field(default_factory=list)
    meta: SamplingMetadata | None = None  # rank 0 only
    sampled: torch.Tensor | None = None  # [S] on the device: the next step's inputs come from here
    row_of: dict[str, int] = field(default_factory=dict)
    host: torch.Tensor | None = None  # `pack`ed results (rank 0) or the ids, copied to the host
    event: "torch.cuda.Event | None" = None
    prompt_reqs: list | None = None  # StepInputs.prompt_logprobs_reqs
    prompt_host: torch.Tensor | None = None  # their packed rows on (or to) the host
    output: ModelRunnerOutput | None = None  # set once read
    index: int = 0  # the runner's count of launched steps: the same step on every rank

    @property
    def is_read(self) -> bool:
        return self.output is not None


class ModelRunner(KVCacheSetup):
    def __init__(self, config: EngineConfig, model: torch.nn.Module, hf_config,
                 device: torch.device, dtype: torch.dtype, max_model_len: int):
        self.config = config
        self.model = model
        self.hf_config = hf_config
        self.device = device
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.is_driver = global_rank() == 0  # the engine's process: its results are read
        # tensor rank 0 of the last pipeline stage samples (the driver, with one stage)
        self.is_sampler = tp_rank() == 0 and is_last_stage()
        self.pp_size = pp_size()
        self._num_launched = 0
        self.block_size = config.cache.block_size
        self.attn_layers = get_attention_layers(model)
        first = self.attn_layers[0]
        self.num_kv_heads, self.head_dim = first.num_kv_heads, first.head_dim
        self.batch = InputBatch(self.block_size, getattr(model, "mrope", None))  # Qwen2-VL: 3-D
        self._failed: set[str] = set()  # requests that could not join; skipped until finished
        self._unread: deque[PendingStep] = deque()
        # with pipeline stages, where the sampling rank puts launched steps for rank 0 instead
        # of keeping them in _unread (pipeline_results.ResultPusher; set by its worker process)
        self.result_sink = None
        self._unsampled = None  # finishes the last step when its grammar rows come (sample_step)
        # prompt_logprobs turn this many positions at a time into logits: the rows the memory
        # profile runs through the sampler, so they need no memory it did not count
        self.max_logits_rows = max(1, min(config.scheduler.max_num_seqs,
                                          config.scheduler.max_num_batched_tokens))
        # the sampling half of a step (sample_step.py); `sampler`, `_sampling_metadata` and
        # `_prompt_logprobs` are its parts under the names pipeline_step.py and
        # benchmarks/profile_engine.py use
        self.sampling = StepSampler(device, self._to_host, self._to_device,
                                    lambda hidden: self.model.compute_logits(hidden),
                                    self.is_sampler, self.max_logits_rows)
        self.sampler, self._sampling_metadata = self.sampling.sampler, self.sampling.metadata
        self._prompt_logprobs = self.sampling.prompt_logprobs
        self.kv_cache: torch.Tensor | None = None
        self.graph_runner: CUDAGraphRunner | None = None
        # vision-language models (models/llava.py): images' encoder outputs and embedding merge
        self.encoders = EncoderRunner(model) if getattr(model, "is_multimodal", False) else None

    @classmethod
    def load(cls, config: EngineConfig, path: Path, device: torch.device) -> "ModelRunner":
        """Load this rank's shard of the model and wrap it (every rank, the same way)."""
        from kubeinfer.engine.loader.hf_config import get_max_model_len
        from kubeinfer.engine.loader.model import load_model

        torch.manual_seed(config.model.seed)
        model, hf_config = load_model(config.model, device, path=path)
        # a vision-language config nests its decoder's (vocabulary, hidden size, context length)
        hf_config = hf_config.get_text_config()
        max_model_len = get_max_model_len(hf_config, config.model.max_model_len)
        return cls(config, model, hf_config, device, next(model.parameters()).dtype, max_model_len)

    # ---- the step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> PendingStep:
        """Update the persistent batch from `out` and launch the step, without waiting for it.

        A request whose data cannot be prepared fails alone (`PendingStep.failed_req_ids`): it is
        left out of this step and skipped in later ones until it is finished. The same happens on
        every rank, since every rank prepares the same data the same way.
        """
        if self.pp_size > 1 or self.encoders is not None:
            self._finish_sampling()
        if self.pp_size == 1:
            self._read_all_but_last()
        prev = self._unread[-1] if self._unread else None
        step = PendingStep(failed_req_ids=self._update_states(out), index=self._num_launched)
        self._num_launched += 1
        if self.pp_size > 1:  # a stage's share; steps stay in flight (pipeline_step.py)
            return execute_stage_step(self, out, step)
        if self.encoders is not None:
            for req_id in self.encoders.run_encoders(out):
                self.batch.remove_request(req_id)
                self._failed.add(req_id)
                step.failed_req_ids.append(req_id)
        scheduled = {r: n for r, n in out.num_scheduled_tokens.items() if r not in self._failed}
        inputs = self.batch.prepare(scheduled) if scheduled else None
        # The previous step samples only now, if its grammar rows were still being filled: the
        # host prepared this step meanwhile, and its launch follows the sampling at once, so
        # the GPU does not wait for the preparing between the two (sample_step.py).
        self._finish_sampling()
        if inputs is not None:
            self._launch(step, inputs, prev, out.structured_output_req_ids)
        self._unread.append(step)
        return step

    def _update_states(self, out: SchedulerOutput) -> list[str]:
        for req_id in out.finished_req_ids:
            self.batch.remove_request(req_id)
            self.sampler.free(req_id)
            if self.encoders is not None:
                self.encoders.remove_request(req_id)
            self._failed.discard(req_id)
        for req_id in out.preempted_req_ids:
            self.batch.remove_request(req_id)  # it comes back whole; its generator stays
        failed = []
        for new in out.scheduled_new_reqs:
            try:
                self.batch.add_request(new)
                self.sampler.add_request(new.req_id, new.sampling_params, self.device)
                if new.mm_features:
                    if self.encoders is None:
                        raise ValueError("images sent to a text-only model")
                    self.encoders.add_request(new.req_id, new.mm_features)
            except Exception:
                logger.exception("request %s: its inputs could not be prepared; it fails, the "
                                 "others go on", new.req_id)
                self.batch.remove_request(new.req_id)
                self._failed.add(new.req_id)
                failed.append(new.req_id)
        cached = out.scheduled_cached_reqs
        for req_id, new_blocks, num_computed in zip(cached.req_ids, cached.new_block_ids,
                                                    cached.num_computed_tokens):
            state = self.batch.states.get(req_id)
            if state is None:
                if req_id in self._failed:
                    continue
                raise RuntimeError(f"request {req_id} is scheduled as running, but the runner "
                                   "does not hold it")
            state.block_ids.extend(new_blocks)
            state.num_computed_tokens = num_computed
        return failed

    def _launch(self, step: PendingStep, inputs: StepInputs, prev: PendingStep | None,
                constrained: set[str] = frozenset()) -> None:
        fill_ids = self._filler(inputs, prev)
        hidden, prompt_hidden = self._forward(inputs, fill_ids)
        if prompt_hidden is not None:  # before sampling, in the same order on every rank
            step.prompt_reqs = inputs.prompt_logprobs_reqs
            packed = self._prompt_logprobs(prompt_hidden, inputs)
            if packed is not None:
                step.prompt_host = self._to_host(packed)
        finish = None
        if inputs.sample_states:
            logits = self.model.compute_logits(hidden)  # every rank: the LM head gathers
            finish = self.sampling.sample(step, logits, inputs.sample_states, constrained,
                                          lambda: self._prev_tokens(prev))
        if finish is None:
            self._record_event(step)
        else:  # grammar rows on their way (sample_step.py): sampled before anything else runs
            self._unsampled = lambda: (finish(), self._record_event(step))

    def _finish_sampling(self) -> None:
        """Sample the step whose grammar rows were still being filled, if any."""
        finish, self._unsampled = self._unsampled, None
        if finish is not None:
            with torch.inference_mode():  # (also called from get_output)
                finish()

    def _record_event(self, step: PendingStep) -> None:
        if self.device.type == "cuda" and (step.host is not None or step.prompt_host is not None):
            # reading the copies later waits for this step only
            step.event = torch.cuda.Event()
            step.event.record()

    def _prev_tokens(self, prev: PendingStep | None) -> KnownTokens:
        """The previous step's sampled tokens, read on the host now (waiting for that step, which
        ran before this one on the device): constrained requests' masks follow them. Only those
        of requests still in the batch as they were: an id may since belong to a new request."""
        if prev is None or not prev.slots:
            return ()
        if not prev.is_read:
            self._read(prev)
        sampled, states = prev.output.sampled, self.batch.states
        return [(state.req_id, index, sampled[state.req_id]) for state, index in prev.slots
                if states.get(state.req_id) is state]

    def _filler(self, inputs: StepInputs, prev: PendingStep | None):
        """fill_ids for a step whose input ids at placeholders are the previous step's samples,
        still on the device; None when every input id is known on the host."""
        holes, req_ids = self.batch.holes(inputs)
        if not len(holes):
            return None
        if prev is None or prev.sampled is None or any(r not in prev.row_of for r in req_ids):
            raise RuntimeError("a step's input token is a placeholder that the previous step did "
                               "not sample")
        dst_t = self._to_device(holes)
        src_t = self._to_device(np.asarray([prev.row_of[r] for r in req_ids], dtype=np.int64))
        prev_sampled = prev.sampled

        def fill_ids(input_ids: torch.Tensor) -> None:
            input_ids[dst_t] = prev_sampled[src_t]
        return fill_ids

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.device.type != "cuda":
            return t
        if self.config.scheduler.async_scheduling:
            # From pageable memory CUDA first waits for the stream, which would stall the host
            # behind the step in flight; from pinned memory the copy is truly asynchronous.
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """Enqueue a device-to-host copy without waiting for it (the step's event marks its end)."""
        if self.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def _forward(self, inputs: StepInputs,
                 fill_ids=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states of the sampled rows, and of the prompt_logprobs positions (or None)."""
        embeds_for = self._image_chunks(inputs)
        if self.graph_runner is not None and inputs.prompt_logits_indices is None \
                and embeds_for is None and self.graph_runner.can_run(inputs):
            # one row per request == sampled rows
            return self.graph_runner.run(inputs, fill_ids), None
        meta = AttentionMetadata.from_arrays(inputs.attn, self._to_device)
        input_ids = self._to_device(inputs.input_ids)
        if fill_ids is not None:
            # on CPU the tensor shares the numpy array's memory: keep the host's placeholders
            input_ids = input_ids.clone() if self.device.type == "cpu" else input_ids
            fill_ids(input_ids)
        with set_forward_context(meta):
            if embeds_for is None:
                hidden = self.model(input_ids, self._to_device(inputs.rope_positions))
            else:  # a chunk covers image positions: merge their encoder rows into the embeddings
                embeds = self.encoders.input_embeds(input_ids, *embeds_for)
                hidden = self.model(input_ids, self._to_device(inputs.rope_positions),
                                    inputs_embeds=embeds)
        prompt_hidden = None
        if inputs.prompt_logits_indices is not None:
            prompt_hidden = hidden[self._to_device(inputs.prompt_logits_indices)]
        return hidden[self._to_device(inputs.logits_indices)], prompt_hidden

    def _image_chunks(self, inputs: StepInputs):
        """(request ids, chunk starts, chunk lengths) when a chunk of the step covers image
        positions, else None (the text-only forward, CUDA graphs allowed)."""
        if self.encoders is None:
            return None
        query_lens = np.diff(inputs.query_start_loc).tolist()
        starts = (inputs.seq_lens[:inputs.num_reqs] - np.diff(inputs.query_start_loc)).tolist()
        if not self.encoders.needs_embeds(inputs.req_ids, starts, query_lens):
            return None
        return inputs.req_ids, starts, query_lens

    # ---- reading a step's results --------------------------------------------------------------
    def _read_all_but_last(self) -> None:
        """Put the sampled ids of every step older than the last one into the batch: its inputs
        are only ever filled on the device from the last step's samples."""
        while len(self._unread) > 1:
            step = self._unread.popleft()
            if not step.is_read:
                self._read(step)

    def get_output(self, step: PendingStep) -> ModelRunnerOutput:
        """Wait for a launched step (rank 0) and return its tokens, logprobs and prompt logprobs
        by request id; its sampled ids take their placeholders' places in the batch."""
        if not step.is_read:
            self._read(step)
        return step.output

    def pipeline_output(self, index: int) -> ModelRunnerOutput | None:
        """The sampling rank's results of launched step `index`, which rank 0 fetches with
        pipeline stages (pipeline_step.py); None on the other ranks."""
        return pipeline_output(self, index)

    def profile(self, action: str) -> dict | None:
        """torch.profiler on this rank (every rank, through collective_rpc): "start", then "stop",
        which returns its summary (rank_profiler.py; benchmarks/profile_ttft.py)."""
        return rank_profiler.start() if action == "start" else rank_profiler.stop()

    def _read(self, step: PendingStep) -> None:
        self._finish_sampling()
        result = ModelRunnerOutput(failed_req_ids=step.failed_req_ids)
        if step.event is not None:
            step.event.synchronize()
        if step.prompt_host is not None:
            result.prompt_logprobs = unpack_prompt_logprobs(step.prompt_host.tolist(),
                                                            step.prompt_reqs)
        if step.slots:
            if step.meta is not None:
                sampler_out = unpack(step.host.tolist(), step.meta)
                ids, logprobs = sampler_out.sampled_token_ids, sampler_out.logprobs
            else:
                ids, logprobs = step.host.tolist(), None
            for (state, index), token in zip(step.slots, ids):
                if index < state.num_output_tokens:
                    state.set_output_token(index, token)
            req_ids = [state.req_id for state, _ in step.slots]
            result.sampled = dict(zip(req_ids, ids))
            if logprobs is not None:
                result.logprobs = dict(zip(req_ids, logprobs))
        step.output = result
        step.host = step.prompt_host = step.meta = None  # the host copies are no longer needed
