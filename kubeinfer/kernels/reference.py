"""Torch references of every kernel. The CPU path runs these; Triton kernels are tested against them.

Shapes use: T tokens in the flattened batch, R requests, H query heads, KVH key/value heads, D head
size, NB cache blocks of BS tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write new K/V into the paged cache. key/value [T, KVH, D]; caches [NB, BS, KVH, D];
    slot_mapping [T] (slot = block * BS + offset; -1 skips the token, used for padding)."""
    nb, bs = key_cache.shape[:2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    key_cache.view(nb * bs, *key_cache.shape[2:])[slots] = key[valid].to(key_cache.dtype)
    value_cache.view(nb * bs, *value_cache.shape[2:])[slots] = value[valid].to(value_cache.dtype)


def unified_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, max_query_len: int, max_seq_len: int,
                      scale: float, sliding_window: int | None = None,
                      softcap: float | None = None, out: torch.Tensor | None = None,
                      alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each request's query tokens over its paged context.

    q [T, H, D]; caches [NB, BS, KVH, D]; query_start_loc [R+1]; seq_lens [R]; block_tables [R, MB].
    Query token i of request r sits at position seq_lens[r] - query_len[r] + i and sees keys at
    positions <= its own (and > its own - sliding_window when a window is set). softcap, when set,
    applies softcap * tanh(score / softcap) before the softmax. alibi_slopes [H] float32, when set,
    adds slope[h] * (key_pos - query_pos) to head h's scores after the scale (and the cap): ALiBi
    in its relative form, which differs from Bloom's slope * key_pos by a constant per query row
    and so gives the same softmax. Returns [T, H, D] in q's dtype.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    bs, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for r, seq_len in enumerate(lens):
        q0, q1 = qsl[r], qsl[r + 1]
        qlen = q1 - q0
        if qlen == 0:
            continue
        nblk = (seq_len + bs - 1) // bs
        blocks = block_tables[r, :nblk].long()
        k = key_cache[blocks].reshape(nblk * bs, num_kv_heads, head_dim)[:seq_len]
        v = value_cache[blocks].reshape(nblk * bs, num_kv_heads, head_dim)[:seq_len]
        qr = q[q0:q1].float().transpose(0, 1)  # [H, qlen, D]
        k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
        v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = torch.matmul(qr, k.transpose(1, 2)) * scale  # [H, qlen, S]
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        qpos = torch.arange(seq_len - qlen, seq_len, device=q.device).unsqueeze(1)
        kpos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.float()[:, None, None] * (kpos - qpos)
        mask = kpos <= qpos
        if sliding_window:
            mask &= kpos > qpos - sliding_window
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.matmul(probs, v).transpose(0, 1).to(out.dtype)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, N]; computed in float32 and cast back before the weight, as HF's LlamaRMSNorm does."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is taken in x's dtype, as in HF."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary (HF's rotate_half) on the first rotary_dim features of each head.

    positions [T] int; q [T, H, D]; k [T, KVH, D]; cos_sin_cache [max_pos, rotary_dim] float32
    holding cos in its first half and sin in its second. Returns new (q, k) in their dtypes.
    """
    rot = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)  # [T, rot/2]
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(1).to(q.dtype)
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(1).to(q.dtype)

    def apply(x: torch.Tensor) -> torch.Tensor:
        xr, xp = x[..., :rot], x[..., rot:]
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return torch.cat([xr * cos + rotated * sin, xp], dim=-1)

    return apply(q), apply(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2N] = [gate | up] -> silu(gate) * up, [T, N]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2N] = [gate | up] -> gelu(gate, approximate="tanh") * up, [T, N] (Gemma's GeGLU; HF's
    gelu_pytorch_tanh)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
