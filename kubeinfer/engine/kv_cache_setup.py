"""`KVCacheSetup`: the model runner's start, before its first step: how many KV cache blocks fit
(--num-gpu-blocks-override, --kv-cache-memory, or on a GPU a profiling forward pass under
--gpu-memory-utilization), allocating and binding the cache, compiling the Triton kernels'
variants and capturing the CUDA graphs. A base of `ModelRunner` (model_runner.py), whose
attributes it reads: config, model, hf_config, device, dtype, block_size, attn_layers, ...
"""
from __future__ import annotations

import gc
import logging

import torch

from kubeinfer.engine.attention_spans import token_bounds
from kubeinfer.engine.cuda_graphs import CUDAGraphRunner
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.forward_context import (AttentionMetadata, build_attention_arrays,
                                              set_forward_context)
from kubeinfer.engine.layers.attention import allocate_kv_cache
from kubeinfer.engine.parallel_state import is_first_stage, is_last_stage
from kubeinfer.engine.pipeline_cuda_graphs import StageGraphRunner
from kubeinfer.engine.pipeline_stage import IntermediateTensors

logger = logging.getLogger(__name__)

GiB = 1 << 30


class KVCacheSetup:
    # ---- KV cache sizing -----------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * len(self.attn_layers) * self.block_size * self.num_kv_heads * self.head_dim * elem

    def num_blocks_for(self, kv_bytes: int) -> int:
        """Blocks in `kv_bytes` (the smallest of the ranks' `available_kv_bytes`), or
        --num-gpu-blocks-override."""
        if self.config.cache.num_gpu_blocks_override:
            return self.config.cache.num_gpu_blocks_override
        num_blocks = kv_bytes // self.bytes_per_block
        if num_blocks < 1:
            raise ConfigError(
                f"no room for the KV cache: one block needs {self.bytes_per_block / GiB:.3f} GiB but "
                f"only {max(kv_bytes, 0) / GiB:.3f} GiB are left for it. Try increasing "
                "`gpu_memory_utilization` (GPU) or `--kv-cache-memory` (CPU).")
        return int(num_blocks)

    def available_kv_bytes(self) -> int:
        """Bytes for the KV cache on this rank: --num-gpu-blocks-override, else --kv-cache-memory
        (CPU: 1 GiB default), else on GPU what --gpu-memory-utilization leaves after a profiling
        forward pass (a collective: every rank runs it)."""
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
        # an engine built before this one in the process (tests, notebooks) may still be held by a
        # reference cycle; its memory would count as this engine's peak until the collector runs
        gc.collect()
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
        logits = None
        if is_last_stage():
            logits = self.model.compute_logits(hidden[:num_sample])
            torch.softmax(logits, dim=-1)  # the sampler's working set
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - temp_bytes
        del hidden, logits
        self.kv_cache = None
        for layer in self.attn_layers:
            layer.unbind_kv_cache()
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
        self.kv_cache = allocate_kv_cache(self.attn_layers, num_blocks, self.block_size,
                                          self.dtype, self.device)

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate and bind the cache; on GPU compile the kernels and capture the CUDA graphs."""
        self._allocate_kv_cache(num_blocks)
        if self.device.type == "cuda":
            self._warm_up_kernels(num_blocks)
        if self.device.type == "cuda" and not self.config.device.enforce_eager:
            # a pipeline stage captures its share of the forward (pipeline_cuda_graphs.py)
            graph_cls = CUDAGraphRunner if self.pp_size == 1 else StageGraphRunner
            self.graph_runner = graph_cls(
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
            if getattr(self.model, "bidirectional_spans", None) is not None:
                self._run_prompts(query_lens, spans=True)  # the kernels' span variants too
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _run_prompts(self, lens: list[int], spans: bool = False):
        """Forward fresh prompts of the given lengths through the cache's first blocks (request r
        owns a contiguous run of them). For profiling and warm-up only: what it writes is garbage
        in blocks that no request holds yet. A pipeline stage runs alone, on zeros for the
        previous stage's output (and returns its own for the next). spans: each prompt is one
        bidirectional span."""
        per_req = -(-max(lens) // self.block_size)
        tables = [list(range(r * per_req, (r + 1) * per_req)) for r in range(len(lens))]
        arrays = build_attention_arrays([0] * len(lens), lens, tables, self.block_size)
        if spans and max(lens) > 1:
            arrays.span_lo, arrays.span_hi = token_bounds([[(0, n)] for n in lens],
                                                          [0] * len(lens), lens)
        num_tokens = len(arrays.positions)
        args = (torch.zeros(num_tokens, dtype=torch.long, device=self.device),
                self._to_device(arrays.positions))
        if self.pp_size > 1:
            shape = (num_tokens, self.hf_config.hidden_size)
            args += (None if is_first_stage() else IntermediateTensors(
                *(torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2))),)
        with set_forward_context(AttentionMetadata.from_arrays(arrays, self._to_device)):
            return self.model(*args)
