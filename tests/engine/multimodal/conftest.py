"""Multimodal tests: tiny VLM folders (tests/fixtures/tiny_vlm.py) built once per session from the
SmolLM2 tokenizer of the default model."""
from __future__ import annotations

import pytest

pytest.importorskip("PIL", reason="pillow is a dependency: pip install pillow")


@pytest.fixture(scope="session")
def tiny_vlm_dir(smollm2_dir, tmp_path_factory):
    """tiny_vlm_dir(family) -> folder of a tiny VLM of that family (read-only)."""
    from tests.fixtures.tiny_vlm import VLM_FAMILIES, build_tiny_vlm

    built = {}

    def make(family: str):
        if family not in VLM_FAMILIES:
            raise ValueError(f"unknown family {family!r}; choose one of {VLM_FAMILIES}")
        if family not in built:
            built[family] = build_tiny_vlm(family, smollm2_dir, tmp_path_factory.mktemp(family))
        return built[family]

    return make
