"""Per-request parameters of a pooling request, as vLLM's `PoolingParams`."""
from __future__ import annotations

from dataclasses import dataclass

POOLING_TASKS = ("embed", "classify")


@dataclass
class PoolingParams:
    """`task`: "embed" (/v1/embeddings) or "classify" (/classify); a model serves the one its
    architecture has. `dimensions`: the embedding size the caller asked for; only the model's own
    size is accepted (no matryoshka truncation). `normalize`: None keeps the model's pooler
    setting. Both apply to embeddings only."""

    dimensions: int | None = None
    normalize: bool | None = None
    task: str = "embed"

    def __post_init__(self) -> None:
        if self.task not in POOLING_TASKS:
            raise ValueError(f"PoolingParams.task must be one of {POOLING_TASKS}, got {self.task!r}")

    @property
    def n(self) -> int:
        return 1  # one output per request, so the async front's sample count holds
