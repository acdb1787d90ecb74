"""Request bodies of the OpenAI-compatible API, with vLLM's extra sampling fields.

Unknown fields are ignored, as OpenAI's and vLLM's servers do. Types are strict (`true` is no token
id, `"1"` no number) and every number is bounded here, so a value that could not fit the engine's
arrays is a 400 naming the field before anything else runs: integers to the range their use
allows (seeds int64, token ids and counts int32, n to `MAX_N`), floats to finite values.
`SamplingParams` checks the same bounds again, and the finer ranges, for the offline API;
`to_sampling_params` maps names across.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      field_validator)

from kubeinfer.engine.sampling_params import (INT32_MAX, INT64_MAX, INT64_MIN, MAX_N,
                                              RequestOutputKind, SamplingParams,
                                              SamplingParamsError)
from kubeinfer.engine.structured_output.params import StructuredOutputsParams
from kubeinfer.engine.structured_output.request_fields import from_request
from kubeinfer.engine.structured_output.tool_choice import tool_choice_params

Int32 = Annotated[int, Field(strict=True, ge=-INT32_MAX - 1, le=INT32_MAX)]
Count = Annotated[int, Field(strict=True, ge=0, le=INT32_MAX)]
TokenId = Annotated[int, Field(strict=True, ge=0, le=INT32_MAX)]
Seed = Annotated[int, Field(strict=True, ge=INT64_MIN, le=INT64_MAX)]


class _Body(BaseModel):
    # allow_inf_nan=False: NaN and Infinity are not numbers a request can mean
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class _SamplingFields(_Body):
    """Fields that completions and chat share, OpenAI's then vLLM's.

    Unknown fields are kept (not validated) only so that `ignored_fields` can name them in the log,
    as vLLM does: a parameter this server does not know is then visible, not silently lost."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_N)] = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: Int32 | None = None  # and at most the vocabulary size (request_prologue)
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: StrictBool = False
    min_tokens: Count = 0
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    return_tokens_as_token_ids: StrictBool = False  # logprob tokens as "token_id:123"
    return_token_ids: StrictBool = False  # vLLM's: prompt_token_ids and token_ids in the response
    # logprobs of the prompt tokens (and the top-N at each position); strict, so true is no 1
    prompt_logprobs: Int32 | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as a string) -> bias
    priority: Int32 = 0  # vLLM's: with --scheduling-policy priority, lower goes first
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and guided_* fields
    # (engine/structured_output/request_fields.py reads them; at most one may be set)
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         defaults: dict[str, float] | None = None,
                         prompt_logprobs: int | None = None,
                         constraint: StructuredOutputsParams | None = None) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise SamplingParamsError("stream_options can only be set when stream is true.",
                                      "stream_options")
        if constraint is None:
            constraint = self.structured_outputs_params()
        if self.stream and self.prompt_logprobs is not None and self.prompt_logprobs > 0:
            # as vLLM: a stream has no place for them
            raise SamplingParamsError("`prompt_logprobs` are not available when `stream=True`: "
                                      "leave it unset or 0, or do not stream.", "prompt_logprobs")
        kw: dict[str, Any] = {}
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            v = getattr(self, name)
            if v is None and defaults and name in defaults:
                v = defaults[name]  # the model's generation_config / --override-generation-config
            if v is not None:
                kw[name] = v
        if max_tokens is None and defaults and "max_new_tokens" in defaults:
            max_tokens = int(defaults["max_new_tokens"])
        return SamplingParams(
            n=self.n, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=self._logit_bias(), structured_outputs=constraint,
            # a reply that is not streamed needs no deltas: one output, its text decoded once
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            **kw)

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The output constraint the request's fields ask for (RequestError naming the field)."""
        return from_request({name: getattr(self, name) for name in (
            "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
            "guided_grammar")})

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out = {}
        for key, bias in self.logit_bias.items():
            try:
                out[int(key)] = bias
            except ValueError:
                raise SamplingParamsError(f"logit_bias keys must be token ids, like \"50256\"; got "
                                          f"{key!r}.", "logit_bias") from None
        return out

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage so far on every chunk (vLLM's continuous_usage_stats, with include_usage)."""
        return self.include_usage and self.stream_options.continuous_usage_stats


class CompletionRequest(_SamplingFields):
    # a string, a batch of strings, token ids, or a batch of token-id lists
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: Int32 | None = 16
    echo: StrictBool = False
    logprobs: Int32 | None = None
    best_of: Int32 | None = None
    suffix: str | None = None

    def to_sampling_params(self, defaults: dict[str, float] | None = None) -> SamplingParams:
        if self.best_of is not None and self.best_of != self.n:
            raise SamplingParamsError(
                f"best_of must equal n ({self.n}) in this server, got {self.best_of}: "
                "ranking more samples than are returned is not supported.", "best_of")
        if self.suffix:
            raise SamplingParamsError("suffix is not supported.", "suffix")
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo and self.logprobs is not None:
            prompt_logprobs = self.logprobs  # the echoed prompt's logprobs, as vLLM
        return self._sampling_params(self.max_tokens, self.logprobs, defaults, prompt_logprobs)


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Int32 | None = None
    max_completion_tokens: Int32 | None = None
    logprobs: StrictBool = False
    top_logprobs: Int32 | None = None
    # vLLM extras
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None  # OpenAI's deprecated tools: refused as they are
    function_call: str | dict[str, Any] | None = None

    def to_sampling_params(self, defaults: dict[str, float] | None = None) -> SamplingParams:
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise SamplingParamsError("tool_choice needs tools.", "tool_choice")
        if self.functions or self.function_call not in (None, "none"):
            raise SamplingParamsError("functions and function_call (OpenAI's deprecated tool "
                                      "calling) are not supported: send them as `tools` and "
                                      "`tool_choice`.", "functions")
        # tool_choice "required" or a named function constrains the output to the call(s)
        constraint = tool_choice_params(self.tools, self.tool_choice)
        if constraint is not None and self.structured_outputs_params() is not None:
            raise SamplingParamsError("tool_choice \"required\" or a named function constrains "
                                      "the whole output to the tool call; it cannot be combined "
                                      "with response_format or structured_outputs.", "tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise SamplingParamsError("top_logprobs can only be set when logprobs is true.",
                                      "top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        try:
            return self._sampling_params(max_tokens, logprobs, defaults, self.prompt_logprobs,
                                         constraint)
        except SamplingParamsError as e:
            if e.param == "max_tokens" and param != "max_tokens":
                raise SamplingParamsError(str(e).replace("max_tokens", param), param) from None
            if e.param == "logprobs":
                raise SamplingParamsError(str(e).replace("logprobs", "top_logprobs"),
                                          "top_logprobs") from None
            raise


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[StrictInt] = Field(...)


class _PoolingRequest(_Body):
    """What /v1/embeddings and /classify take alike. Strict types, so true is no token id and "1"
    is no number."""

    model: str | None = None
    # a string, a batch of strings, token ids, or a batch of token-id lists
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    user: str | None = None
    # vLLM extras
    truncate_prompt_tokens: Int32 | None = None
    add_special_tokens: StrictBool = True

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        # one message instead of pydantic's per-union-member list
        def is_id(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        ok = isinstance(value, str) or (isinstance(value, list) and (
            all(isinstance(x, str) for x in value) or all(is_id(x) for x in value)
            or all(isinstance(x, list) and all(is_id(t) for t in x) for x in value)))
        if not ok:
            raise ValueError("must be a string, a list of strings, a list of token ids "
                             "(integers) or a list of token-id lists")
        return value


class EmbeddingRequest(_PoolingRequest):
    """OpenAI's embeddings body, with vLLM's extras (truncate_prompt_tokens, add_special_tokens,
    normalize)."""

    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int32 | None = None
    normalize: StrictBool | None = None


class ClassificationRequest(_PoolingRequest):
    """vLLM's ClassificationRequest (/classify)."""
