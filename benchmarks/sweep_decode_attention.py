#!/usr/bin/env python3
"""Sweep the decode attention kernel's tile settings on the shapes the engine decodes.

    python3 benchmarks/sweep_decode_attention.py [--shapes llava,llama,qwen_vl]

GPU only. For each shape (a batch of decodes over paged K/V of the model's heads), every
(TILE_N, num_warps, num_stages) of the all-decode path runs as a CUDA-graph replay; prints the
GB/s of K/V read and the fraction of the device-to-device copy bandwidth, one JSON line each, and
last the best setting per shape beside the one `attention._tile_config` picks today. The result
feeds `_tile_config` (kubeinfer/kernels/attention.py); the kernel's output is checked against
today's setting for every point.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_kernels import attention_bytes, copy_bandwidth, paged_batch, timed  # noqa: E402

from kubeinfer.kernels import attention  # noqa: E402

# name: (requests, context, query heads, KV heads, head size): the running batch of the VLM
# benchmark's decode steps on an H100 (LLaVA: ~136 requests fit its KV cache), Llama 3.1 8B's
SHAPES = {"llava": (136, 730, 32, 32, 128), "llama": (256, 700, 32, 8, 128),
          "qwen_vl": (256, 400, 28, 4, 128)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    a = ap.parse_args()
    copy_gbs = copy_bandwidth()
    original = attention._tile_config
    best = {}
    for name in a.shapes.split(","):
        reqs, ctx, heads, kv_heads, head = SHAPES[name]
        b = paged_batch([1] * reqs, [ctx] * reqs, heads, kv_heads, head, 16)
        want = attention.unified_attention(**b)
        nbytes = attention_bytes(b)
        today = original(128, heads // kv_heads, 1, True, b["q"].dtype, reqs, kv_heads, 132)
        results = []
        for tile_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
            def config(*args, _t=tile_n, _w=warps, _s=stages):
                cfg = original(*args)
                return (cfg[0], cfg[1], _t, _w, _s) if args[3] else cfg
            attention._tile_config = config
            try:
                out = attention.launch_unified_attention(**b, num_segments=1)
                torch.cuda.synchronize()
                ok = torch.allclose(out.float(), want.float(), atol=2e-2, rtol=2e-2)
                ms = timed(lambda: attention.launch_unified_attention(**b, num_segments=1),
                           graph=True)
            except Exception as e:  # a setting that does not compile (shared memory) is skipped
                print(json.dumps({"shape": name, "tile_n": tile_n, "warps": warps,
                                  "stages": stages, "error": type(e).__name__}), flush=True)
                continue
            finally:
                attention._tile_config = original
            row = {"shape": name, "tile_n": tile_n, "warps": warps, "stages": stages,
                   "ms": round(ms, 4), "GB/s": round(nbytes / ms / 1e6, 1),
                   "of_copy": round(nbytes / ms / 1e6 / copy_gbs, 3), "matches": ok}
            print(json.dumps(row), flush=True)
            if ok:
                results.append(row)
        top = max(results, key=lambda r: r["GB/s"])
        now = next((r for r in results if (r["tile_n"], r["warps"], r["stages"]) == today[2:]),
                   None)
        best[name] = {"best": top, "today": now}
    print(json.dumps({"step": "sweep_decode_attention", "copy_GBps": round(copy_gbs, 1),
                      "best": best}), flush=True)


if __name__ == "__main__":
    main()
