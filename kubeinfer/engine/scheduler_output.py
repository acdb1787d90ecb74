"""What the scheduler hands the device side each step: plain, picklable data, never a Request.

As vLLM v1's: a request the runner has not seen (admitted, or resumed after preemption) comes whole
once, as `NewRequestData`; after that only the diff comes, in `CachedRequestData` (new block ids and
the computed-token count). `num_scheduled_tokens` gives, in batch order, how many tokens each
scheduled request computes this step. `finished_req_ids` and `preempted_req_ids` tell the runner
which requests to drop from its persistent batch since the last step; a preempted one comes back
later as a new request. This is what lets a step cross a pipe to another rank (executor.py).
With pipeline stages only the last stage samples, so `resolved_output_tokens` carries each running
request's last sampled token (known on the host by then) to every rank (pipeline_step.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubeinfer.engine.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    # the outputs so far of a request resumed after preemption (empty for a fresh one)
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    num_computed_tokens: int  # prefix-cache hits: tokens whose K/V is already in the cache
    # the first prompt position whose logits prompt_logprobs still needs; None when none are
    prompt_logits_start: int | None = None
    # the prompt's images (multimodal.inputs.ImageFeature, tensors included), sent once
    mm_features: tuple[Any, ...] = ()
    # bidirectional attention spans (start, end) of the prompt (attention_spans.py)
    bidir_spans: tuple[tuple[int, int], ...] = ()


@dataclass
class CachedRequestData:
    """Requests the runner already holds, by parallel lists."""

    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)  # blocks added since last step
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    # request id -> tokens it computes this step, in batch order
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: list[str] = field(default_factory=list)
    # request id -> indices into its mm_features whose vision encoder runs this step (before the
    # forward that first needs them); and the image hashes whose encoder outputs the runner drops
    scheduled_encoder_inputs: dict[str, list[int]] = field(default_factory=dict)
    freed_encoder_hashes: list[str] = field(default_factory=list)
    # scheduled requests under a structured-output constraint: the driver masks their logits
    structured_output_req_ids: set[str] = field(default_factory=set)
    # pipeline stages: request id -> (output index, token id) of its last sampled token, for
    # the ranks that hold it as a placeholder (every rank but the sampler's); empty with one stage
    resolved_output_tokens: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens
