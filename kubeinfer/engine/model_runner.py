"""Runs the model for a scheduled step: inputs to the device, forward, logits, sampling.

The runner never changes request state; it reads the scheduled requests and returns sampled tokens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.cuda_graphs import CUDAGraphRunner
from kubeinfer.engine.distributed import StepMessage, TPWorkers, broadcast_from_driver
from kubeinfer.engine.forward_context import AttentionMetadata, set_forward_context
from kubeinfer.engine.input_batch import InputBatch, build_input_batch
from kubeinfer.engine.layers.attention import Attention
from kubeinfer.engine.sampler import (Sampler, SamplingMetadata, pack, prompt_logprobs, unpack,
                                      unpack_prompt_logprobs)
from kubeinfer.engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

GiB = 1 << 30


@dataclass
class StepResult:
    """What a step gives back, by request id: the sampled tokens, their logprobs where asked, and
    (first position, rows) of the prompt logprobs computed this step where asked."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, tuple] | None = None
    prompt_logprobs: dict[str, tuple] | None = None


@dataclass
class PendingStep:
    """A launched step whose sampled tokens have not been read yet (async scheduling)."""

    reqs: list  # the requests that sample, in row order
    meta: SamplingMetadata | None = None
    sampled: torch.Tensor | None = None  # [S] on the device: the next step's inputs come from here
    row_of: dict[str, int] = field(default_factory=dict)
    host: torch.Tensor | None = None  # `pack`ed results, copied (or being copied) to the host
    event: "torch.cuda.Event | None" = None
    pending: list = field(default_factory=list)  # the scheduler's (request, output index) pairs
    # prompt_logprobs: InputBatch.prompt_logprobs_reqs and their packed rows on (or to) the host
    prompt_reqs: list | None = None
    prompt_host: torch.Tensor | None = None


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, hf_config,
                 device: torch.device, dtype: torch.dtype, max_model_len: int,
                 workers: TPWorkers | None = None):
        self.config = config
        self.workers = workers  # tensor parallel: ranks 1..tp-1 follow this runner's steps
        self.model = model
        self.hf_config = hf_config
        self.device = device
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.block_size = config.cache.block_size
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        first = self.attn_layers[0]
        self.num_kv_heads, self.head_dim = first.num_kv_heads, first.head_dim
        self.sampler = Sampler()
        # prompt_logprobs turn this many positions at a time into logits: the rows the memory
        # profile runs through the sampler, so they need no memory it did not count
        self.max_logits_rows = max(1, min(config.scheduler.max_num_seqs,
                                          config.scheduler.max_num_batched_tokens))
        self._last_meta: tuple[tuple[str, ...], SamplingMetadata] | None = None
        self.kv_cache: torch.Tensor | None = None
        self.graph_runner: CUDAGraphRunner | None = None

    # ---- KV cache sizing -----------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * len(self.attn_layers) * self.block_size * self.num_kv_heads * self.head_dim * elem

    def determine_num_blocks(self) -> int:
        """Blocks that fit: --num-gpu-blocks-override, else --kv-cache-memory (CPU: 1 GiB default),
        else on GPU what --gpu-memory-utilization leaves after a profiling forward pass. With
        tensor parallelism every rank profiles its own GPU and the smallest count wins."""
        if self.workers is not None:
            self.workers.send("kv_bytes")
        kv_bytes = self._kv_bytes()
        if self.workers is not None:
            kv_bytes = min([kv_bytes, *self.workers.gather()])
        if self.config.cache.num_gpu_blocks_override:
            return self.config.cache.num_gpu_blocks_override
        num_blocks = kv_bytes // self.bytes_per_block
        if num_blocks < 1:
            raise ConfigError(
                f"no room for the KV cache: one block needs {self.bytes_per_block / GiB:.3f} GiB but "
                f"only {max(kv_bytes, 0) / GiB:.3f} GiB are left for it. Try increasing "
                "`gpu_memory_utilization` (GPU) or `--kv-cache-memory` (CPU).")
        return int(num_blocks)

    def _kv_bytes(self) -> int:
        cache = self.config.cache
        if cache.num_gpu_blocks_override:
            return cache.num_gpu_blocks_override * self.bytes_per_block
        if cache.kv_cache_memory is not None:
            return cache.kv_cache_memory
        if self.device.type == "cuda":
            return self._profile_gpu_kv_bytes()
        return cache.DEFAULT_CPU_KV_BYTES

    @torch.inference_mode()
    def _profile_gpu_kv_bytes(self) -> int:
        """Run the largest batch the scheduler can build and see what memory is left."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        num_tokens = self.config.scheduler.max_num_batched_tokens
        seq_len = min(self.max_model_len, num_tokens)
        num_seqs = -(-num_tokens // seq_len)
        blocks_per_seq = -(-seq_len // self.block_size)
        self._allocate_kv_cache(num_seqs * blocks_per_seq)
        temp_bytes = self.kv_cache.numel() * self.kv_cache.element_size()
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        hidden = self._run_prompts(lens)
        num_sample = min(self.config.scheduler.max_num_seqs, num_tokens)
        logits = self.model.compute_logits(hidden[:num_sample])
        torch.softmax(logits, dim=-1)  # the sampler's working set
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - temp_bytes
        del hidden, logits
        self.kv_cache = None
        self._bind_kv_cache(None)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        non_torch = total - free - torch.cuda.memory_reserved()
        budget = total * self.config.cache.gpu_memory_utilization
        graphs = 0 if self.config.device.enforce_eager else GiB // 2
        kv_bytes = int(budget - peak - non_torch - graphs)
        logger.info("memory profile: total %.2f GiB x %.2f, weights+activations peak %.2f GiB, "
                    "non-torch %.2f GiB, KV cache %.2f GiB", total / GiB,
                    self.config.cache.gpu_memory_utilization, peak / GiB, non_torch / GiB,
                    kv_bytes / GiB)
        return kv_bytes

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        # one tensor for every layer's K and V: [2, layers, blocks, block_size, kv_heads, head_dim]
        self.kv_cache = torch.empty(2, len(self.attn_layers), num_blocks, self.block_size,
                                    self.num_kv_heads, self.head_dim, dtype=self.dtype,
                                    device=self.device)
        self._bind_kv_cache(self.kv_cache)

    def _bind_kv_cache(self, kv_cache: torch.Tensor | None) -> None:
        for i, layer in enumerate(self.attn_layers):
            if kv_cache is None:
                layer.k_cache = layer.v_cache = torch.empty(0)
            else:
                layer.k_cache, layer.v_cache = kv_cache[0, i], kv_cache[1, i]

    def init_kv_cache(self, num_blocks: int) -> None:
        if self.workers is not None:
            self.workers.send("init_kv_cache", num_blocks)
        self._allocate_kv_cache(num_blocks)
        if self.device.type == "cuda":
            self._warm_up_kernels(num_blocks)
        if self.device.type == "cuda" and not self.config.device.enforce_eager:
            self.graph_runner = CUDAGraphRunner(
                self.model, max_batch_size=min(self.config.scheduler.max_num_seqs, 512),
                max_model_len=self.max_model_len, block_size=self.block_size,
                hidden_size=self.hf_config.hidden_size, dtype=self.dtype, device=self.device,
                pin_inputs=self.config.scheduler.async_scheduling)
            self.graph_runner.capture()

    @torch.inference_mode()
    def _warm_up_kernels(self, num_blocks: int) -> None:
        """Compile the Triton kernels' mixed-batch variants now, not on a user's first request.

        The attention kernel specialises on its Q-tile size (16, 64 or 128 rows), which follows the
        batch's longest query; one forward per size compiles them all. The K/V written into the
        blocks used here is garbage that no request reads: every block is still free.
        """
        budget = self.config.scheduler.max_num_batched_tokens
        cap = min(self.max_model_len, num_blocks * self.block_size // 2, budget)
        for query_lens in ([8, 1], [64, 1], [cap]):
            if sum(query_lens) > min(budget, num_blocks * self.block_size) or max(query_lens) > cap:
                continue
            self._run_prompts(query_lens)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _run_prompts(self, lens: list[int]) -> torch.Tensor:
        """Forward fresh prompts of the given lengths through the cache's first blocks (request r
        owns a contiguous run of them). For profiling and warm-up only: what it writes is garbage
        in blocks that no request holds yet."""
        blocks_per_req = -(-max(lens) // self.block_size)
        tables = np.arange(len(lens) * blocks_per_req, dtype=np.int32).reshape(len(lens), -1)
        positions = np.concatenate([np.arange(n) for n in lens])
        req = np.repeat(np.arange(len(lens)), lens)
        slots = tables[req, positions // self.block_size].astype(np.int64) * self.block_size \
            + positions % self.block_size
        meta = AttentionMetadata(
            slot_mapping=self._to_device(slots),
            query_start_loc=self._to_device(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)),
            seq_lens=self._to_device(np.asarray(lens, dtype=np.int32)),
            block_tables=self._to_device(tables), max_query_len=max(lens), max_seq_len=max(lens))
        with set_forward_context(meta):
            return self.model(torch.zeros(len(positions), dtype=torch.long, device=self.device),
                              self._to_device(positions))

    # ---- the step ------------------------------------------------------------------------------
    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.device.type != "cuda":
            return t
        if self.config.scheduler.async_scheduling:
            # From pageable memory CUDA first waits for the stream, which would stall the host
            # behind the step in flight; from pinned memory the copy is truly asynchronous.
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _forward(self, batch: InputBatch,
                 fill_ids=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states of the sampled rows, and of the prompt_logprobs positions (or None)."""
        if self.graph_runner is not None and batch.prompt_logits_indices is None \
                and self.graph_runner.can_run(batch):
            # one row per request == sampled rows
            return self.graph_runner.run(batch, fill_ids), None
        meta = AttentionMetadata(
            slot_mapping=self._to_device(batch.slot_mapping),
            query_start_loc=self._to_device(batch.query_start_loc),
            seq_lens=self._to_device(batch.seq_lens),
            block_tables=self._to_device(batch.block_tables),
            max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len)
        input_ids = self._to_device(batch.input_ids)
        if fill_ids is not None:
            input_ids = input_ids.clone() if self.device.type == "cpu" else input_ids
            fill_ids(input_ids)
        with set_forward_context(meta):
            hidden = self.model(input_ids, self._to_device(batch.positions))
        prompt_hidden = None
        if batch.prompt_logits_indices is not None:
            prompt_hidden = hidden[self._to_device(batch.prompt_logits_indices)]
        return hidden[self._to_device(batch.logits_indices)], prompt_hidden

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: InputBatch) -> torch.Tensor:
        """Packed prompt logprobs ([Q, 2 + 2k] on the device, see sampler.prompt_logprobs) of the
        step's prompt_logprobs positions, a bounded number of rows of logits at a time."""
        targets = self._to_device(batch.prompt_target_ids)
        k = max(req.sampling_params.prompt_logprobs for req, _, _ in batch.prompt_logprobs_reqs)
        rows = self.max_logits_rows
        parts = [prompt_logprobs(self.model.compute_logits(hidden[i:i + rows]),
                                 targets[i:i + rows], k)
                 for i in range(0, hidden.shape[0], rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, block_ids: dict[str, list[int]]) -> StepResult:
        """Run one step. Returns sampled token ids by request id, logprobs and prompt logprobs
        where asked."""
        batch = build_input_batch(out, block_ids, self.block_size)
        self._send_step(batch)
        hidden, prompt_hidden = self._forward(batch)
        result = StepResult()
        prompt_packed = None
        if prompt_hidden is not None:  # enqueued before sampling, read after its sync
            prompt_packed = self._prompt_logprobs(prompt_hidden, batch)
        if batch.sample_reqs:
            logits = self.model.compute_logits(hidden)
            meta = self._sampling_metadata(batch.sample_reqs)
            sampler_out = self.sampler(logits, meta)
            ids = [req.req_id for req in batch.sample_reqs]
            result.sampled = dict(zip(ids, sampler_out.sampled_token_ids))
            if sampler_out.logprobs is not None:
                result.logprobs = dict(zip(ids, sampler_out.logprobs))
        if prompt_packed is not None:
            result.prompt_logprobs = unpack_prompt_logprobs(prompt_packed.tolist(),
                                                            batch.prompt_logprobs_reqs)
        return result

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, block_ids: dict[str, list[int]],
               prev: "PendingStep | None") -> "PendingStep":
        """Start a step without waiting for it (async scheduling). Input tokens still PLACEHOLDER on
        the host are the previous step's samples: they are copied into place on the device."""
        batch = build_input_batch(out, block_ids, self.block_size)
        fill_ids, src = None, None
        holes = np.flatnonzero(batch.input_ids < 0)
        if len(holes):
            req_of_token = np.repeat(np.arange(batch.num_reqs), np.diff(batch.query_start_loc))
            src = np.asarray([prev.row_of[out.scheduled[r][0].req_id] for r in req_of_token[holes]],
                             dtype=np.int64)
            fill_ids = self._filler(prev.sampled, holes, src)
        else:
            holes = None
        self._send_step(batch, holes, src, broadcast=True)
        hidden, prompt_hidden = self._forward(batch, fill_ids)
        step = PendingStep(reqs=batch.sample_reqs)
        if prompt_hidden is not None:  # before sampling, as in execute(): TP workers mirror the order
            step.prompt_reqs = batch.prompt_logprobs_reqs
            step.prompt_host = self._to_host(self._prompt_logprobs(prompt_hidden, batch))
        if batch.sample_reqs:
            step.meta = self._sampling_metadata(batch.sample_reqs)
            sampled, raw_logprobs = self.sampler.sample(self.model.compute_logits(hidden), step.meta)
            if self.workers is not None:
                sampled = broadcast_from_driver(sampled.long().contiguous())
            step.sampled = sampled
            step.row_of = {req.req_id: i for i, req in enumerate(batch.sample_reqs)}
            step.host = self._to_host(pack(sampled, raw_logprobs, step.meta))
        if self.device.type == "cuda" and (step.host is not None or step.prompt_host is not None):
            # reading the copies later waits for this step only
            step.event = torch.cuda.Event()
            step.event.record()
        return step

    def _filler(self, prev_sampled: torch.Tensor, holes: np.ndarray, src: np.ndarray):
        """fill_ids for a step whose input ids at `holes` are rows `src` of the previous step's
        samples, still on the device."""
        dst_t, src_t = self._to_device(holes), self._to_device(src)

        def fill_ids(input_ids: torch.Tensor) -> None:
            input_ids[dst_t] = prev_sampled[src_t]
        return fill_ids

    # ---- tensor parallelism --------------------------------------------------------------------
    def _send_step(self, batch: InputBatch, holes=None, src=None, broadcast: bool = False) -> None:
        if self.workers is not None:
            arrays = replace(batch, sample_reqs=[None] * len(batch.sample_reqs),
                             prompt_logprobs_reqs=None)
            self.workers.send("step", StepMessage(arrays, holes, src, broadcast))

    @torch.inference_mode()
    def follow(self, conn) -> None:
        """A tensor-parallel worker's loop: mirror the driver's runner, message by message, so
        every collective meets its peers in the same order."""
        prev_sampled = None
        while True:
            kind, payload = conn.recv()
            if kind == "kv_bytes":
                conn.send(self._kv_bytes())
            elif kind == "init_kv_cache":
                self.init_kv_cache(payload)
            elif kind == "step":
                prev_sampled = self._follow_step(payload, prev_sampled)
            elif kind == "stop":
                return

    def _follow_step(self, msg: StepMessage, prev_sampled: torch.Tensor | None):
        fill_ids = None if msg.holes is None else self._filler(prev_sampled, msg.holes, msg.src)
        hidden, prompt_hidden = self._forward(msg.batch, fill_ids)
        if prompt_hidden is not None:  # the driver's _prompt_logprobs: same row chunks, same gathers
            for i in range(0, prompt_hidden.shape[0], self.max_logits_rows):
                self.model.compute_logits(prompt_hidden[i:i + self.max_logits_rows])
        num_sample = len(msg.batch.sample_reqs)
        if not num_sample:
            return prev_sampled
        self.model.compute_logits(hidden)  # the LM head's all-gather; only the driver samples
        if not msg.broadcast:
            return prev_sampled
        return broadcast_from_driver(torch.empty(num_sample, dtype=torch.long, device=self.device))

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """Enqueue a device-to-host copy without waiting for it (the step's event marks its end)."""
        if self.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def resolve(self, step: "PendingStep") -> StepResult:
        """Wait for a launched step and return its tokens, logprobs and prompt logprobs by
        request id."""
        result = StepResult()
        if step.event is not None:
            step.event.synchronize()
        if step.prompt_host is not None:
            result.prompt_logprobs = unpack_prompt_logprobs(step.prompt_host.tolist(),
                                                            step.prompt_reqs)
        if not step.reqs:
            return result
        sampler_out = unpack(step.host.tolist(), step.meta)
        ids = [req.req_id for req in step.reqs]
        result.sampled = dict(zip(ids, sampler_out.sampled_token_ids))
        if sampler_out.logprobs is not None:
            result.logprobs = dict(zip(ids, sampler_out.logprobs))
        return result

    def _sampling_metadata(self, reqs) -> SamplingMetadata:
        # Decode steps usually sample the same requests in the same order: reuse their tensors.
        ids = tuple(req.req_id for req in reqs)
        if self._last_meta is not None and self._last_meta[0] == ids and self._last_meta[1].is_reusable:
            return self._last_meta[1]
        meta = SamplingMetadata.build(reqs, self.device)
        self._last_meta = (ids, meta)
        return meta

    def free_request(self, req_id: str) -> None:
        self.sampler.free(req_id)
