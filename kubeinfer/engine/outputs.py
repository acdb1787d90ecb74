"""What the engine hands back to its callers, one delta per request per step; and what the model
runner hands back to the engine (`ModelRunnerOutput`)."""
from __future__ import annotations

from dataclasses import dataclass, field

# One generated position's logprobs: the sampled token's logprob and the top-N (token_id, logprob).
SampleLogprobs = tuple[float, list[tuple[int, float]]]


# One prompt position's logprobs: (logprob of the prompt token, its rank, [(token_id, logprob)] of
# the top-k, most likely first).
PromptLogprobsRow = tuple[float, int, list[tuple[int, float]]]


@dataclass
class ModelRunnerOutput:
    """One step's results on the host, by request id: the sampled token of each request whose
    scheduled tokens reached its end, its logprobs where asked, (first position, rows) of the prompt
    logprobs computed this step where asked, and the requests the runner could not prepare (each
    failed on its own; the rest of the step ran without it)."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, SampleLogprobs] | None = None
    prompt_logprobs: dict[str, tuple[int, list[PromptLogprobsRow]]] | None = None
    failed_req_ids: list[str] = field(default_factory=list)


@dataclass
class Logprob:
    """One token's entry in a prompt position's logprobs, as vLLM's `Logprob`.

    `rank` is 1 for the most likely token; `decoded_token` is the token's own text (None without a
    tokenizer).
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One entry per prompt token: None for the first (nothing predicts it), then {token_id: Logprob}
# holding the actual prompt token (with its true rank) and the top-k of that position.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class RequestOutput:
    """New tokens and text of one sample of a request since its last output (for a request
    with output_kind FINAL_ONLY: its only output, at the end, with all of them).

    `request_id` is the caller's id; `index` tells which of the request's n samples this is.
    Text never ends inside a multi-byte character, and never contains a matched stop string.
    """

    request_id: str
    index: int
    prompt_token_ids: list[int]
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[SampleLogprobs] | None = None
    # set on each sample's first output when the request asked for prompt_logprobs
    prompt_logprobs: PromptLogprobs | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    num_output_tokens: int = 0  # total so far
    num_cached_tokens: int = 0
    # with finish_reason "error": the user's mistake that ended it (a RequestError, e.g. a
    # constraint that does not compile); None for an engine failure, whose detail is in the log
    error: Exception | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class CompletionOutput:
    """One finished sample, as the offline `LLM` API returns it."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[SampleLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None = None

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else sum(lp for lp, _ in self.logprobs)


@dataclass
class FinishedRequest:
    """A whole request as `LLM.generate` returns it: the prompt and its n samples."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None


@dataclass
class EmbeddingOutput:
    """One input's embedding from the pooling runner; it arrives whole, so `finished` is always
    true (the field lets the async front treat it as a request's last output)."""

    request_id: str
    embedding: list[float]
    prompt_token_ids: list[int]
    index: int = 0
    finished: bool = True

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class ClassificationOutput:
    """One input's class probabilities from a sequence classifier (pooling runner), as vLLM's
    ClassificationOutput; `label` names the most likely class (config.json's id2label). Always
    whole, as EmbeddingOutput."""

    request_id: str
    probs: list[float]
    prompt_token_ids: list[int]
    label: str = ""
    index: int = 0
    finished: bool = True

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
