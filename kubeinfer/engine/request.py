"""Per-request state inside the engine, written by the scheduler only. No tensors live here; the
model runner never sees a Request (it gets `scheduler_output.py`'s plain data)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kubeinfer.engine.outputs import PromptLogprobsRow
from kubeinfer.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kubeinfer.engine.multimodal.inputs import ImageFeature

# With async scheduling a sampled token is appended as this placeholder when its step is launched and
# replaced by the real id once the step's results reach the host.
PLACEHOLDER = -1


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything from here on is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6  # the engine failed on this request alone (RequestFailedError)

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
            RequestStatus.FINISHED_ERROR: "error",
        }.get(self)


@dataclass
class Request:
    """One sequence being generated.

    `num_computed_tokens` is the only progress counter: tokens [0, num_computed_tokens) have their
    K/V in the cache. The scheduler hands out tokens beyond it; prefill and decode are not phases.
    """

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # with --scheduling-policy priority: lower goes first
    # the prompt's images in prompt order (multimodal/inputs.py): hashes and placeholder ranges
    # for the scheduler and the KV manager; their tensors only travel on to the runner
    mm_features: tuple[ImageFeature, ...] = ()
    # bidirectional attention spans (start, end) of the prompt (attention_spans.py), ascending
    bidir_spans: tuple[tuple[int, int], ...] = ()

    @property
    def priority_key(self) -> tuple[int, float]:
        return self.priority, self.arrival_time

    output_token_ids: list[int] = field(default_factory=list)
    # logprobs per output token: (sampled logprob, [(token_id, logprob), ...] top-N), when asked for
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache on first schedule
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    num_pending_tokens: int = 0  # trailing PLACEHOLDERs (async scheduling)
    is_capped: bool = False  # its last token is already scheduled: no more steps for it
    # structured outputs: its grammar is compiled and its matcher made (scheduler-owned)
    is_grammar_ready: bool = False
    # timestamps for metrics (monotonic seconds)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        # all_token_ids is kept as one list so appending a token is O(1) and slicing it is cheap.
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        # prompt_logprobs, when asked for: one row per prompt position p >= 1 collected so far,
        # (logprob of prompt token p, its rank, [(token_id, logprob)] top-k), computed from the
        # logits at position p - 1. None when this request does not compute them.
        self.prompt_logprobs: list[PromptLogprobsRow] | None = (
            None if self.sampling_params.prompt_logprobs is None else [])

    @property
    def mm_hash_spans(self) -> list[tuple[int, int, str]]:
        """(offset, length, image hash) of each image: what block hashes fold in."""
        return [(f.placeholder.offset, f.placeholder.length, f.image_hash)
                for f in self.mm_features]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def max_tokens(self) -> int:
        return self.sampling_params.max_tokens  # type: ignore[return-value]

    @property
    def prompt_logits_start(self) -> int | None:
        """The first prompt position whose logits prompt_logprobs still needs, or None when it
        needs none (not asked for, or all collected). Positions before it may come from the prefix
        cache; from it on they must be computed."""
        rows = self.prompt_logprobs
        if rows is None or len(rows) >= self.num_prompt_tokens - 1:
            return None
        return len(rows)

    def add_prompt_logprobs(self, start: int, rows: list[PromptLogprobsRow]) -> None:
        """Collect the rows of positions start + 1, start + 2, ... (logits at start, start + 1,
        ...). Rows already collected are skipped, so a position computed twice is kept once; a
        gap means a position was never computed, a bug that must not pass silently."""
        have = self.prompt_logprobs
        if have is None:
            return
        skip = len(have) - start
        if skip < 0:
            raise RuntimeError(f"request {self.req_id}: prompt logprobs from position {start} "
                               f"arrived before those from {len(have)}")
        have.extend(rows[skip:])

    @property
    def is_constrained(self) -> bool:
        return self.sampling_params.structured_outputs is not None

    @property
    def num_known_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_pending_tokens

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if token_id == PLACEHOLDER:
            self.num_pending_tokens += 1

    def set_output_token(self, index: int, token_id: int) -> None:
        """Replace the placeholder at output position `index` with the sampled id."""
        self.output_token_ids[index] = token_id
        self.all_token_ids[self.num_prompt_tokens + index] = token_id
        self.num_pending_tokens -= 1

    def truncate_outputs(self, num_outputs: int) -> None:
        """Drop outputs after the first num_outputs (placeholders of steps past a finish)."""
        self.num_pending_tokens -= sum(1 for t in self.output_token_ids[num_outputs:] if t == PLACEHOLDER)
        del self.output_token_ids[num_outputs:]
        del self.all_token_ids[self.num_prompt_tokens + num_outputs:]
