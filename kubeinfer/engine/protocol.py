"""The engine's two interfaces, so no layer duck-types another.

- `Engine`: what a synchronous engine does (`LLMEngine` generates, `EmbeddingEngine` pools); the
  offline `LLM` and the asyncio front drive either through it.
- `EngineClient`: what the HTTP server needs from the engine (`AsyncLLM` implements it); the server
  depends on this protocol only, never on a concrete engine class.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from kubeinfer.engine.config import EngineConfig
    from kubeinfer.engine.outputs import EmbeddingOutput, RequestOutput
    from kubeinfer.engine.pooling_params import PoolingParams
    from kubeinfer.engine.sampling_params import SamplingParams

RunnerType = Literal["generate", "pooling"]


@runtime_checkable
class Engine(Protocol):
    """A synchronous engine: requests in, `step()` until none is unfinished."""

    runner_type: RunnerType
    config: "EngineConfig"
    tokenizer: Any  # a transformers tokenizer, or None with --skip-tokenizer-init
    max_model_len: int
    vocab_size: int
    default_sampling: dict[str, float]

    def validate_request(self, prompt_token_ids: list[int],
                         params: "SamplingParams | PoolingParams") -> Any:
        """Raise RequestError for what the caller sent; any thread may call it."""

    def validate_priority(self, priority: int) -> None:
        """Raise RequestError for a priority this engine cannot honour."""

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: "SamplingParams | PoolingParams", priority: int = 0) -> None:
        """Queue a request. The generate engine also takes `mm_inputs=` (a vision-language
        prompt's images, multimodal.MultiModalInputs)."""

    def abort_request(self, request_id: str) -> list: ...

    def has_unfinished_requests(self) -> bool: ...

    @property
    def num_unfinished_requests(self) -> int: ...

    def step(self) -> list["RequestOutput | EmbeddingOutput"]: ...

    def kv_cache_usage(self) -> tuple[int, int]:
        """(free blocks, total blocks); (0, 0) for an engine with no KV cache."""

    def shutdown(self) -> None: ...


@runtime_checkable
class EngineClient(Protocol):
    """The asyncio engine as the server sees it."""

    runner_type: RunnerType
    config: "EngineConfig"
    tokenizer: Any
    max_model_len: int
    vocab_size: int
    served_model_names: tuple[str, ...]
    default_sampling: dict[str, float]

    def start(self) -> None: ...

    def is_alive(self) -> bool: ...

    async def shutdown(self) -> None: ...

    def generate(self, prompt_token_ids: list[int], params: "SamplingParams | PoolingParams",
                 request_id: str, priority: int = 0, mm_inputs: Any = None
                 ) -> AsyncIterator["RequestOutput | EmbeddingOutput"]:
        """Deltas of each of params.n samples until all finish. RequestError before the first
        item for a request the engine cannot take (images included: `mm_inputs`, a
        multimodal.MultiModalInputs); RequestFailedError if the engine fails on it;
        EngineDeadError if the loop stopped. Closing the iterator aborts the request."""

    async def encode(self, prompt_token_ids: list[int], params: "PoolingParams",
                     request_id: str) -> "EmbeddingOutput": ...

    def prepare_embedding_input(self, prompt: str | list[int], params: "PoolingParams",
                                truncate_prompt_tokens: int | None = None,
                                add_special_tokens: bool = True,
                                label: str = "input") -> list[int]: ...

    async def abort(self, request_id: str) -> None: ...

    def kv_cache_free_blocks(self) -> int: ...

    def kv_cache_num_blocks(self) -> int: ...

    def num_unfinished_requests(self) -> int: ...
