"""Per-request parameters of an embedding request, as vLLM's `PoolingParams`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolingParams:
    """`dimensions`: the embedding size the caller asked for; only the model's own size is accepted
    (no matryoshka truncation). `normalize`: None keeps the model's pooler setting."""

    dimensions: int | None = None
    normalize: bool | None = None

    @property
    def n(self) -> int:
        return 1  # one output per request, so the async front's sample count holds
