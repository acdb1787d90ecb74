"""The HF transformers peer of `kubeinfer bench throughput --image-size N`: the same chat requests
with one image each (kubeinfer.bench_images.ImageWorkload: the same images, the same expanded
prompt ids, the same pixel values the engine gets), run as static batches of `model.generate`
with the images' encoder inputs, on the same config-only shape with random weights (the engine's
dummy scheme: normal(0, 0.02) matrices, norms 1, biases 0), bf16 and sdpa on a GPU.

    python3 benchmarks/hf_peer.py --model benchmarks/models/llava-1.5-7b-shape --mode static \
        --image-size 336 --prompts 256 --input-len 64 --output-len 128 --static-batch 64

Images are processed before the clock starts, as in the engine's benchmark. Each batch is timed
from its inputs' copy to the device to the end of `generate` (vision tower, prefill, decode), and
output tokens/s is every batch's new tokens over the sum of the batches' times. Prompts of one
batch have the same length here (same image size and text length), so no padding enters.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # kubeinfer

# model types whose HF forward reads mm_token_type_ids (M-RoPE positions of the image tokens)
_MROPE_TYPES = ("qwen2_vl", "qwen2_5_vl")


def build_vlm(model_dir: str, dtype: torch.dtype, device: str):
    """transformers' own class for the config, built on the device (real buffers: position ids,
    rotary tables) and filled with the engine's dummy weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from kubeinfer.engine.loader.weights import init_dummy_weights

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    with torch.no_grad():
        init_dummy_weights(model, seed=0)
    return model.eval()


def batch_inputs(mm_inputs: list, device: str, dtype: torch.dtype, model_type: str,
                 image_token_id: int) -> dict:
    """generate()'s keyword arguments for a batch of MultiModalInputs: left-padded ids and mask,
    and each encoder input concatenated over the batch (pixel_values, image_grid_thw, ...)."""
    width = max(len(m.prompt_token_ids) for m in mm_inputs)
    ids = torch.zeros(len(mm_inputs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, m in enumerate(mm_inputs):
        n = len(m.prompt_token_ids)
        ids[row, width - n:] = torch.tensor(m.prompt_token_ids)
        mask[row, width - n:] = 1
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    for key in mm_inputs[0].features[0].encoder_inputs:
        parts = [f.encoder_inputs[key] for m in mm_inputs for f in m.features]
        value = torch.cat(parts).to(device)
        kwargs[key] = value.to(dtype) if value.is_floating_point() else value  # pixels in bf16
    if model_type in _MROPE_TYPES:
        kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == image_token_id).int()
    return kwargs


def image_token_id(config) -> int:
    return getattr(config, "image_token_id", None) or config.image_token_index


def run_static(a, dev: str, dtype: torch.dtype) -> dict:
    from transformers import GenerationConfig

    from kubeinfer.bench_images import ImageWorkload, check_image_model, check_image_size

    check_image_size(a.image_size)  # before minutes of model building
    check_image_model(a.model)
    model = build_vlm(a.model, dtype, dev)
    cfg = model.config
    with ImageWorkload(a.model, a.image_size, seed=0) as workload:
        mm_inputs = workload.inputs([a.input_len] * a.prompts)
        warm = workload.inputs([a.input_len] * min(a.static_batch, a.prompts), first_index=a.prompts)
    gc = GenerationConfig(max_new_tokens=a.output_len, min_new_tokens=a.output_len,
                          do_sample=False, pad_token_id=0)
    gc.eos_token_id = None
    token_id = image_token_id(cfg)

    def generate(batch) -> int:
        kwargs = batch_inputs(batch, dev, dtype, cfg.model_type, token_id)
        with torch.no_grad():
            out = model.generate(**kwargs, generation_config=gc)
        return (out.shape[1] - kwargs["input_ids"].shape[1]) * out.shape[0]

    generate(warm)  # warm-up: kernels, allocator
    sync(dev)
    seconds, ntok = 0.0, 0
    for i in range(0, len(mm_inputs), a.static_batch):
        t = time.perf_counter()
        ntok += generate(mm_inputs[i:i + a.static_batch])
        sync(dev)
        seconds += time.perf_counter() - t
    prompt_tokens = sum(len(m.prompt_token_ids) for m in mm_inputs)
    return dict(peer="hf-transformers", mode="static", model=a.model, prompts=a.prompts,
                image_size=a.image_size, text_len=a.input_len, output_len=a.output_len,
                static_batch=a.static_batch, mean_prompt_len=round(prompt_tokens / a.prompts, 1),
                out_tokens=ntok, seconds=round(seconds, 2), output_tok_s=round(ntok / seconds, 1),
                total_tok_s=round((ntok + prompt_tokens) / seconds, 1),
                device=torch.cuda.get_device_name() if dev == "cuda" else "cpu")


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def main(a) -> None:
    """hf_peer.py's entry for --image-size (argparse namespace of hf_peer.py)."""
    if a.mode != "static" or a.var:
        raise SystemExit("--image-size runs static batches of generate: use --mode static, "
                         "without --var")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    try:
        result = run_static(a, dev, dtype)
    except ValueError as e:  # the bench's checks (image size, a text-only or unknown model)
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(result), flush=True)
