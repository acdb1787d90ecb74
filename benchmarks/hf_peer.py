"""Peer baseline: HF transformers on the same GPU, the same random-weight model and the same workload.

    python3 benchmarks/hf_peer.py --model benchmarks/models/llama-3.1-8b-shape --mode cb --prompts 256 --input-len 512 --output-len 256
    python3 benchmarks/hf_peer.py --model benchmarks/models/qwen3-0.6b-shape --mode cb --var --prompts 256 --input-len 1024 --output-len 1024

--mode cb      transformers' continuous batching (generate_batch / ContinuousBatchingManager)
--mode static  model.generate in static batches of --static-batch prompts
--var          input lengths U[100, input-len], output lengths U[100, output-len] (nano-vllm's bench.py)
--image-size N a vision-language shape: chat requests with one N x N image and --input-len words
               of text, static batches of generate with pixel values (hf_peer_vlm.py says how)

Weights are random (normal 0.02, norms 1.0), prompts are random token ids (seed 1), EOS is ignored.
Prints one JSON line: output tokens/s and total (prompt + output) tokens/s.
"""
import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig


def build(model_dir, dtype, device):
    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
        model.tie_weights()
    return model.eval()


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="folder with config.json")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--mode", choices=["cb", "static"], default="cb")
    ap.add_argument("--static-batch", type=int, default=64)
    ap.add_argument("--var", action="store_true")
    ap.add_argument("--image-size", type=int, default=None)
    a = ap.parse_args()
    if a.image_size is not None:
        from hf_peer_vlm import main as vlm_main  # benchmarks/ is the script's folder

        return vlm_main(a)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = build(a.model, dtype, dev)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    if a.var:
        ilens = torch.randint(100, a.input_len + 1, (a.prompts,), generator=gen).tolist()
        olens = torch.randint(100, a.output_len + 1, (a.prompts,), generator=gen).tolist()
    else:
        ilens, olens = [a.input_len] * a.prompts, [a.output_len] * a.prompts
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in ilens]
    gc = GenerationConfig(max_new_tokens=a.output_len, min_new_tokens=a.output_len, do_sample=False,
                          pad_token_id=0)
    gc.eos_token_id = None

    if a.mode == "cb":
        model.generate_batch(prompts[:4], generation_config=gc)  # warm-up
        sync(dev)
        mgr = model.init_continuous_batching(generation_config=gc)
        mgr.start()
        t = time.perf_counter()
        for p, k in zip(prompts, olens):
            mgr.add_request(p, max_new_tokens=k)
        ntok = sum(len(mgr.get_result(timeout=900).generated_tokens) for _ in prompts)
        sync(dev)
        dt = time.perf_counter() - t
        mgr.stop(block=True)
    else:
        if a.var:
            raise SystemExit("--var needs --mode cb")
        b = a.static_batch
        model.generate(torch.tensor(prompts[:b], device=dev), generation_config=gc)  # warm-up
        sync(dev)
        t, ntok = time.perf_counter(), 0
        for i in range(0, len(prompts), b):
            x = torch.tensor(prompts[i:i + b], device=dev)
            out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc)
            ntok += (out.shape[1] - x.shape[1]) * x.shape[0]
        sync(dev)
        dt = time.perf_counter() - t
    print(json.dumps(dict(
        peer="hf-transformers", mode=a.mode, model=a.model, prompts=a.prompts, var=a.var,
        input_len=a.input_len, output_len=a.output_len, out_tokens=ntok, seconds=round(dt, 2),
        output_tok_s=round(ntok / dt, 1), total_tok_s=round((ntok + sum(ilens)) / dt, 1),
        device=torch.cuda.get_device_name() if dev == "cuda" else "cpu")), flush=True)


if __name__ == "__main__":
    main()
