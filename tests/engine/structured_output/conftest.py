"""Structured-output tests share one tokenizer (SmolLM2's, from the default model's GGUF) and one
compiler per session.

TRITON_INTERPRET is set (when there is no GPU) before the bitmask kernel module is imported, for
the reasons tests/kernels/conftest.py gives; nothing else here launches Triton on CPU tensors.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="session")
def compiler(smollm2_tokenizer):
    from kubeinfer.engine.structured_output.compiler import StructuredOutputCompiler

    c = StructuredOutputCompiler(smollm2_tokenizer, vocab_size=len(smollm2_tokenizer),
                                 eos_token_ids=[smollm2_tokenizer.eos_token_id])
    yield c
    c.shutdown()
