#!/usr/bin/env python3
"""Check and time kubeinfer's Triton kernels against their torch references on a CUDA GPU.

    python3 benchmarks/bench_kernels.py            # from the repo root

Each case is first checked against kubeinfer/kernels/reference.py at its real size, then timed
with triton.testing.do_bench (median). Bandwidth-bound kernels report GB/s (bytes read + written,
counted as the fewest bytes the op must move) and the fraction of a device-to-device copy measured
here; prefill attention reports TFLOP/s. A table is printed last; every row is also printed as a
JSON line (prefix "JSON ").
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from kubeinfer.kernels import (activation, attention, cache, moe, moe_reference, norm,  # noqa: E402
                               reference, rotary)

DTYPE = torch.bfloat16
ROWS: list[dict] = []


def timed(fn, graph: bool = False) -> float:
    """Median milliseconds. graph=True replays a CUDA graph of fn, as the engine does for decode
    steps: without it a launch's host overhead (tens of microseconds for a Triton launch from
    Python) shows up as idle GPU time between the two kernels of the split-KV path."""
    if graph:
        return do_bench_cudagraph(fn, rep=200, return_mode="median")
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def record(name: str, ms: float, nbytes: float | None = None, flops: float | None = None,
           ref_ms: float | None = None, copy_gbs: float | None = None, **extra) -> None:
    row = {"name": name, "ms": round(ms, 4)}
    if nbytes is not None:
        row["GB/s"] = round(nbytes / ms / 1e6, 1)
        if copy_gbs:
            row["of_copy"] = round(row["GB/s"] / copy_gbs, 3)
    if flops is not None:
        row["TFLOP/s"] = round(flops / ms / 1e9, 1)
    if ref_ms is not None:
        row["ref_ms"] = round(ref_ms, 4)
        row["speedup"] = round(ref_ms / ms, 2)
    row.update(extra)
    ROWS.append(row)
    print("JSON " + json.dumps(row), flush=True)


def check(name: str, got, want, atol: float, rtol: float) -> None:
    got, want = got.float(), want.to(got.device).float()
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite output")
    err = ((got - want).norm() / want.norm()).item()
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    print(f"ok    {name}: relative L2 error {err:.2e}", flush=True)


def copy_bandwidth() -> float:
    src = torch.randn(1 << 30, device="cuda", dtype=DTYPE)  # 2 GiB
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    record("d2d copy 2GiB bf16", ms, nbytes=nbytes)
    del src, dst
    return nbytes / ms / 1e6


def paged_batch(query_lens, seq_lens, num_heads, num_kv_heads, head_size, block_size):
    blocks = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    block_tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device="cuda")
    start = 0
    for r, n in enumerate(blocks):
        block_tables[r, :n] = perm[start:start + n]
        start += n
    qsl = torch.tensor([0] + list(query_lens), device="cuda").cumsum(0).to(torch.int32)
    return dict(q=torch.randn(sum(query_lens), num_heads, head_size, device="cuda", dtype=DTYPE),
                key_cache=torch.randn(shape, device="cuda", dtype=DTYPE),
                value_cache=torch.randn(shape, device="cuda", dtype=DTYPE),
                query_start_loc=qsl,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
                block_tables=block_tables, max_query_len=max(query_lens),
                max_seq_len=max(seq_lens), scale=head_size ** -0.5)


def reference_attention(b) -> torch.Tensor:
    # reference.unified_attention builds its masks with CPU aranges, so it runs on CPU copies.
    return reference.unified_attention(**{k: v.cpu() if torch.is_tensor(v) else v
                                          for k, v in b.items()})


def attention_bytes(b) -> int:
    kv = sum(b["seq_lens"].tolist()) * b["key_cache"].shape[2] * b["key_cache"].shape[3] * 2 * 2
    return kv + 2 * b["q"].numel() * 2


def attention_flops(b) -> int:
    qlens = b["query_start_loc"].diff().tolist()
    pairs = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(qlens, b["seq_lens"].tolist()))
    return 4 * pairs * b["q"].shape[1] * b["q"].shape[2]


def bench_decode(copy_gbs: float) -> None:
    b = paged_batch([1] * 64, [2048] * 64, 32, 8, 128, 16)
    out = torch.empty_like(b["q"])
    check("decode b64 ctx2048", attention.unified_attention(**b, out=out),
          reference_attention(b), 2e-2, 2e-2)
    ms = timed(lambda: attention.unified_attention(**b, out=out), graph=True)
    record("attn decode b64 ctx2048 32q/8kv d128 bs16", ms, nbytes=attention_bytes(b),
           copy_gbs=copy_gbs, eager_ms=round(timed(lambda: attention.unified_attention(
               **b, out=out)), 4))


def bench_split(copy_gbs: float) -> None:
    for batch in (1, 2, 4, 8):
        b = paged_batch([1] * batch, [8192] * batch, 32, 8, 128, 16)
        out = torch.empty_like(b["q"])
        check(f"split b{batch} ctx8192", attention.unified_attention(**b, out=out),
              reference_attention(b), 2e-2, 2e-2)
        segments = attention._num_segments(batch, 8, 8192, 64, attention._sm_count(out.device))
        ms = timed(lambda: attention.unified_attention(**b, out=out), graph=True)
        ms_2d = timed(lambda: attention.launch_unified_attention(**b, out=out, num_segments=1),
                      graph=True)
        record(f"attn split-KV b{batch} ctx8192", ms, nbytes=attention_bytes(b), copy_gbs=copy_gbs,
               segments=segments, no_split_ms=round(ms_2d, 4))


def bench_prefill() -> None:
    cases = {
        "attn prefill 4x512": ([512] * 4, [512] * 4),
        "attn prefill 2x4096": ([4096] * 2, [4096] * 2),
        "attn chunk 512 after 3584 x4 + 64 decodes": ([512] * 4 + [1] * 64,
                                                      [4096] * 4 + [2048] * 64),
    }
    for name, (qlens, slens) in cases.items():
        b = paged_batch(qlens, slens, 32, 8, 128, 16)
        out = torch.empty_like(b["q"])
        if sum(qlens) <= 4096:  # the float32 CPU reference of 2x4096 takes too long
            check(name, attention.unified_attention(**b, out=out), reference_attention(b),
                  2e-2, 2e-2)
        ms = timed(lambda: attention.unified_attention(**b, out=out), graph=True)
        record(name, ms, flops=attention_flops(b))


def bench_elementwise(copy_gbs: float) -> None:
    t, hidden, heads, kv_heads, head_size = 8192, 4096, 32, 8, 128
    x = torch.randn(t, hidden, device="cuda", dtype=DTYPE)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device="cuda", dtype=DTYPE)
    got, want = norm.fused_add_rms_norm(x, residual, weight, 1e-6), \
        reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    check("fused_add_rms_norm", got[0], want[0], 1.6e-2, 1.6e-2)
    record("fused_add_rms_norm T8192 H4096", timed(lambda: norm.fused_add_rms_norm(
        x, residual, weight, 1e-6)), nbytes=4 * x.numel() * 2, copy_gbs=copy_gbs,
        ref_ms=timed(lambda: reference.fused_add_rms_norm(x, residual, weight, 1e-6)))
    record("rms_norm T8192 H4096", timed(lambda: norm.rms_norm(x, weight, 1e-6)),
           nbytes=2 * x.numel() * 2, copy_gbs=copy_gbs,
           ref_ms=timed(lambda: reference.rms_norm(x, weight, 1e-6)))

    q = torch.randn(t, heads, head_size, device="cuda", dtype=DTYPE)
    k = torch.randn(t, kv_heads, head_size, device="cuda", dtype=DTYPE)
    positions = torch.randint(0, 8192, (t,), device="cuda")
    inv = 1.0 / 10000 ** (torch.arange(0, head_size, 2, device="cuda") / head_size)
    freqs = torch.outer(torch.arange(8192, device="cuda", dtype=torch.float32), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    for g, w in zip(rotary.rotary_embedding(positions, q, k, cos_sin),
                    reference.rotary_embedding(positions, q, k, cos_sin)):
        check("rotary", g, w, 1.6e-2, 1.6e-2)
    record("rotary T8192 32q/8kv d128", timed(lambda: rotary.rotary_embedding(
        positions, q, k, cos_sin)), nbytes=2 * (q.numel() + k.numel()) * 2, copy_gbs=copy_gbs,
        ref_ms=timed(lambda: reference.rotary_embedding(positions, q, k, cos_sin)))

    # the vision towers' mode (Qwen2.5-VL-7B: 16 heads of 80): q, k strided views of the QKV
    # output, a float32 cos|sin row per patch, float32 math; the reference is HF's formula
    qkv = torch.randn(t, 3, 16, 80, device="cuda", dtype=DTYPE)
    patch_angles = torch.rand(t, 40, device="cuda") * 30
    vis_cs = torch.cat([patch_angles.cos(), patch_angles.sin()], -1)
    vis = (None, qkv[:, 0], qkv[:, 1], vis_cs)
    for g, w in zip(rotary.rotary_embedding(*vis, float32_math=True),
                    reference.rotary_embedding(*vis, float32_math=True)):
        check("rotary vision", g, w, 0.0, 0.0)
    record("rotary vision T8192 16h d80 f32-math", timed(lambda: rotary.rotary_embedding(
        *vis, float32_math=True)), nbytes=2 * 2 * qkv[:, :2].numel() + 4 * vis_cs.numel(),
        copy_gbs=copy_gbs,
        ref_ms=timed(lambda: reference.rotary_embedding(*vis, float32_math=True)))

    gate_up = torch.randn(t, 2 * hidden, device="cuda", dtype=DTYPE)
    check("silu_and_mul", activation.silu_and_mul(gate_up), reference.silu_and_mul(gate_up),
          1.6e-2, 1.6e-2)
    record("silu_and_mul T8192 N4096", timed(lambda: activation.silu_and_mul(gate_up)),
           nbytes=3 * t * hidden * 2, copy_gbs=copy_gbs,
           ref_ms=timed(lambda: reference.silu_and_mul(gate_up)))

    key, value = torch.randn(t, kv_heads, head_size, device="cuda", dtype=DTYPE), \
        torch.randn(t, kv_heads, head_size, device="cuda", dtype=DTYPE)
    key_cache = torch.randn(1024, 16, kv_heads, head_size, device="cuda", dtype=DTYPE)
    value_cache = torch.randn_like(key_cache)
    slots = torch.randperm(1024 * 16, device="cuda")[:t]
    want_k, want_v = key_cache.clone(), value_cache.clone()
    cache.reshape_and_cache(key, value, key_cache, value_cache, slots)
    reference.reshape_and_cache(key, value, want_k, want_v, slots)
    check("reshape_and_cache", key_cache, want_k, 0, 0)
    check("reshape_and_cache v", value_cache, want_v, 0, 0)
    record("reshape_and_cache T8192 8kv d128", timed(lambda: cache.reshape_and_cache(
        key, value, key_cache, value_cache, slots)), nbytes=4 * key.numel() * 2, copy_gbs=copy_gbs,
        ref_ms=timed(lambda: reference.reshape_and_cache(key, value, key_cache, value_cache,
                                                         slots)))


def bench_moe(copy_gbs: float) -> None:
    """One MoE layer of Qwen3-30B-A3B (benchmarks/models/qwen3-30b-a3b-shape: 128 experts,
    top-8, hidden 2048, expert intermediate 768): routing plus both grouped GEMMs. Decode batches
    are bound by reading the experts they hit (GB/s over those weights); prefill by the GEMMs
    (TFLOP/s over the routed tokens)."""
    num_experts, top_k, hidden, inter = 128, 8, 2048, 768
    w13 = torch.randn(num_experts, 2 * inter, hidden, device="cuda", dtype=DTYPE) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, device="cuda", dtype=DTYPE) / inter ** 0.5

    def layer(impl, x, logits):
        weights, ids = impl.moe_topk(logits, top_k, True)
        return impl.fused_experts(x, w13, w2, weights, ids)

    for num_tokens in (1, 16, 64, 512, 4096):
        x = torch.randn(num_tokens, hidden, device="cuda", dtype=DTYPE)
        logits = torch.randn(num_tokens, num_experts, device="cuda", dtype=DTYPE)
        check(f"moe T{num_tokens}", layer(moe, x, logits), layer(moe_reference, x, logits),
              3e-2, 3e-2)
        name = f"moe qwen3-30b-a3b T{num_tokens} E128 top8"
        ms = timed(lambda: layer(moe, x, logits), graph=num_tokens <= 64)
        ref_ms = timed(lambda: layer(moe_reference, x, logits))
        if num_tokens <= 64:
            hit = moe.moe_topk(logits, top_k, True)[1].unique().numel()
            record(name, ms, nbytes=hit * 3 * hidden * inter * 2, copy_gbs=copy_gbs, ref_ms=ref_ms,
                   experts_hit=hit)
        else:
            record(name, ms, flops=2 * num_tokens * top_k * 3 * hidden * inter, ref_ms=ref_ms)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    copy_gbs = copy_bandwidth()
    bench_decode(copy_gbs)
    bench_split(copy_gbs)
    bench_prefill()
    bench_elementwise(copy_gbs)
    bench_moe(copy_gbs)
    print(f"\n{'kernel':46} {'ms':>9} {'GB/s':>8} {'of copy':>8} {'TFLOP/s':>8} {'vs torch':>9}")
    for r in ROWS:
        print(f"{r['name']:46} {r['ms']:9.4f} {r.get('GB/s', ''):>8} {r.get('of_copy', ''):>8} "
              f"{r.get('TFLOP/s', ''):>8} {str(r.get('speedup', '')) + ('x' if 'speedup' in r else ''):>9}")


if __name__ == "__main__":
    main()
