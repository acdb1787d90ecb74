"""CUDA graphs for pure-decode batches: persistent input buffers, one graph per captured batch size.

A decode step of B requests is padded up to the next captured size, its inputs are copied into the
persistent buffers, and the graph replays the whole forward pass with no per-kernel launch cost.
Padded rows write no K/V (slot -1) and attend over one token of block 0; their outputs are dropped.
"""
from __future__ import annotations

import bisect
import logging

import torch

from kubeinfer.engine.forward_context import AttentionMetadata, set_forward_context
from kubeinfer.engine.input_batch import StepInputs

logger = logging.getLogger(__name__)

# vLLM's capture sizes: 1, 2, 4, then every 8 up to 512.
CAPTURE_SIZES = [1, 2, 4] + list(range(8, 513, 8))


class CUDAGraphRunner:
    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_model_len: int,
                 block_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 pin_inputs: bool = False):
        self.model = model
        self.sizes = [s for s in CAPTURE_SIZES if s <= max_batch_size]
        if not self.sizes or self.sizes[-1] < max_batch_size:
            self.sizes.append(max_batch_size)
        self.max_model_len = max_model_len
        self.block_size = block_size
        n = self.sizes[-1]
        self.table_width = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        # an M-RoPE model (Qwen2-VL) takes three position ids per token (StepInputs.rope_positions)
        shape = (3, n) if getattr(model, "uses_mrope", False) else (n,)
        self.positions = torch.zeros(shape, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.table_width, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pin_inputs = pin_inputs  # async scheduling: copy from pinned memory (ModelRunner._to_device)
        self.pool = None

    def _meta(self, size: int) -> AttentionMetadata:
        # max_seq_len is the bound, not this batch's value: the graph is replayed for any lengths.
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], query_start_loc=self.query_start_loc[:size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size],
            max_query_len=1, max_seq_len=self.max_model_len)

    @torch.inference_mode()
    def capture(self) -> None:
        for size in reversed(self.sizes):  # largest first so smaller graphs reuse its memory pool
            meta = self._meta(size)
            with set_forward_context(meta):
                self._forward(size)  # warm-up
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self._forward(size)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def _forward(self, size: int) -> None:
        """What a graph of `size` rows records: the forward from the input buffers into `hidden`."""
        self.hidden[:size] = self.model(self.input_ids[:size], self.positions[..., :size])  # [3, size] under M-RoPE

    def can_run(self, batch: StepInputs) -> bool:
        return batch.is_pure_decode and batch.num_reqs <= self.sizes[-1] \
            and batch.block_tables.shape[1] <= self.table_width

    def _host(self, a) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t.pin_memory() if self.pin_inputs else t

    def run(self, batch: StepInputs, fill_ids=None) -> torch.Tensor:
        """Replay the graph for a pure-decode batch; returns hidden states [num_reqs, hidden].
        `fill_ids(input_ids)` may overwrite input ids on the device first (async scheduling)."""
        num = batch.num_reqs
        size = self.sizes[bisect.bisect_left(self.sizes, num)]
        w = batch.block_tables.shape[1]
        self.input_ids[:num].copy_(self._host(batch.input_ids), non_blocking=True)
        if fill_ids is not None:
            fill_ids(self.input_ids[:num])
        self.positions[..., :num].copy_(self._host(batch.rope_positions), non_blocking=True)
        self.slot_mapping[:num].copy_(self._host(batch.slot_mapping), non_blocking=True)
        self.seq_lens[:num].copy_(self._host(batch.seq_lens), non_blocking=True)
        self.block_tables[:num, :w].copy_(self._host(batch.block_tables), non_blocking=True)
        if size > num:  # reset padding rows left over from a larger batch
            self.slot_mapping[num:size].fill_(-1)
            self.seq_lens[num:size].fill_(1)
            self.block_tables[num:size].zero_()
        self.graphs[size].replay()
        return self.hidden[:num]
