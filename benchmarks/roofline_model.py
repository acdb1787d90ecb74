"""The roofline of the throughput workload (N prompts, `in` tokens in, `out` tokens out, all decoding
together) for a config-only model folder: the fewest seconds the two ceilings allow.

    python3 benchmarks/roofline_model.py benchmarks/models/llama-3.1-8b-shape --tbps 4.27 --tflops 686

Prefill: 2 x active parameters x N x in FLOPs, plus causal attention (4 x layers x heads x head_dim x
in^2 / 2 per prompt), at the matmul ceiling. Decode: every step reads the weights it needs once
(all of a dense model; for a mixture of experts the experts that the step's N x top-k picks hit, in
expectation under uniform routing, which is what dummy weights give) and the KV cache of every
running request, at the copy ceiling. Parameters are counted on the meta device from transformers'
own class, so the count is the checkpoint's.

On several GPUs (`--tp`, `--pp`; the ceilings are one GPU's): tensor parallelism splits every
FLOP and byte over the GPUs. Pipeline stages split the prefill FLOPs and the KV reads too, but with
one micro-batch per stage in flight (N/pp requests each) every micro-batch reads its stage's
weights, so each GPU still reads as many weight bytes per decode step as one GPU would: PP does
not make decode faster than one GPU's weight reads, only the prefill and the KV reads.
`out_tok_s_hw` is the bound of the GPUs themselves (as tensor parallelism over all of them).
"""
from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def counts(path: str) -> dict:
    cfg = AutoConfig.from_pretrained(path)
    cfg = getattr(cfg, "text_config", cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    num_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 0
    top_k = getattr(cfg, "num_experts_per_tok", 0) or 0
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return dict(total=total, experts=experts, num_experts=num_experts, top_k=top_k, layers=layers,
                heads=heads, head_dim=head_dim, kv_bytes=2 * layers * kv_heads * head_dim * 2,
                embed=cfg.vocab_size * cfg.hidden_size)


def roofline(c: dict, n: int, inp: int, out: int, tbps: float, tflops: float, tp: int = 1,
             pp: int = 1) -> dict:
    dense = c["total"] - c["experts"]
    per_expert = c["experts"] / c["num_experts"] if c["num_experts"] else 0
    active = dense + per_expert * c["top_k"] - c["embed"]  # the embedding is a lookup, no FLOPs
    prefill_flops = 2 * active * n * inp + 4 * c["layers"] * c["heads"] * c["head_dim"] * inp**2 / 2 * n
    kv = sum(n * (inp + i) * c["kv_bytes"] for i in range(out))

    def weight_bytes(batch: float) -> float:
        """Weights one decode step of `batch` requests reads."""
        if not c["num_experts"]:
            return 2 * dense
        hit = c["num_experts"] * (1 - (1 - 1 / c["num_experts"]) ** (batch * c["top_k"]))
        return 2 * (dense + per_expert * hit)

    gpus = tp * pp
    # per GPU and decode step: pp micro-batches each read the stage's 1/pp of the weights
    decode_seconds = (out * weight_bytes(n / pp) / tp + kv / gpus) / (tbps * 1e12)
    seconds = prefill_flops / (tflops * 1e12 * gpus) + decode_seconds
    decode_bytes = out * weight_bytes(n) + kv  # on one GPU
    hw_seconds = (prefill_flops / (tflops * 1e12) + decode_bytes / (tbps * 1e12)) / gpus
    hit = 0
    if c["num_experts"]:
        hit = c["num_experts"] * (1 - (1 - 1 / c["num_experts"]) ** (n * c["top_k"]))
    result = dict(params_b=round(c["total"] / 1e9, 2), active_b=round(active / 1e9, 2),
                  experts_hit_per_layer=round(hit, 1), prefill_pflop=round(prefill_flops / 1e15, 3),
                  decode_tb=round(decode_bytes / 1e12, 2), seconds=round(seconds, 3),
                  out_tok_s=round(n * out / seconds))
    if gpus > 1:
        result.update(tp=tp, pp=pp, out_tok_s_hw=round(n * out / hw_seconds))
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--tbps", type=float, required=True, help="measured copy ceiling, TB/s")
    ap.add_argument("--tflops", type=float, required=True, help="measured bf16 matmul ceiling")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (one GPU each)")
    a = ap.parse_args()
    print(json.dumps(dict(model=a.model, **roofline(counts(a.model), a.prompts, a.input_len,
                                                   a.output_len, a.tbps, a.tflops, a.tp, a.pp))))


if __name__ == "__main__":
    main()
