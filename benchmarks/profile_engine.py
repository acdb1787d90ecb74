"""Where a step's time goes on the GPU: host phases (synchronized timers) and the top kernels.

    python3 benchmarks/profile_engine.py --model DIR --num-prompts 256 --input-len 512 --output-len 256

Wraps the engine's phases with SYNC() timers (this removes any CPU/GPU overlap,
so totals run a little long), then records a few mixed and decode steps with torch.profiler and
prints the kernels that took the most GPU time.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import collections
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kubeinfer.engine import model_runner as mr  # noqa: E402
from kubeinfer.engine.input_batch import InputBatch  # noqa: E402
from kubeinfer.engine.config import (CacheConfig, DeviceConfig, EngineConfig, ModelConfig,  # noqa: E402
                                     ParallelConfig, SchedulerConfig)
from kubeinfer.engine.llm_engine import LLMEngine  # noqa: E402
from kubeinfer.engine.sampling_params import SamplingParams  # noqa: E402

TIMES: dict[str, float] = collections.defaultdict(float)
SYNC = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


def timed(name, fn):
    def wrapper(*a, **k):
        SYNC()
        t = time.perf_counter()
        r = fn(*a, **k)
        SYNC()
        TIMES[name] += time.perf_counter() - t
        return r
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    ap.add_argument("--trace", default=None, help="write a chrome trace of the profiled steps here")
    ap.add_argument("--kernels", action="store_true", help="record kernels with torch.profiler")
    a = ap.parse_args()
    cfg = EngineConfig(
        model=ModelConfig(model=a.model, load_format="dummy", max_model_len=a.max_model_len,
                          skip_tokenizer_init=True),
        cache=CacheConfig(),
        # phase timers synchronise the GPU, which async scheduling would only hide behind
        scheduler=SchedulerConfig(max_num_seqs=a.max_num_seqs, async_scheduling=False),
        parallel=ParallelConfig(tensor_parallel_size=a.tensor_parallel_size), device=DeviceConfig())
    engine = LLMEngine(cfg)
    runner = engine.runner
    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.scheduler.resolve = timed("update", engine.scheduler.resolve)
    runner._forward = timed("forward", runner._forward)
    InputBatch.prepare = timed("build_inputs", InputBatch.prepare)
    runner.model.compute_logits = timed("logits", runner.model.compute_logits)
    runner.sampler.sample = timed("sample", runner.sampler.sample)
    runner.get_output = timed("read_results", runner.get_output)
    mr.SamplingMetadata.build = timed("sampling_meta", mr.SamplingMetadata.build)
    engine.output_processor.process = timed("outputs", engine.output_processor.process)

    rng = random.Random(0)
    for i in range(a.num_prompts):
        engine.add_request(str(i), [rng.randrange(engine.vocab_size) for _ in range(a.input_len)],
                           SamplingParams(temperature=1.0, max_tokens=a.output_len, ignore_eos=True))
    steps = collections.Counter()
    step_time = collections.defaultdict(float)
    profs = {}
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        sched = engine.scheduler
        kind = "decode" if not sched.waiting and all(
            r.num_computed_tokens >= r.num_prompt_tokens for r in sched.running) else "mixed"
        if kind == "decode" and steps[kind] == 10:
            cprof = cProfile.Profile()
            cprof.enable()
        if kind == "decode" and steps[kind] == 40:
            cprof.disable()
        if a.kernels and steps[kind] == 2:  # record steps 2..4 of each kind
            profs[kind] = torch.profiler.profile(activities=[
                torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            profs[kind].__enter__()
        SYNC()
        t = time.perf_counter()
        engine.step()
        SYNC()
        step_time[kind] += time.perf_counter() - t
        steps[kind] += 1
        if a.kernels and steps[kind] == 5:
            profs[kind].__exit__(None, None, None)
    total = time.perf_counter() - t0
    if steps["decode"] > 40:
        print("== host profile of decode steps 10..39 (cProfile, by own time)")
        pstats.Stats(cprof).sort_stats("tottime").print_stats(22)
    out_tokens = a.num_prompts * a.output_len
    for kind, prof in profs.items():
        print(f"== top kernels, {kind} steps (3 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        if a.trace:
            prof.export_chrome_trace(f"{a.trace}.{kind}.json")
    print(json.dumps({"total_s": round(total, 2), "output_tok_s": round(out_tokens / total, 1),
                      "steps": dict(steps),
                      "ms_per_step": {k: round(step_time[k] / steps[k] * 1e3, 2) for k in steps},
                      "phase_s": {k: round(v, 3) for k, v in sorted(TIMES.items())}}))


if __name__ == "__main__":
    main()
