"""Paged attention layer: writes this step's K/V into the cache, then attends over the cache.

`allocate_kv_cache` makes one tensor for every layer's K and V and binds each layer's pair, each
[num_blocks, block_size, num_kv_heads, head_dim], through `Attention.bind_kv_cache`; the model runner
and the tests' paged runner both go through it. The step's `AttentionMetadata` comes from the
forward context, so model code passes only q, k and v.

ALiBi models (Bloom, MPT, Falcon's alibi variant) pass this rank's per-head slopes; the kernels add
slope[h] * (key_pos - query_pos) to the scores (layers/alibi.py computes the slopes).

Bidirectional spans (engine/attention_spans.py) come with the step's metadata; `span_over_window`
(set by PaliGemma on its layers) says a span's keys stay visible beyond a sliding window.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kubeinfer.engine.forward_context import get_forward_context
from kubeinfer.kernels import ops


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 sliding_window: int | None = None, softcap: float | None = None,
                 alibi_slopes: torch.Tensor | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale, self.sliding_window, self.softcap = scale, sliding_window, softcap
        if alibi_slopes is not None and tuple(alibi_slopes.shape) != (num_heads,):
            raise ValueError(f"alibi_slopes of shape {tuple(alibi_slopes.shape)} do not fit a layer "
                             f"with {num_heads} query heads; pass this rank's slopes, one per head")
        # A float32 buffer: model.to(device) moves it, and CUDA graphs read it from a fixed address.
        self.register_buffer("alibi_slopes", None if alibi_slopes is None else
                             alibi_slopes.float().contiguous(), persistent=False)
        # Plain attributes, not buffers: the cache belongs to the runner, is never saved, and must not
        # be moved or cast by model.to().
        self.k_cache = self.v_cache = torch.tensor([])
        # HF ORs PaliGemma's prefix over the window mask, but ANDs Gemma 3's window over its images
        self.span_over_window = False

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        expected = (self.num_kv_heads, self.head_dim)
        if tuple(k_cache.shape[2:]) != expected or k_cache.shape != v_cache.shape:
            raise ValueError(f"KV cache of shape {tuple(k_cache.shape)} does not fit a layer with "
                             f"{self.num_kv_heads} KV heads of size {self.head_dim}; expected "
                             "[num_blocks, block_size, num_kv_heads, head_dim] for both k and v")
        self.k_cache, self.v_cache = k_cache, v_cache

    def unbind_kv_cache(self) -> None:
        """Drop the cache (after a profiling run), so its memory can be freed."""
        self.k_cache = self.v_cache = torch.tensor([])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H*D]; k, v [T, KVH*D] -> [T, H*D]."""
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        meta = get_forward_context()
        if meta is None:
            # Outside a step (a memory-profiling run, a plain forward): the tokens are one sequence.
            out = self._forward_no_cache(q, k, v)
        elif self.k_cache.numel() == 0:
            raise RuntimeError("attention metadata is set but this layer has no KV cache; the model "
                               "runner must bind_kv_cache() on every layer before running a step")
        else:
            ops.reshape_and_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
            out = ops.unified_attention(
                q, self.k_cache, self.v_cache, query_start_loc=meta.query_start_loc,
                seq_lens=meta.seq_lens, block_tables=meta.block_tables,
                max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len, scale=self.scale,
                sliding_window=self.sliding_window, softcap=self.softcap,
                alibi_slopes=self.alibi_slopes, span_lo=meta.span_lo, span_hi=meta.span_hi,
                span_over_window=self.span_over_window)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _forward_no_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[0]
        pos = torch.arange(n, device=q.device)
        mask = pos[None, :] <= pos[:, None]
        if self.sliding_window:
            mask &= pos[None, :] > pos[:, None] - self.sliding_window
        qh, kh, vh = (x.transpose(0, 1) for x in (q, k, v))  # [heads, T, D]
        if self.alibi_slopes is not None:
            bias = self.alibi_slopes[:, None, None] * (pos[None, :] - pos[:, None]).float()
            mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)  # [H, T, T]
        if self.softcap is None:
            # SDPA keeps a long profiling prompt from materialising [H, T, T] float32 scores.
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale,
                                                 enable_gqa=True)
            return out.transpose(0, 1)
        group = self.num_heads // self.num_kv_heads
        kh, vh = kh.repeat_interleave(group, dim=0).float(), vh.repeat_interleave(group, dim=0).float()
        scores = torch.matmul(qh.float(), kh.transpose(1, 2)) * self.scale
        scores = self.softcap * torch.tanh(scores / self.softcap)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
        probs = F.softmax(scores, dim=-1)
        return torch.matmul(probs, vh).transpose(0, 1).to(q.dtype)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"scale={self.scale:.4g}, sliding_window={self.sliding_window}, softcap={self.softcap}, "
                f"alibi={self.alibi_slopes is not None}")


def get_attention_layers(model: nn.Module) -> list[Attention]:
    """The model's Attention modules in layer order; the runner binds one cache pair to each."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def allocate_kv_cache(layers: list[Attention], num_blocks: int, block_size: int,
                      dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """One uninitialised tensor [2, layers, num_blocks, block_size, kv_heads, head_dim] for every
    layer's K and V, bound to the layers in order; returned so the caller owns (and frees) it."""
    first = layers[0]
    kv_cache = torch.empty(2, len(layers), num_blocks, block_size, first.num_kv_heads,
                           first.head_dim, dtype=dtype, device=device)
    for i, layer in enumerate(layers):
        layer.bind_kv_cache(kv_cache[0, i], kv_cache[1, i])
    return kv_cache
