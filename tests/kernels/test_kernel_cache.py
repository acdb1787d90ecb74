"""Triton reshape_and_cache against reference.reshape_and_cache."""
from __future__ import annotations

import pytest
import torch

from kubeinfer.kernels import cache, reference

HAS_CUDA = torch.cuda.is_available()


def run_both(num_tokens, num_kv_heads, head_size, block_size, num_blocks, dtype, cache_dtype,
             device, strided=False):
    shape = (num_tokens, num_kv_heads, head_size)
    if strided:  # key/value as slices of a fused QKV output
        qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_size, dtype=dtype, device=device)
        key, value = qkv[:, num_kv_heads:2 * num_kv_heads], qkv[:, 2 * num_kv_heads:]
    else:
        key = torch.randn(shape, dtype=dtype, device=device)
        value = torch.randn(shape, dtype=dtype, device=device)
    # Distinct random slots, some tokens skipped (-1) as padding is.
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[torch.rand(num_tokens) < 0.25] = -1
    slot_mapping = slots.to(device)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(cache_shape, dtype=cache_dtype, device=device)
    value_cache = torch.randn(cache_shape, dtype=cache_dtype, device=device)
    want_k, want_v = key_cache.cpu().clone(), value_cache.cpu().clone()
    cache.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    reference.reshape_and_cache(key.cpu(), value.cpu(), want_k, want_v, slot_mapping.cpu())
    # A copy (with at most a cast): exact, and untouched slots keep their old values.
    assert torch.equal(key_cache.cpu(), want_k)
    assert torch.equal(value_cache.cpu(), want_v)


# A float32 -> bfloat16 cache cast is checked on GPU only: Triton's interpreter truncates it.
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float16),
                                               (torch.float32, torch.float16)]
                         + ([(torch.float32, torch.bfloat16)] if HAS_CUDA else []))
@pytest.mark.parametrize("num_kv_heads,head_size", [(2, 64), (1, 80), (3, 96), (2, 128), (1, 256)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_reshape_and_cache(num_kv_heads, head_size, block_size, dtype, cache_dtype, device):
    run_both(7, num_kv_heads, head_size, block_size, 5, dtype, cache_dtype, device)


def test_strided_inputs_and_int32_slots(device):
    run_both(9, 2, 64, 16, 4, torch.float32, torch.float32, device, strided=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_real_size():
    run_both(8192, 8, 128, 16, 4096, torch.bfloat16, torch.bfloat16, "cuda", strided=True)
