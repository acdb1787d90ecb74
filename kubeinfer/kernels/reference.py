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


# Upper bound on the bytes one padded group may hold at once (float32 K, V and scores); a batch
# past it is attended in several groups of requests, so a CPU with a big batch does not swap.
_GROUP_BYTES = 256 << 20


def unified_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, max_query_len: int, max_seq_len: int,
                      scale: float, sliding_window: int | None = None,
                      softcap: float | None = None, out: torch.Tensor | None = None,
                      alibi_slopes: torch.Tensor | None = None,
                      span_lo: torch.Tensor | None = None, span_hi: torch.Tensor | None = None,
                      span_over_window: bool = False) -> torch.Tensor:
    """Causal attention of each request's query tokens over its paged context.

    q [T, H, D]; caches [NB, BS, KVH, D]; query_start_loc [R+1]; seq_lens [R]; block_tables [R, MB].
    Query token i of request r sits at position seq_lens[r] - query_len[r] + i and sees keys at
    positions <= its own (and > its own - sliding_window when a window is set). softcap, when set,
    applies softcap * tanh(score / softcap) before the softmax. alibi_slopes [H] float32, when set,
    adds slope[h] * (key_pos - query_pos) to head h's scores after the scale (and the cap): ALiBi
    in its relative form, which differs from Bloom's slope * key_pos by a constant per query row
    and so gives the same softmax. Computed in float32; returns [T, H, D] in q's dtype. Rows of `out` that belong to no request's query are left as they were.

    Bidirectional spans (engine/attention_spans.py): span_lo, span_hi [T] int32, when given, let
    query token t see keys up to span_hi[t] (>= its position, < its request's seq len) instead of
    its own position. The window still bounds keys from below (key > pos - window: Gemma 3, whose
    sliding layers AND the window over the or-ed causal and image masks); with span_over_window a
    token also sees its span's keys from span_lo[t] on whatever the window (PaliGemma 2, whose
    prefix is OR-ed over the sliding-window mask).

    Batched, not a loop per request: the requests are padded to [R, KVH, GROUP * Lq, D] queries
    (the GROUP query heads of a KV head folded into the query axis, so K/V are never repeated) and
    [R, KVH, Lk, D] keys/values gathered from the paged cache with one index op, and one
    `scaled_dot_product_attention` runs with a mask that encodes causality, each request's query
    offset, padding and the window. Decodes (1 query token) and longer chunks are padded
    separately, so one prefill in a batch of decodes does not pad every decode to its length.
    max_query_len and max_seq_len are not needed here (the Triton kernel sizes its grid by them).
    """
    if out is None:
        out = torch.empty_like(q)
    starts, seq_lens = query_start_loc.long(), seq_lens.long()
    query_lens = starts[1:] - starts[:-1]
    num_heads, head_dim, num_kv_heads = q.shape[1], q.shape[2], key_cache.shape[2]
    for req_ids in ((query_lens == 1).nonzero().flatten(), (query_lens > 1).nonzero().flatten()):
        if req_ids.numel() == 0:
            continue
        rows, keys = int(query_lens[req_ids].max()), int(seq_lens[req_ids].max())
        per_req = 4 * keys * (2 * num_kv_heads * head_dim + num_heads * rows)
        step = max(1, _GROUP_BYTES // per_req)
        for i in range(0, req_ids.numel(), step):
            _attend_padded(q, key_cache, value_cache, starts, query_lens, seq_lens, block_tables,
                           req_ids[i:i + step], scale, sliding_window, softcap, alibi_slopes, out,
                           (span_lo, span_hi, span_over_window) if span_hi is not None else None)
    return out


def _attend_padded(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   starts: torch.Tensor, query_lens: torch.Tensor, seq_lens: torch.Tensor,
                   block_tables: torch.Tensor, req_ids: torch.Tensor, scale: float,
                   sliding_window: int | None, softcap: float | None,
                   alibi_slopes: torch.Tensor | None, out: torch.Tensor,
                   spans: tuple[torch.Tensor, torch.Tensor, bool] | None = None) -> None:
    """Attention of requests `req_ids` (each with >= 1 query token) as one padded batch."""
    num_reqs, (_, num_heads, head_dim) = req_ids.numel(), q.shape
    num_blocks, block_size, num_kv_heads = key_cache.shape[:3]
    group = num_heads // num_kv_heads
    qlen, slen = query_lens[req_ids], seq_lens[req_ids]
    lq, lk = int(qlen.max()), int(slen.max())
    device = q.device

    # Query row i of request r is token starts[r] + i at position slen - qlen + i; padding rows
    # repeat the last real row (a valid row, so no fully masked softmax) and are dropped at the end.
    row = torch.arange(lq, device=device)
    row_clamped = torch.minimum(row[None, :], (qlen - 1)[:, None])  # [R, Lq]
    tokens = starts[req_ids][:, None] + row_clamped
    qpos = (slen - qlen)[:, None] + row_clamped

    # Key j of request r is at position j. Padding keys read the request's last real slot, never a
    # slot past the sequence (garbage or NaN there would turn 0-probability * NaN into NaN).
    kpos = torch.arange(lk, device=device)
    kpos_clamped = torch.minimum(kpos[None, :], (slen - 1).clamp(min=0)[:, None])  # [R, Lk]
    blocks = block_tables[req_ids].long().gather(1, kpos_clamped // block_size)
    slots = blocks * block_size + kpos_clamped % block_size
    flat = (num_blocks * block_size, num_kv_heads, head_dim)
    k = key_cache.view(flat)[slots].float().permute(0, 2, 1, 3)  # [R, KVH, Lk, D]
    v = value_cache.view(flat)[slots].float().permute(0, 2, 1, 3)

    # Keys past the sequence are excluded by causality (qpos <= slen - 1), and by the scheduler
    # under spans (a span is computed whole, so span_hi <= slen - 1).
    hi = qpos if spans is None else spans[1].long()[tokens]
    mask = kpos[None, None, :] <= hi[:, :, None]  # [R, Lq, Lk]
    if sliding_window:
        lo = qpos - sliding_window + 1
        if spans is not None and spans[2]:
            lo = torch.minimum(lo, spans[0].long()[tokens])
        mask &= kpos[None, None, :] >= lo[:, :, None]
    mask = mask[:, None, None].expand(num_reqs, 1, group, lq, lk).reshape(
        num_reqs, 1, group * lq, lk)
    qg = q[tokens].float().view(num_reqs, lq, num_kv_heads, group, head_dim)
    qg = qg.permute(0, 2, 3, 1, 4).reshape(num_reqs, num_kv_heads, group * lq, head_dim)

    if softcap or alibi_slopes is not None:
        scores = torch.matmul(qg, k.transpose(-1, -2)) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        if alibi_slopes is not None:  # head kvh * group + g is row block g of KV head kvh
            slopes = alibi_slopes.float().view(1, num_kv_heads, group, 1, 1)
            dist = (kpos[None, None, :] - qpos[:, :, None]).float()  # [R, Lq, Lk]
            scores = scores + (slopes * dist[:, None, None]).reshape(scores.shape)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        res = torch.matmul(probs, v)
    else:
        res = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    res = res.reshape(num_reqs, num_kv_heads, group, lq, head_dim).permute(0, 3, 1, 2, 4)
    res = res.reshape(num_reqs, lq, num_heads, head_dim)
    real = row[None, :] < qlen[:, None]
    out[tokens[real]] = res[real].to(out.dtype)


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


def rotary_embedding(positions: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, float32_math: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary (HF's rotate_half) on the first rotary_dim features of each head.

    positions [T] int, or None: token t uses table row t (a vision tower's per-patch angles);
    q [T, H, D]; k [T, KVH, D]; cos_sin_cache [max_pos, rotary_dim] float32 holding cos in its
    first half and sin in its second. Returns new (q, k) in their dtypes.

    Default (HF's apply_rotary_pos_emb): cos/sin rounded to q's dtype and the math in q's dtype.
    float32_math (HF's apply_rotary_pos_emb_vision): `(x.float() * cos + rotate_half(x.float())
    * sin).to(x.dtype)` with cos/sin the table's float32 values.
    """
    rot = cos_sin_cache.shape[1]
    rows = cos_sin_cache[:q.shape[0]] if positions is None else cos_sin_cache[positions.long()]
    cos, sin = rows.chunk(2, dim=-1)  # [T, rot/2]
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(1)
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(1)
    if not float32_math:
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)

    def apply(x: torch.Tensor) -> torch.Tensor:
        # k's result is promote(k, q) as in the kernel (a no-op cast in the default mode)
        out_dtype = torch.promote_types(x.dtype, q.dtype)
        xr, xp = x[..., :rot], x[..., rot:]
        if float32_math:
            xr = xr.float()
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return torch.cat([(xr * cos + rotated * sin).to(out_dtype), xp], dim=-1)

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
