"""`StepSampler`: the sampling half of a step: logits -> grammar mask -> sampler -> the device
broadcast of the ids and the host copy of the results; and the prompt logprobs of a chunk.

The model runner owns the forward half and calls `sample` on every rank once the step's forward
and LM head are enqueued: the sampling rank samples, the others receive its ids.

With structured outputs the mask of step N+1 depends on step N's tokens, which under async
scheduling are still on their way to the host when step N+1 is launched. So the mask waits,
not the launch: `sample` asks the runner for the previous step's tokens (the runner waits for
that step's event, which lands while the GPU already runs this step's forward) and hands them to
the grammar callback, which advances the matchers and fills this step's rows; then the rows go up
(non-blocking, from pinned memory), mask the logits, and the step samples. With the manager's
mask thread on (`StructuredOutputManager.mask_thread`), the rows are filled there instead and
`sample` returns at once with a finisher: the engine's thread resolves the previous step,
schedules the next and prepares its inputs meanwhile, and the runner calls the finisher right
before it launches the next step (or reads this one). The scheduler's resolve of the previous step does not wait for the job
either (manager.accept_resolved). On by default with a GPU under async scheduling; off on CPU,
where it measured slower (profile_grammar_host.py: the forward needs the cores).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from kubeinfer.engine.input_batch import CachedRequestState, StepInputs
from kubeinfer.engine.parallel_state import tp_broadcast_from_first
from kubeinfer.engine.request import PLACEHOLDER
from kubeinfer.engine.sampler import Sampler, SamplingMetadata, pack, prompt_logprobs
from kubeinfer.engine.structured_output.bitmask import apply_bitmask

# (request id, output index, token id) of each token the previous step sampled
KnownTokens = Sequence[tuple[str, int, int]]


class StepSampler:
    """Args:
        device: the logits' device.
        to_host: enqueues a device-to-host copy without waiting for it (the runner's).
        to_device: a host array to the device (the runner's).
        compute_logits: hidden states -> logits (the model's LM head; every rank's share).
        is_sampler: whether this rank samples (tensor rank 0 of the last pipeline stage).
        max_logits_rows: prompt logprobs turn at most this many positions at a time into logits.
    """

    def __init__(self, device: torch.device, to_host: Callable[[torch.Tensor], torch.Tensor],
                 to_device: Callable, compute_logits: Callable[[torch.Tensor], torch.Tensor],
                 is_sampler: bool, max_logits_rows: int):
        self.device = device
        self.sampler = Sampler()
        self._to_host = to_host
        self._to_device = to_device
        self._compute_logits = compute_logits
        self.is_sampler = is_sampler
        self.max_logits_rows = max_logits_rows
        self._last_meta: tuple[tuple[str, ...], SamplingMetadata] | None = None
        # Rank 0 only, set by the engine (structured_output.manager.start_grammar_bitmask):
        # (req_ids, known tokens) -> a Future of their grammar rows on the CPU, after the
        # matchers took the known tokens they had not seen yet.
        self.grammar_bitmask = None
        self.grammar_wait_seconds = 0.0  # (for `kubeinfer bench`)

    def sample(self, step, logits: torch.Tensor, states: list[CachedRequestState],
               constrained: set[str], prev_tokens: Callable[[], KnownTokens]
               ) -> Callable[[], None] | None:
        """One token per row of `logits`, on every rank: the sampling rank samples and broadcasts
        the ids to its tensor group, the others receive them. Fills the step (model_runner's
        PendingStep): `sampled` (the ids on the device, the next step's inputs), `row_of`, `host`
        (the copy on its way to the host), `meta` (sampling rank), and a placeholder `slots`
        entry per row appended to its request's outputs.

        `prev_tokens()` returns the previous step's tokens on the host; it is called only when a
        constrained request samples, since reading them waits for that step. Then the grammar
        rows are filled on the mask thread, and this returns a callable that finishes the step
        (waits for the rows, masks, samples, broadcasts): the runner calls it before it enqueues
        anything else or reads this step, so the engine's thread resolves the previous step
        meanwhile. None when the step is already sampled.
        """
        if not self.is_sampler:
            step.sampled = tp_broadcast_from_first(torch.empty(len(states), dtype=torch.long,
                                                               device=self.device))
            step.host = self._to_host(step.sampled)
            self._add_slots(step, states)
            return None
        rows = [i for i, state in enumerate(states) if state.req_id in constrained]
        if not rows:  # (or every constrained request is in the middle of its prompt)
            self._sample(step, logits, states, None, rows)
            return None
        job = self.grammar_bitmask([states[i].req_id for i in rows], prev_tokens())
        if job.done():  # filled on this thread (the manager's default): sample now
            self._sample(step, logits, states, self._rows(job), rows)
            return None
        # What the runner's next step needs of this one is settled now: its sampling tensors and
        # seeded generators, and a placeholder per row, so the next step's inputs can be prepared
        # before the rows are in (the runner samples this step just before launching that one).
        meta = self.metadata(states)
        generators = self.sampler.generators_for(meta, self.device)
        self._add_slots(step, states)
        return lambda: self._sample(step, logits, states, self._rows(job), rows,
                                    (meta, generators))

    def _rows(self, job) -> torch.Tensor:
        start = time.perf_counter()
        mask = job.result()
        # what the mask still costs the step: the wait for rows the mask thread has not filled
        self.grammar_wait_seconds += time.perf_counter() - start
        return mask

    def _sample(self, step, logits: torch.Tensor, states: list[CachedRequestState],
                mask: torch.Tensor | None, rows: list[int],
                bound: tuple[SamplingMetadata, list[torch.Generator]] | None = None) -> None:
        """`bound`: the metadata and generators taken when the step was launched (its slots
        were added then too); None: take them now."""
        if mask is not None:
            self.apply_grammar(logits, mask, rows)
        step.meta, generators = bound if bound is not None else (self.metadata(states), None)
        sampled, raw_logprobs = self.sampler.sample(logits, step.meta, generators)
        step.sampled = tp_broadcast_from_first(sampled.long().contiguous())
        step.host = self._to_host(pack(step.sampled, raw_logprobs, step.meta))
        if bound is None:
            self._add_slots(step, states)

    @staticmethod
    def _add_slots(step, states: list[CachedRequestState]) -> None:
        # after the sampling metadata, which reads each request's outputs so far
        step.row_of = {state.req_id: i for i, state in enumerate(states)}
        step.slots = [(state, state.append_output_token(PLACEHOLDER)) for state in states]

    def apply_grammar(self, logits: torch.Tensor, mask: torch.Tensor, rows: list[int]) -> None:
        """Mask the constrained rows' logits (`rows`) to their grammars' allowed tokens (`mask`,
        on the CPU), before penalties, temperature and sampling."""
        rows_t = torch.tensor(rows, dtype=torch.int32)
        if self.device.type == "cuda":
            # Both from pinned memory: a copy from pageable memory waits for the stream, which
            # would hold the host until this step's forward is done instead of letting it go on
            # to the previous step's outputs while the GPU computes.
            mask = mask.to(self.device, non_blocking=True)
            rows_t = rows_t.pin_memory().to(self.device, non_blocking=True)
        apply_bitmask(logits, mask, rows_t)

    def metadata(self, states: list[CachedRequestState]) -> SamplingMetadata:
        """The step's sampling tensors. Decode steps usually sample the same requests in the same
        order: their tensors are reused."""
        ids = tuple(state.req_id for state in states)
        last = self._last_meta
        if last is not None and last[0] == ids and last[1].is_reusable:
            return last[1]
        meta = SamplingMetadata.build(states, self.device)
        self._last_meta = (ids, meta)
        return meta

    def prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs) -> torch.Tensor | None:
        """Packed prompt logprobs ([Q, 2 + 2k] on the device, see sampler.prompt_logprobs) of the
        step's prompt_logprobs positions, a bounded number of rows of logits at a time. Every rank
        computes the logits (the LM head gathers); the sampling rank alone the logprobs (None on
        the others)."""
        targets = self._to_device(inputs.prompt_target_ids) if self.is_sampler else None
        k = max(k for _, k, _, _ in inputs.prompt_logprobs_reqs)
        rows = self.max_logits_rows
        parts = []
        for i in range(0, hidden.shape[0], rows):
            logits = self._compute_logits(hidden[i:i + rows])
            if self.is_sampler:
                parts.append(prompt_logprobs(logits, targets[i:i + rows], k))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)
