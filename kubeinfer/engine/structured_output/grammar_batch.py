"""`GrammarBatch`: one step's matcher work for many constrained rows at once.

Per step the driver advances every constrained request's matcher by its newest token and fills one
bitmask row per request. One matcher at a time that is a Python call per row (twice per step);
xgrammar's `BatchGrammarMatcher` takes the whole list in one call: `batch_accept_token` loops in
C++ on one thread (so the rows are split into chunks on up to max_threads threads: it releases the
GIL), and `batch_fill_next_token_bitmask` fills the rows on a pool of threads (half the CPUs this
process may use: its affinity mask and cgroup quota, not the host's core count that xgrammar's
"auto" would take). Below `min_rows` rows the per-row path is used: the batch call's set-up
costs more than it saves on a handful of rows.

Rows the grammar does not drive (still reasoning, or the grammar has ended) keep the per-row
semantics of `StructuredOutputMatcher`: their tokens go through `accept_tokens` and their rows
allow every token. `benchmarks/bench_grammar_mask.py` times both paths.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from kubeinfer.engine.cpu_threads import available_cpus
from kubeinfer.engine.structured_output.matcher import StructuredOutputMatcher

# Below this many rows the per-row path is kept: on a few rows either path takes microseconds, and
# the per-row one has no thread hand-off. Not tuned: bench_grammar_mask.py times both at 256 rows.
DEFAULT_MIN_ROWS = 8
# An accept chunk of fewer rows than this is not worth a thread hand-off. A row's accept is ~20 us
# for a random token inside a JSON string (bench_grammar_mask.py: 5.8 ms for 256 rows on one
# thread), so 8 rows are ~160 us of C++ against a hand-off of some microseconds; on the H100 host
# (8 accept threads) 32-row chunks left ~107 rows in 3 chunks, 2.2 ms a step.
DEFAULT_MIN_CHUNK_ROWS = 8


class GrammarBatch:
    """Args:
        max_threads: BatchGrammarMatcher's fill threads (None: half the CPUs this process may use).
        min_rows: the fewest rows that take the batch path.
        min_chunk_rows: the fewest rows of one accept chunk (one thread's share).
    """

    def __init__(self, max_threads: int | None = None, min_rows: int = DEFAULT_MIN_ROWS,
                 min_chunk_rows: int = DEFAULT_MIN_CHUNK_ROWS):
        self.max_threads = max_threads or max(1, available_cpus() // 2)
        self.min_rows = min_rows
        self.min_chunk_rows = min_chunk_rows
        self._batch: Any = None  # made on first use: an engine without constraints needs none
        self._pool: ThreadPoolExecutor | None = None  # the accept's chunks (made on first use)

    def _xgr_batch(self) -> Any:
        if self._batch is None:
            import xgrammar as xgr

            self._batch = xgr.BatchGrammarMatcher(self.max_threads)
        return self._batch

    def accept(self, matchers: Sequence[StructuredOutputMatcher], token_ids: Sequence[int]
               ) -> list[bool]:
        """matchers[i] takes token_ids[i]; whether each accepted it (see
        `StructuredOutputMatcher.accept_tokens`)."""
        if len(matchers) != len(token_ids):
            raise ValueError(f"{len(matchers)} matchers for {len(token_ids)} tokens")
        if len(matchers) < self.min_rows:
            return [m.accept_tokens((t,)) for m, t in zip(matchers, token_ids)]
        accepted = [True] * len(matchers)
        direct = []  # rows whose token goes straight into the grammar
        for i, (m, t) in enumerate(zip(matchers, token_ids)):
            if m.is_grammar_driven:
                direct.append(i)
            else:
                accepted[i] = m.accept_tokens((t,))
        if direct:
            results = self._accept_direct([matchers[i].grammar_matcher for i in direct],
                                          [token_ids[i] for i in direct])
            for i, ok in zip(direct, results):
                if ok:
                    matchers[i].record_grammar_token(token_ids[i])
                accepted[i] = ok
        return accepted

    def _accept_direct(self, grammar_matchers: list, token_ids: list[int]) -> list[bool]:
        """xgrammar's batch accept, in chunks on max_threads threads when there are enough rows:
        it loops in C++ on one thread and releases the GIL, and the matchers are independent
        (each chunk has its own; the compiled grammar they share is read-only, as in the batch
        fill's threads)."""
        import xgrammar as xgr

        accept = xgr.BatchGrammarMatcher.batch_accept_token
        num_chunks = min(self.max_threads, len(token_ids) // self.min_chunk_rows)
        if num_chunks < 2:
            return accept(grammar_matchers, token_ids)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_threads - 1, thread_name_prefix="grammar-accept")
        size = -(-len(token_ids) // num_chunks)
        bounds = [(i, i + size) for i in range(0, len(token_ids), size)]
        futures = [self._pool.submit(accept, grammar_matchers[a:b], token_ids[a:b])
                   for a, b in bounds[1:]]
        a, b = bounds[0]
        results = accept(grammar_matchers[a:b], token_ids[a:b])  # this thread takes a chunk too
        for f in futures:
            results += f.result()
        return results

    def fill(self, matchers: Sequence[StructuredOutputMatcher], bitmask: torch.Tensor) -> None:
        """Row i of `bitmask` <- the allowed next tokens of matchers[i]."""
        if bitmask.shape[0] < len(matchers):
            raise ValueError(f"bitmask has {bitmask.shape[0]} rows for {len(matchers)} matchers")
        if len(matchers) < self.min_rows:
            for row, m in enumerate(matchers):
                m.fill_bitmask_row(bitmask, row)
            return
        rows = []
        for row, m in enumerate(matchers):
            if m.is_grammar_driven:
                rows.append(row)
            else:
                m.fill_bitmask_row(bitmask, row)  # every token allowed
        if rows:
            self._xgr_batch().batch_fill_next_token_bitmask(
                [matchers[r].grammar_matcher for r in rows], bitmask, rows)
