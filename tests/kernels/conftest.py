"""Kernel tests: Triton kernels against the torch references in kubeinfer/kernels/reference.py.

Without a GPU the kernels run on CPU tensors through Triton's interpreter. Triton decides at
decoration time (when a module with @triton.jit functions is imported) whether a kernel is
interpreted, so TRITON_INTERPRET=1 has to be in the environment before kubeinfer.kernels.attention
& co. are imported; the test modules of this folder import them at module level, after this
conftest has run.

The variable stays set for the rest of the pytest process. We accept that, and set it only when
CUDA is unavailable, because:
- on a machine with no GPU no Triton kernel can be compiled anyway, so interpreting can only make
  a kernel run that otherwise could not; nothing else in tests/ launches Triton on CPU tensors
  (ops.py sends CPU tensors to the torch references and imports the Triton modules lazily);
- on a GPU machine we leave it unset, so these same tests (and the @pytest.mark.gpu ones) compile
  and run the real kernels.
If other test folders are collected first and import a Triton kernel module with the variable
unset, that module stays compiled-mode; nothing does that today.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, but reproducible from the test id when one fails.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
