"""`StepSampler`: the sampling half of a step on the sampling rank: logits -> grammar mask ->
sampler -> the device broadcast of the ids and the host copy of the results.

The model runner owns the forward half and calls `sample` once the step's forward and LM head are
enqueued. With structured outputs the mask of step N+1 depends on step N's tokens, which under
async scheduling are still on their way to the host when step N+1 is launched. So the mask waits
here, not before the launch: `sample` asks the runner for the previous step's tokens (the runner
waits for that step's event, which lands while the GPU already runs this step's forward), hands
them to the grammar callback, which advances the matchers and fills this step's rows on the CPU,
and only then uploads the rows (non-blocking, from pinned memory), masks the logits and samples.
The GPU idles only when the host's matcher work outlasts the forward.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kubeinfer.engine.input_batch import CachedRequestState
from kubeinfer.engine.parallel_state import tp_broadcast_from_first
from kubeinfer.engine.sampler import Sampler, SamplingMetadata, pack
from kubeinfer.engine.structured_output.bitmask import apply_bitmask

# (request id, output index, token id) of each token the previous step sampled
KnownTokens = Sequence[tuple[str, int, int]]


class StepSampler:
    """Args:
        device: the logits' device.
        to_host: enqueues a device-to-host copy without waiting for it (the runner's).
    """

    def __init__(self, device: torch.device, to_host: Callable[[torch.Tensor], torch.Tensor]):
        self.device = device
        self.sampler = Sampler()
        self._to_host = to_host
        self._last_meta: tuple[tuple[str, ...], SamplingMetadata] | None = None
        # Rank 0 only, set by the engine (structured_output.manager.grammar_bitmask):
        # (req_ids, known tokens) -> their grammar rows on the CPU, after the matchers took the
        # known tokens they had not seen yet.
        self.grammar_bitmask = None

    def sample(self, step, logits: torch.Tensor, states: list[CachedRequestState],
               constrained: set[str], prev_tokens: Callable[[], KnownTokens]) -> torch.Tensor:
        """Sample one token per row of `logits` (the sampling rank only); fills `step.meta` and
        `step.host` and returns the sampled ids on the device, broadcast to the tensor group.

        `prev_tokens()` returns the previous step's tokens on the host; it is called only when a
        constrained request samples, since reading them waits for that step.
        """
        if constrained:
            self.apply_grammar(logits, states, constrained, prev_tokens)
        step.meta = self.metadata(states)
        sampled, raw_logprobs = self.sampler.sample(logits, step.meta)
        sampled = tp_broadcast_from_first(sampled.long().contiguous())
        step.host = self._to_host(pack(sampled, raw_logprobs, step.meta))
        return sampled

    def apply_grammar(self, logits: torch.Tensor, states: list[CachedRequestState],
                      constrained: set[str], prev_tokens: Callable[[], KnownTokens]) -> None:
        """Mask the constrained rows' logits to their grammars' allowed tokens, before penalties,
        temperature and sampling. The forward and the LM head are only enqueued on a GPU when this
        runs, so the CPU advances the matchers and fills the rows while the device computes."""
        rows = [i for i, state in enumerate(states) if state.req_id in constrained]
        if not rows:
            return  # every constrained request is in the middle of its prompt
        mask = self.grammar_bitmask([states[i].req_id for i in rows], prev_tokens())
        if self.device.type == "cuda":
            mask = mask.to(self.device, non_blocking=True)
        apply_bitmask(logits, mask, rows)

    def metadata(self, states: list[CachedRequestState]) -> SamplingMetadata:
        """The step's sampling tensors. Decode steps usually sample the same requests in the same
        order: their tensors are reused."""
        ids = tuple(state.req_id for state in states)
        if self._last_meta is not None and self._last_meta[0] == ids and self._last_meta[1].is_reusable:
            return self._last_meta[1]
        meta = SamplingMetadata.build(states, self.device)
        self._last_meta = (ids, meta)
        return meta
