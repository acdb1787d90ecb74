#!/usr/bin/env python3
"""Where the time of a `kubeinfer bench throughput` run goes: host phases per step, and how busy
the GPU is over a window of steps.

    python3 benchmarks/profile_bench_phases.py [--mask-thread] [--switch-interval S] \
        [--window A:B] -- MODEL --load-format dummy --num-prompts 256 ... (bench throughput's flags)

The run is the bench's own (kubeinfer/bench.py run_throughput, same prompts and engine), with
the engine's methods wrapped by wall-clock timers (no synchronisation added: a launch counts
until it is enqueued, a read until its step has landed). The timers reset when the bench resets
the prefix cache after its warm-up, so they cover the timed run only. Nested phases are included
in their parent's. Over steps A..B of the timed run (each --window) a torch.profiler trace (CUDA activity only)
gives the fraction of wall time some kernel was running (`gpu_busy`) and the top kernels.
Prints the bench's JSON line(s), then {"step": "phases_twin", ...} for an --unconstrained-twin run,
then {"step": "phases", ...} (the first run's, with the traced windows of both).
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TIMES: dict[str, float] = collections.defaultdict(float)
COUNTS: dict[str, int] = collections.defaultdict(int)
STEPS = {"n": 0, "prefill": 0, "prefill_s": 0.0, "decode_s": 0.0, "timed": False}
PROFILE: dict = {}


def wrap(cls, name: str, label: str) -> None:
    fn = getattr(cls, name)

    @functools.wraps(fn)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            TIMES[label] += time.perf_counter() - t
            COUNTS[label] += 1
    setattr(cls, name, wrapper)


def patch(a: argparse.Namespace) -> None:
    from kubeinfer.engine import model_runner, scheduler
    from kubeinfer.engine.encoder_runner import EncoderRunner
    from kubeinfer.engine.input_batch import InputBatch
    from kubeinfer.engine.kv_cache import block_pool
    from kubeinfer.engine.llm_engine import LLMEngine
    from kubeinfer.engine.output_processor import OutputProcessor
    from kubeinfer.engine.sample_step import StepSampler
    from kubeinfer.engine.sampler import Sampler
    from kubeinfer.engine.structured_output.manager import StructuredOutputManager

    for cls, name, label in [
            (scheduler.Scheduler, "schedule", "schedule"), (scheduler.Scheduler, "advance", "advance"),
            (scheduler.Scheduler, "resolve", "resolve"), (LLMEngine, "_process", "outputs"),
            (OutputProcessor, "process", "outputs.detokenize"),
            (model_runner.ModelRunner, "execute_model", "execute"),
            (model_runner.ModelRunner, "_update_states", "execute.update_states"),
            (InputBatch, "prepare", "execute.prepare_inputs"),
            (model_runner.ModelRunner, "_forward", "execute.forward_launch"),
            (EncoderRunner, "run_encoders", "execute.encoders"),
            (StepSampler, "sample", "execute.sample"),
            (model_runner.ModelRunner, "_prev_tokens", "execute.sample.prev_tokens_wait"),
            (Sampler, "sample", "execute.sample.sampler_launch"),
            (StructuredOutputManager, "_mask_job", "mask_job(accept+fill)"),
            (model_runner.ModelRunner, "get_output", "get_output(read)")]:
        wrap(cls, name, label)

    init = StructuredOutputManager.__init__

    def so_init(self, *args, **kw):
        init(self, *args, **kw)
        if a.mask_thread is not None:
            self.mask_thread = a.mask_thread == "on"
        if a.grammar_worker is not None:
            self.use_worker = a.grammar_worker == "on"
        if a.worker_threads is not None:
            self.worker_threads = a.worker_threads
        if a.min_chunk_rows is not None:
            self.batch.min_chunk_rows = a.min_chunk_rows
        a.manager = self
    StructuredOutputManager.__init__ = so_init

    reset = block_pool.BlockPool.reset_prefix_cache

    def reset_and_start(self, *args, **kw):
        if not STEPS["timed"]:  # the bench's warm-up is over: count from here
            TIMES.clear()
            COUNTS.clear()
            STEPS.update(n=0, prefill=0, prefill_s=0.0, decode_s=0.0, timed=True)
        elif "frozen" not in STEPS:  # --unconstrained-twin's run: keep the first run's numbers
            STEPS["frozen"] = (dict(TIMES), dict(COUNTS), dict(STEPS))
            TIMES.clear()  # and count the twin's on their own
            COUNTS.clear()
            STEPS.update(n=0, prefill=0, prefill_s=0.0, decode_s=0.0)
        return reset(self, *args, **kw)
    block_pool.BlockPool.reset_prefix_cache = reset_and_start

    step = LLMEngine.step
    windows = [tuple(int(v) for v in w.split(":")) for w in a.window.split(",")]

    def timed_step(self):
        run = "_twin" if "frozen" in STEPS else ""
        for lo, hi in windows:
            if STEPS["timed"] and STEPS["n"] == lo and self.device.type == "cuda":
                import torch
                acts = [torch.profiler.ProfilerActivity.CUDA]
                if a.host_ops:
                    acts.append(torch.profiler.ProfilerActivity.CPU)
                prof = torch.profiler.profile(activities=acts)
                prof.__enter__()
                PROFILE[(lo, hi, run)] = [prof, time.perf_counter(), None]
        waiting = sum(r.num_computed_tokens < r.num_prompt_tokens
                      for r in self.scheduler.running) + len(self.scheduler.waiting)
        t = time.perf_counter()
        out = step(self)
        dt = time.perf_counter() - t
        if STEPS["timed"]:
            STEPS["n"] += 1
            if waiting:
                STEPS["prefill"] += 1
                STEPS["prefill_s"] += dt
            else:
                STEPS["decode_s"] += dt
            for (lo, hi, of), entry in PROFILE.items():
                if of == run and STEPS["n"] == hi and entry[2] is None:
                    import torch
                    torch.cuda.synchronize()
                    entry[2] = time.perf_counter() - entry[1]
                    entry[0].__exit__(None, None, None)
        return out
    LLMEngine.step = timed_step


def kernel_table(prof, wall: float, top: int) -> dict:
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    busy, end = 0.0, -1.0
    for s, e in spans:  # union of kernel intervals (us)
        if e > end:
            busy += e - max(s, end)
            end = e
    by_name: dict[str, float] = collections.defaultdict(float)
    for e in events:
        by_name[e.name[:90]] += e.time_range.end - e.time_range.start
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    table = {"window_wall_ms": round(1e3 * wall, 2), "gpu_busy": round(busy / 1e6 / wall, 3),
             "top_kernels_ms": {k: round(v / 1e3, 2) for k, v in ranked}}
    runtime: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():  # with --host-ops: the CUDA runtime calls (syncs, copies, launches)
        if e.device_type.name == "CPU" and e.name.startswith("cuda"):
            runtime[e.name][0] += e.self_cpu_time_total
            runtime[e.name][1] += 1
    if runtime:
        table["host_runtime_calls_ms"] = {
            k: [round(v[0] / 1e3, 2), v[1]]
            for k, v in sorted(runtime.items(), key=lambda kv: -kv[1][0])[:top]}
    return table


def phases() -> dict:
    """The timed run's steps and host phases (ms per step), from TIMES / COUNTS / STEPS."""
    n = max(STEPS["n"], 1)
    return {"steps": STEPS["n"], "prefill_steps": STEPS["prefill"],
            "ms_per_prefill_step": round(1e3 * STEPS["prefill_s"] / max(STEPS["prefill"], 1), 3),
            "ms_per_decode_step": round(1e3 * STEPS["decode_s"]
                                        / max(STEPS["n"] - STEPS["prefill"], 1), 3),
            "ms_per_step_by_phase": {k: round(1e3 * v / n, 3) for k, v in sorted(TIMES.items())},
            "calls_per_step": {k: round(v / n, 2) for k, v in sorted(COUNTS.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mask-thread", choices=("on", "off"), default=None,
                   help="the grammar masks on the manager's own thread (default: the engine's)")
    p.add_argument("--grammar-worker", choices=("on", "off"), default=None,
                   help="the matchers in a worker process (default: the engine's)")
    p.add_argument("--worker-threads", type=int, default=None,
                   help="the grammar worker's accept and fill threads")
    p.add_argument("--min-chunk-rows", type=int, default=None,
                   help="GrammarBatch.min_chunk_rows (rows per accept thread)")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval (s): how long a thread may hold the GIL")
    p.add_argument("--window", default="100:130",
                   help="steps A:B (comma-separated, several) of the timed run to trace")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--host-ops", action="store_true",
                   help="also trace the host: the CUDA runtime calls (ms, count) in each window")
    p.add_argument("bench", nargs=argparse.REMAINDER, help="-- then bench throughput's arguments")
    a = p.parse_args()
    if a.switch_interval:
        sys.setswitchinterval(a.switch_interval)
    patch(a)
    from kubeinfer.cli import main as cli_main

    argv = [x for x in a.bench if x != "--"]
    start = time.perf_counter()
    rc = cli_main(["bench", "throughput", *argv])
    so = getattr(a, "manager", None)
    line = {"step": "phases", "mask_thread": so.mask_thread if so else None,
            "grammar_worker": so.use_worker if so else None,
            "worker_threads": so.worker_threads if so else None,
            "min_chunk_rows": so.batch.min_chunk_rows if so else None,
            "switch_interval": sys.getswitchinterval()}
    if "frozen" in STEPS:  # the twin's phases (this run's last), then the first run's
        print(json.dumps({"step": "phases_twin", **phases()}), flush=True)
        times, counts, steps = STEPS["frozen"]
        TIMES.clear()
        TIMES.update(times)
        COUNTS.clear()
        COUNTS.update(counts)
        STEPS.update(steps)
    line.update(phases(), wall_s=round(time.perf_counter() - start, 1))
    for (lo, hi, run), (prof, _, wall) in PROFILE.items():
        if wall is not None:
            line[f"steps_{lo}_{hi}{run}"] = kernel_table(prof, wall, a.top)
    print(json.dumps(line), flush=True)
    sys.exit(rc or 0)


if __name__ == "__main__":
    main()
