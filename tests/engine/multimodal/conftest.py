"""Multimodal tests: the tiny VLM folders come from tests/conftest.py's `tiny_vlm_dir`."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeinfer.engine.llm import LLM

pytest.importorskip("PIL", reason="pillow is a dependency: pip install pillow")


@contextlib.contextmanager
def cached_llms(folder_of: Callable[[str], Path], **defaults: Any) -> Iterator[Callable[..., LLM]]:
    """make(family, **kwargs) -> one float32 LLM per (family, kwargs) over folder_of(family), shut
    down on exit; a test module's `llms` fixture wraps it with its own defaults."""
    made: dict[tuple, LLM] = {}

    def make(family: str, **kwargs: Any) -> LLM:
        key = (family, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = LLM(str(folder_of(family)), dtype="float32", block_size=8,
                            **{**defaults, **kwargs})
        return made[key]

    try:
        yield make
    finally:
        for llm in made.values():
            llm.shutdown()
