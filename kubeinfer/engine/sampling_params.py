"""Per-request sampling parameters, with vLLM's names and defaults, bounded where they are made.

Every number a request sends ends up in a tensor or a torch call (a float32 array, an int64
array, `Generator.manual_seed`), where an out-of-range value would fail inside the engine loop
rather than in the request. So each numeric field is bounded here, for the offline API as for the
server: seeds to int64, token ids and top_k to int32 (and to the model's vocabulary by
`check_vocab`, which needs the engine's vocabulary size), n to `MAX_N`, floats to finite values.
"""
from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field, replace

from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.structured_output.params import StructuredOutputsParams
from kubeinfer.engine.structured_output.request_fields import coerce

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MAX_N = 128  # OpenAI's cap on the samples of one request


def _shown(value: object) -> str:
    """repr, short: a 5,000-digit integer is not worth quoting (and Python refuses to print it)."""
    if _is_int(value) and abs(value) > 10**30:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: object) -> bool:
    # numbers.Integral: numpy integers too (benchmarks draw lengths with numpy)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class RequestOutputKind(enum.IntEnum):
    """What a request's outputs carry (vLLM's names and values). DELTA: one output per step with
    the new tokens and text. FINAL_ONLY: one output, at the end, with all of them (what `LLM`
    and `kubeinfer bench` use, as vLLM's LLM does): text is decoded once, not token by token,
    unless stop strings need it as it comes."""

    DELTA = 1
    FINAL_ONLY = 2


class SamplingParamsError(RequestError):
    """A sampling parameter a user sent is invalid. `param` names the field."""


@dataclass
class SamplingParams:
    """How to sample one request. Validated on construction; errors name the field and the range.

    temperature 0 means greedy. top_k 0 or -1 means no top-k. logprobs=N returns the sampled token's
    logprob and the N most likely tokens' at each step. prompt_logprobs=N returns, for each prompt
    token after the first, its logprob and rank and the N most likely tokens' at that position (raw
    model logprobs, as vLLM's; a request asking for them skips prefix-cache hits).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # token id -> a bias added to its logit before sampling (OpenAI's logit_bias, in [-100, 100])
    logit_bias: dict[int, float] | None = None
    # a JSON schema, regex, choice or grammar the output must match (a dict with vLLM's
    # `structured_outputs` field names is accepted and converted)
    structured_outputs: StructuredOutputsParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.DELTA

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.top_k, float) and self.top_k.is_integer() \
                and abs(self.top_k) <= INT32_MAX:
            self.top_k = int(self.top_k)  # a generation_config.json may write 50.0
        if self.top_k == -1:
            self.top_k = 0
        if self.structured_outputs is not None:
            self.structured_outputs = coerce(self.structured_outputs)
        if isinstance(self.output_kind, bool) or self.output_kind not in tuple(RequestOutputKind):
            raise SamplingParamsError(
                f"output_kind must be RequestOutputKind.DELTA or RequestOutputKind.FINAL_ONLY "
                f"(cumulative outputs are the deltas concatenated), got "
                f"{_shown(self.output_kind)}.", "output_kind")
        self.output_kind = RequestOutputKind(self.output_kind)
        self._validate()

    def _validate(self) -> None:
        def bad(param: str, msg: str) -> SamplingParamsError:
            return SamplingParamsError(f"{param} {msg}, got {_shown(getattr(self, param))}.",
                                       param)

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
        self._validate_ints(bad)
        if self.temperature < 0:
            raise bad("temperature", "must be non-negative")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", "must be -1 or 0 (disable) or a positive integer")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be greater than 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be at most max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                                  or not 0 <= v <= self.MAX_LOGPROBS):
                # vLLM reads -1 as the whole vocabulary
                whole = " (-1, the whole vocabulary, is not supported)" if v == -1 else ""
                raise bad(name, f"must be an integer between 0 and {self.MAX_LOGPROBS}{whole}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise SamplingParamsError(f"logit_bias keys must be token ids (non-negative "
                                          f"integers), got {token!r}.", "logit_bias")
            if token > INT32_MAX:
                raise SamplingParamsError(f"logit_bias names token id {_shown(token)}, which no "
                                          "vocabulary has.", "logit_bias")
            if not _is_number(bias) or not -100 <= bias <= 100:
                raise SamplingParamsError(f"logit_bias values must be numbers in [-100, 100], got "
                                          f"{_shown(bias)} for token {token}.", "logit_bias")

    def _validate_ints(self, bad) -> None:
        """Types and outer bounds of the integer fields, before any arithmetic on them."""
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be an integer between 1 and {MAX_N}")
        if self.seed is not None and (not _is_int(self.seed)
                                      or not INT64_MIN <= self.seed <= INT64_MAX):
            raise bad("seed", f"must be an integer between {INT64_MIN} and {INT64_MAX} (int64)")
        if not _is_int(self.top_k) or self.top_k > INT32_MAX:
            raise bad("top_k", "must be an integer no larger than the vocabulary")
        if self.max_tokens is not None and (not _is_int(self.max_tokens)
                                            or self.max_tokens > INT32_MAX):
            raise bad("max_tokens", f"must be an integer of at most {INT32_MAX}")
        if not _is_int(self.min_tokens) or self.min_tokens > INT32_MAX:
            raise bad("min_tokens", f"must be an integer of at most {INT32_MAX}")
        for t in self.stop_token_ids:
            if not _is_int(t) or not 0 <= t <= INT32_MAX:
                raise SamplingParamsError(f"stop_token_ids must be token ids (non-negative "
                                          f"integers in the vocabulary), got {_shown(t)}.",
                                          "stop_token_ids")

    def check_vocab(self, vocab_size: int) -> None:
        """The bounds that need the model: top_k and every token id within its vocabulary.

        Called by the server with the engine's vocabulary size; the engine calls it for requests
        that did not come through the server."""
        if self.top_k > vocab_size:
            raise SamplingParamsError(f"top_k must be at most the vocabulary size ({vocab_size}), "
                                      f"or -1 for no top-k, got {_shown(self.top_k)}.", "top_k")
        bad = next((t for t in self.stop_token_ids if t >= vocab_size), None)
        if bad is not None:
            raise SamplingParamsError(f"stop_token_ids has token id {_shown(bad)}, outside the "
                                      f"vocabulary [0, {vocab_size}).", "stop_token_ids")
        bad = next((t for t in self.logit_bias or () if t >= vocab_size), None)
        if bad is not None:
            raise SamplingParamsError(f"logit_bias names token id {_shown(bad)}, outside the "
                                      f"vocabulary [0, {vocab_size}).", "logit_bias")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    def clone_for_child(self, index: int) -> "SamplingParams":
        """The params of the index-th of n samples: n=1, and a distinct seed when one was given.

        The samples share their prompt, so only the first computes its prompt_logprobs; the output
        processor hands them to every sample.
        """
        # wrapped into int64, so a seed near the top of the range stays a valid seed
        seed = None if self.seed is None else (self.seed + index - INT64_MIN) % 2**64 + INT64_MIN
        prompt_logprobs = self.prompt_logprobs if index == 0 else None
        return replace(self, n=1, seed=seed, prompt_logprobs=prompt_logprobs)
