"""The roofline of the throughput workload (N prompts, `in` tokens in, `out` tokens out, all decoding
together) for a config-only model folder: the fewest seconds the two ceilings allow.

    python3 benchmarks/roofline_model.py benchmarks/models/llama-3.1-8b-shape --tbps 4.27 --tflops 686

Prefill: 2 x active parameters x N x in FLOPs, plus causal attention (4 x layers x heads x head_dim x
in^2 / 2 per prompt), at the matmul ceiling. Decode: every step reads the weights it needs once
(all of a dense model; for a mixture of experts the experts that the step's N x top-k picks hit, in
expectation under uniform routing, which is what dummy weights give) and the KV cache of every
running request, at the copy ceiling. Parameters are counted on the meta device from transformers'
own class, so the count is the checkpoint's.

The time-to-first-token floor of a vision-language model (`--ttft`: one request, one image, at
idle), from `vlm_ttft_floor`:

- FLOPs: the vision tower on one image (2 x each matmul's weights x the tokens it runs on: the
  patch embedding over the patches, the encoder layers the model reads (LLaVA's
  vision_feature_layer -2: 23 of CLIP's 24) over the patches plus CLS; bidirectional attention
  4 x T x T_attended x hidden per layer, Qwen2.5-VL's windowed layers attending their 8 x 8-patch
  window and its full-attention layers all patches), the projector (LLaVA's MLP over the image
  tokens, Qwen's merger over the 2 x 2-merged tokens), and the prefill of the expanded prompt
  (2 x the decoder's matmul weights x prompt tokens + causal attention 4 x layers x heads x
  head_dim x L^2 / 2), plus the LM head for the last position only.
- compute_ms = FLOPs / the GPU's dense bf16 peak; weight_read_ms = the bytes of every weight those
  matmuls use (bf16) / the GPU's memory bandwidth (the embedding table is a lookup and not read
  whole). floor_ms = compute_ms + weight_read_ms (serial: no overlap of weight streaming with
  math is credited); overlap_floor_ms = the larger of the two, the bound if both overlapped fully.
- Peaks: the data-sheet numbers of the GPU by its name (GPU_PEAKS), or --tflops/--tbps.

    python3 benchmarks/roofline_model.py benchmarks/models/llava-1.5-7b-shape --ttft \
        --image-size 336 --prompt-len 650 --gpu "NVIDIA H100 80GB HBM3"

The VLM throughput workload's floor (`--vlm`, `vlm_throughput_floor`): n times the TTFT's FLOPs
for the prefill, then per decode step the larger of its FLOPs and its bytes (weights + every
running request's KV cache), at the measured ceilings.
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
import re

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


# data-sheet dense bf16 TFLOP/s (no sparsity) and HBM TB/s, by a part of torch's device name
GPU_PEAKS = {"H100 80GB HBM3": (989.4, 3.35), "H100 SXM": (989.4, 3.35), "H100 NVL": (835.0, 3.9),
             "H100 PCIe": (756.0, 2.0), "H200": (989.4, 4.8)}


def gpu_peaks(device_name: str) -> tuple[float, float]:
    """(dense bf16 TFLOP/s, TB/s) of the GPU whose torch name is device_name; ValueError else."""
    for key, peaks in GPU_PEAKS.items():
        if key.lower() in device_name.lower():
            return peaks
    raise ValueError(f"no data-sheet peaks for {device_name!r} (known: {', '.join(GPU_PEAKS)}); "
                     "pass --tflops and --tbps")


def _vision_layers_used(cfg) -> int | None:
    """How many vision encoder layers the model reads: LLaVA's vision_feature_layer (-2: all but
    the last); None for all."""
    layer = getattr(cfg, "vision_feature_layer", None)
    if layer is None:
        return None
    layer = max(layer) if isinstance(layer, (list, tuple)) else layer
    total = cfg.vision_config.num_hidden_layers
    return total + 1 + layer if layer < 0 else layer


def vlm_counts(path: str) -> dict:
    """Matmul weights (Linear and patch-embedding Conv) of a VLM by part, from transformers' own
    class on the meta device, keeping only the vision layers the model reads."""
    from transformers import AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
    used = _vision_layers_used(cfg)
    parts = dict(patch_embed=0, vision=0, projector=0, text=0, lm_head=0)
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            continue
        n = mod.weight.numel()
        if "multi_modal_projector" in name or ".merger." in name:
            parts["projector"] += n
        elif "vision_tower" in name or ".visual." in name:
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Conv3d)):
                parts["patch_embed"] += n
                continue
            m = re.search(r"\.(?:layers|blocks)\.(\d+)\.", name)
            if used is None or m is None or int(m.group(1)) < used:
                parts["vision"] += n
        elif "language_model" in name:
            parts["text"] += n
        elif name.endswith("lm_head"):
            parts["lm_head"] += n
    return dict(parts=parts, config=cfg, vision_layers=used or _vision_depth(cfg.vision_config))


def _vision_depth(vc) -> int:
    return getattr(vc, "num_hidden_layers", None) or vc.depth


def _vision_tokens(cfg, image_size: int) -> dict:
    """Patches, tokens the encoder runs on, per-layer attended tokens, tokens the projector runs
    on and image tokens in the prompt, for one square image_size image."""
    vc = cfg.vision_config
    if cfg.model_type in ("qwen2_vl", "qwen2_5_vl"):
        factor = vc.patch_size * vc.spatial_merge_size  # the processor resizes to multiples of it
        side = max(factor, round(image_size / factor) * factor) // vc.patch_size
        patches = side * side
        merged = patches // vc.spatial_merge_size ** 2
        window = getattr(vc, "window_size", 0) // vc.patch_size  # patches per window side
        full = set(getattr(vc, "fullatt_block_indexes", None) or range(vc.depth))
        attended = [patches if i in full or not window else min(patches, window * window)
                    for i in range(vc.depth)]
        return dict(patches=patches, encoder_tokens=patches, attended=attended,
                    projector_tokens=merged, image_tokens=merged)
    side = vc.image_size // vc.patch_size  # LLaVA 1.5: CLIP on the crop, CLS added
    patches = side * side
    strategy_full = getattr(cfg, "vision_feature_select_strategy", "default") == "full"
    image_tokens = patches + (1 if strategy_full else 0)
    return dict(patches=patches, encoder_tokens=patches + 1, attended=[patches + 1] * vc.num_hidden_layers,
                projector_tokens=image_tokens, image_tokens=image_tokens)


def vlm_ttft_floor(path: str, image_size: int, prompt_len: int, tflops: float, tbps: float) -> dict:
    """The floor of one request's time to first token: one image, `prompt_len` prompt tokens
    (image tokens included), at the given peaks. See the module docstring."""
    c = vlm_counts(path)
    cfg, parts = c["config"], c["parts"]
    tok = _vision_tokens(cfg, image_size)
    vc, tc = cfg.vision_config, getattr(cfg, "text_config", cfg)
    v_hidden = vc.hidden_size
    layers = c["vision_layers"]
    vision = (2 * parts["patch_embed"] * tok["patches"] + 2 * parts["vision"] * tok["encoder_tokens"]
              + sum(4 * tok["encoder_tokens"] * a * v_hidden for a in tok["attended"][:layers]))
    projector = 2 * parts["projector"] * tok["projector_tokens"]
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    prefill = (2 * parts["text"] * prompt_len
               + 4 * tc.num_hidden_layers * heads * head_dim * prompt_len ** 2 / 2
               + 2 * parts["lm_head"])
    flops = vision + projector + prefill
    weight_bytes = 2 * sum(parts.values())
    compute_ms = flops / (tflops * 1e12) * 1e3
    weight_ms = weight_bytes / (tbps * 1e12) * 1e3
    return dict(image_size=image_size, prompt_len=prompt_len, image_tokens=tok["image_tokens"],
                vision_gflop=round(vision / 1e9, 1), projector_gflop=round(projector / 1e9, 1),
                prefill_gflop=round(prefill / 1e9, 1), weights_gb=round(weight_bytes / 1e9, 2),
                peak_tflops=tflops, peak_tbps=tbps, compute_ms=round(compute_ms, 3),
                weight_read_ms=round(weight_ms, 3), floor_ms=round(compute_ms + weight_ms, 3),
                overlap_floor_ms=round(max(compute_ms, weight_ms), 3))


def vlm_throughput_floor(path: str, image_size: int, prompt_len: int, n: int, out: int,
                         tflops: float, tbps: float) -> dict:
    """The floor of the VLM throughput workload: n requests of one image and `prompt_len` prompt
    tokens (image tokens included) each, `out` tokens out, all decoding together. Prefill: n
    times the vision tower, projector and prompt FLOPs of `vlm_ttft_floor`, at the matmul
    ceiling. Decode: per step the larger of its matmul FLOPs (2 x decoder weights x running
    requests) and its bytes (the decoder's weights once, and the KV cache of every running
    request) at the copy ceiling. A lower bound: the KV cache is taken to hold all n requests at
    once (where it cannot, real runs read the weights more often) and no step costs less than
    its larger term."""
    one = vlm_ttft_floor(path, image_size, prompt_len, tflops, tbps)
    c = vlm_counts(path)
    cfg = c["config"]
    tc = getattr(cfg, "text_config", cfg)
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    kv_bytes = 2 * tc.num_hidden_layers * kv_heads * head_dim * 2  # K and V, bf16, per token
    decoder = c["parts"]["text"] + c["parts"]["lm_head"]
    prefill_s = n * (one["vision_gflop"] + one["projector_gflop"] + one["prefill_gflop"]) \
        * 1e9 / (tflops * 1e12)
    decode_s = sum(max(2 * decoder * n / (tflops * 1e12),
                       (2 * decoder + n * (prompt_len + i) * kv_bytes) / (tbps * 1e12))
                   for i in range(out))
    seconds = prefill_s + decode_s
    return dict(image_size=image_size, prompt_len=prompt_len, prompts=n, output_len=out,
                kv_mib_per_token=round(kv_bytes / 2**20, 3), prefill_s=round(prefill_s, 3),
                decode_s=round(decode_s, 3), seconds=round(seconds, 3),
                out_tok_s=round(n * out / seconds), tflops=tflops, tbps=tbps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--tbps", type=float, help="copy ceiling, TB/s (--ttft: else --gpu's peak)")
    ap.add_argument("--tflops", type=float, help="bf16 matmul ceiling (--ttft: else --gpu's peak)")
    ap.add_argument("--ttft", action="store_true", help="a VLM's time-to-first-token floor")
    ap.add_argument("--vlm", action="store_true",
                    help="a VLM's throughput floor (--prompts requests, one --image-size image and "
                         "--prompt-len tokens each, --output-len out) at --tflops/--tbps")
    ap.add_argument("--image-size", type=int, default=336)
    ap.add_argument("--prompt-len", type=int, help="--ttft: prompt tokens, image tokens included")
    ap.add_argument("--gpu", default="H100 80GB HBM3", help="--ttft: the GPU's name, for its peaks")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (one GPU each)")
    a = ap.parse_args()
    if a.ttft:
        if a.prompt_len is None:
            ap.error("--ttft needs --prompt-len (the bench's mean_prompt_len)")
        tflops, tbps = gpu_peaks(a.gpu) if a.tflops is None or a.tbps is None else (a.tflops, a.tbps)
        print(json.dumps(dict(model=a.model, gpu=a.gpu, **vlm_ttft_floor(
            a.model, a.image_size, a.prompt_len, a.tflops or tflops, a.tbps or tbps))))
        return
    if a.tbps is None or a.tflops is None:
        ap.error("--tbps and --tflops are required (the measured ceilings)")
    if a.vlm:
        if a.prompt_len is None:
            ap.error("--vlm needs --prompt-len (the bench's mean_prompt_len)")
        print(json.dumps(dict(model=a.model, **vlm_throughput_floor(
            a.model, a.image_size, a.prompt_len, a.prompts, a.output_len, a.tflops, a.tbps))))
        return
    print(json.dumps(dict(model=a.model, **roofline(counts(a.model), a.prompts, a.input_len,
                                                   a.output_len, a.tbps, a.tflops, a.tp, a.pp))))


if __name__ == "__main__":
    main()
