"""Turn a SchedulerOutput into the flat tensors a forward pass needs (built on the host with numpy)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kubeinfer.engine.request import Request
from kubeinfer.engine.scheduler import SchedulerOutput


@dataclass
class InputBatch:
    """Host-side arrays of one step; the runner copies them to the device (or into graph buffers)."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [R + 1] int32
    seq_lens: np.ndarray  # [R] int32
    block_tables: np.ndarray  # [R, W] int32
    logits_indices: np.ndarray  # [S] int64: the last token of each request that samples
    sample_reqs: list[Request]  # the S requests that sample, in batch order
    max_query_len: int
    max_seq_len: int
    # prompt_logprobs: the tokens whose logits predict a prompt token, for the requests that asked
    # and still need them; None in a step with none (the usual case)
    prompt_logits_indices: np.ndarray | None = None  # [Q] int64, into the step's tokens
    prompt_target_ids: np.ndarray | None = None  # [Q] int64: the prompt token each one predicts
    # (request, first position, number of positions) for each such request, in the order of Q
    prompt_logprobs_reqs: list[tuple[Request, int, int]] | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_pure_decode(self) -> bool:
        """Every request computes exactly one token and samples: the CUDA-graph case."""
        return self.max_query_len == 1 and len(self.sample_reqs) == self.num_reqs


def build_input_batch(out: SchedulerOutput, block_ids: dict[str, list[int]], block_size: int,
                      min_table_width: int = 0) -> InputBatch:
    """Lay the scheduled requests end to end.

    Args:
        out: the scheduler's plan; request state is read, never changed.
        block_ids: each scheduled request's block table (KVCacheManager.get_block_ids).
        block_size: tokens per block.
        min_table_width: pad the block-table width up to this (CUDA graphs use a fixed width).
    """
    num_reqs = len(out.scheduled)
    # Plain lists first and one numpy conversion each: per-row numpy writes cost more in Python.
    ids: list[int] = []
    pos: list[int] = []
    query_lens: list[int] = []
    seq_lens_list: list[int] = []
    logits_indices = []
    sample_reqs = []
    prompt_indices: list[int] = []
    prompt_targets: list[int] = []
    prompt_reqs: list[tuple[Request, int, int]] = []
    offset = 0
    for req, n in out.scheduled:
        start = req.num_computed_tokens
        if req.prompt_logprobs is not None:
            _add_prompt_logits(req, start, n, offset, prompt_indices, prompt_targets, prompt_reqs)
        if n == 1:
            ids.append(req.all_token_ids[start])
            pos.append(start)
        else:
            ids.extend(req.all_token_ids[start:start + n])
            pos.extend(range(start, start + n))
        query_lens.append(n)
        seq_lens_list.append(start + n)
        offset += n
        if start + n == req.num_tokens:
            logits_indices.append(offset - 1)
            sample_reqs.append(req)
    tables = [block_ids[req.req_id] for req, _ in out.scheduled]
    width = max(min_table_width, max((len(t) for t in tables), default=1))
    block_tables = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int32)
    block_tables = block_tables.reshape(num_reqs, width)
    input_ids = np.array(ids, dtype=np.int64)
    positions = np.array(pos, dtype=np.int64)
    seq_lens = np.array(seq_lens_list, dtype=np.int32)
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
    np.cumsum(query_lens, out=query_start_loc[1:])
    max_query_len = max(query_lens, default=0)
    # slot = block_tables[req, pos // bs] * bs + pos % bs, for every token at once
    req_of_token = np.repeat(np.arange(num_reqs), np.diff(query_start_loc))
    slot_mapping = (block_tables[req_of_token, positions // block_size].astype(np.int64) * block_size
                    + positions % block_size)
    batch = InputBatch(input_ids=input_ids, positions=positions, slot_mapping=slot_mapping,
                       query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables,
                       logits_indices=np.asarray(logits_indices, dtype=np.int64),
                       sample_reqs=sample_reqs, max_query_len=max_query_len,
                       max_seq_len=int(seq_lens.max()) if num_reqs else 0)
    if prompt_reqs:
        batch.prompt_logits_indices = np.asarray(prompt_indices, dtype=np.int64)
        batch.prompt_target_ids = np.asarray(prompt_targets, dtype=np.int64)
        batch.prompt_logprobs_reqs = prompt_reqs
    return batch


def _add_prompt_logits(req: Request, start: int, n: int, offset: int, indices: list[int],
                       targets: list[int], reqs: list[tuple[Request, int, int]]) -> None:
    """Positions of this chunk [start, start + n) whose logits prompt_logprobs needs: from the
    first not yet collected up to the second-to-last prompt token (the last one's logits sample).
    Every prompt token is known on the host, so the one that the chunk's last position predicts
    is taken from the prompt even when the next chunk computes it."""
    logits_start = req.prompt_logits_start
    if logits_start is None:
        return
    lo = max(start, logits_start)
    hi = min(start + n, req.num_prompt_tokens - 1)
    if lo >= hi:
        return
    indices.extend(range(offset + lo - start, offset + hi - start))
    targets.extend(req.prompt_token_ids[lo + 1:hi + 1])
    reqs.append((req, lo, hi - lo))
