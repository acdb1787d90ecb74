"""Per-request sampling parameters, with vLLM's names and defaults."""
from __future__ import annotations

from dataclasses import dataclass, field


class SamplingParamsError(ValueError):
    """A sampling parameter a user sent is invalid. `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(param: str, msg: str) -> SamplingParamsError:
            return SamplingParamsError(f"{param} {msg}, got {getattr(self, param)!r}.", param)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer of at least 1")
        if self.temperature < 0:
            raise bad("temperature", "must be non-negative")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", "must be -1 (disable) or a positive integer")
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
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) \
                    or not -100 <= bias <= 100:
                raise SamplingParamsError(f"logit_bias values must be numbers in [-100, 100], got "
                                          f"{bias!r} for token {token}.", "logit_bias")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    def clone_for_child(self, index: int) -> "SamplingParams":
        """The params of the index-th of n samples: n=1, and a distinct seed when one was given.

        The samples share their prompt, so only the first computes its prompt_logprobs; the output
        processor hands them to every sample.
        """
        from dataclasses import replace

        seed = None if self.seed is None else self.seed + index
        prompt_logprobs = self.prompt_logprobs if index == 0 else None
        return replace(self, n=1, seed=seed, prompt_logprobs=prompt_logprobs)
