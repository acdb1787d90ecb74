"""Where the time to first token goes, on rank 0: host phases, the forward's GPU time, and the
kernels (GEMMs, attention, NCCL, the custom all-reduce) of one first-token path.

    python3 benchmarks/profile_ttft.py --model DIR -tp 2 [--disable-custom-all-reduce]

The engine is built as `kubeinfer bench latency` builds it (CUDA graphs, async scheduling on); one
request of --input-len tokens is timed from its first step to its first token, --num-iters times
after two warm-up requests. The host phases are wall time with no synchronisation added (what the
engine's loop really spends in each, a launch returns once enqueued), so

- host phases that add up to the TTFT with a short `read_wait` mean the host is the bottleneck
  (launch overhead, eager collectives holding the host, a synchronising call: see the host-op
  table, e.g. cudaStreamSynchronize / cudaMemcpy / nccl calls with large self time);
- a long `read_wait` with `forward_gpu_ms` close to the TTFT means the GPU is; then NCCL kernel
  time far above the all-reduce's bandwidth cost is rank 0 waiting in a collective for a rank
  whose host is late (the workers run the same launch code behind a pipe): every rank profiles
  the same request (rank_profiler.py), so the late rank's own host-op table is printed too.
Prints the tables, then one JSON line (collected by gpu_suite.py).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kubeinfer.engine import sample_step as mr  # noqa: E402
from kubeinfer.engine import parallel_state  # noqa: E402
from kubeinfer.engine.args import EngineArgs  # noqa: E402
from kubeinfer.engine.custom_all_reduce import CustomAllReduce  # noqa: E402
from kubeinfer.engine.llm_engine import LLMEngine  # noqa: E402
from kubeinfer.engine.sampling_params import SamplingParams  # noqa: E402

HOST: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])  # name -> [calls, s]
GPU_FORWARD: list[tuple] = []  # (start, end) CUDA events of the driver's forwards
CUDA = torch.cuda.is_available()
SYNC = torch.cuda.synchronize if CUDA else (lambda: None)  # the script also runs on CPU (gloo)


def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            HOST[name][0] += 1
            HOST[name][1] += time.perf_counter() - t
    return wrapper


def gpu_timed(fn):
    def wrapper(*a, **k):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        r = fn(*a, **k)
        end.record()
        GPU_FORWARD.append((start, end))
        return r
    return wrapper


def instrument(engine: LLMEngine) -> None:
    runner, sched = engine.runner, engine.scheduler
    sched.schedule = timed("schedule", sched.schedule)
    sched.resolve = timed("update", sched.resolve)
    if engine.executor.workers is not None:
        w = engine.executor.workers
        w.send = timed("rpc_send", w.send)
    runner._update_states = timed("update_states", runner._update_states)
    runner.batch.prepare = timed("prepare_inputs", runner.batch.prepare)
    runner._forward = timed("forward_enqueue",
                            gpu_timed(runner._forward) if CUDA else runner._forward)
    runner.model.compute_logits = timed("logits_enqueue", runner.model.compute_logits)
    runner.sampler.sample = timed("sample_enqueue", runner.sampler.sample)
    mr.tp_broadcast_from_first = timed("broadcast_ids", mr.tp_broadcast_from_first)
    runner._read = timed("read_wait", runner._read)
    engine.output_processor.process = timed("outputs", engine.output_processor.process)
    torch.distributed.all_reduce = timed("nccl_all_reduce_host", torch.distributed.all_reduce)
    CustomAllReduce.all_reduce = timed("custom_all_reduce_host", CustomAllReduce.all_reduce)


def first_token(engine: LLMEngine, ids: list[int], req_id: str,
                on_first=lambda: None) -> tuple[float, dict]:
    """Seconds from the request's first step to its first token, and the host phases until then
    (calls, seconds); `on_first()` runs at the first token, then the request runs to its end."""
    engine.kv.pool.reset_prefix_cache()
    engine.add_request(req_id, ids, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    SYNC()
    start, ttft, phases = time.perf_counter(), None, {}
    while engine.has_unfinished_requests():
        if engine.step() and ttft is None:
            ttft = time.perf_counter() - start
            phases = {k: v[:] for k, v in HOST.items()}
            on_first()
    SYNC()
    return ttft, phases


def main() -> None:
    ap = argparse.ArgumentParser()
    EngineArgs.add_cli_args(ap)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--num-iters", type=int, default=5)
    a = ap.parse_args()
    a.skip_tokenizer_init = True
    engine = LLMEngine(EngineArgs.from_cli_args(a).create_engine_config())
    rng = random.Random(0)
    prompt = lambda: [rng.randrange(engine.vocab_size) for _ in range(a.input_len)]  # noqa: E731
    # the first requests show any first-use cost (lazy init, compilation) the start-up missed
    warm_ms = [round(1e3 * first_token(engine, prompt(), f"warm{i}")[0], 2) for i in range(2)]
    instrument(engine)
    runs = []
    for i in range(a.num_iters):
        HOST.clear()
        GPU_FORWARD.clear()
        ttft, phases = first_token(engine, prompt(), f"run{i}")
        SYNC()
        forward_gpu = GPU_FORWARD[0][0].elapsed_time(GPU_FORWARD[0][1]) if CUDA else 0.0
        runs.append((ttft, forward_gpu, phases))
    # every rank profiles the same request (ModelRunner.profile -> rank_profiler.py)
    # ... until its first token (the step launched after the prefill included, as in the TTFT)
    by_rank = []
    engine.executor.collective_rpc("profile", "start")
    first_token(engine, prompt(), "profiled",
                on_first=lambda: by_rank.extend(engine.executor.collective_rpc("profile", "stop")))
    ttft_ms = 1e3 * statistics.median(r[0] for r in runs)
    phases = {k: round(1e3 * statistics.median(r[2].get(k, [0, 0.0])[1] for r in runs), 3)
              for k in sorted({k for r in runs for k in r[2]})}
    calls = {k: runs[-1][2][k][0] for k in runs[-1][2]}
    print(f"== host phases on rank 0 until the first token (ms, median of {a.num_iters}); time "
          f"to first token {ttft_ms:.2f} ms (warm-up requests: {warm_ms} ms)")
    for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"   {k:24s} {v:9.3f} ms  {calls.get(k, 0):6d} calls")
    for rank, summary in enumerate(by_rank):
        print(f"== rank {rank}, the profiled request until its first token: device time by kind "
              f"(ms; busy {sum(summary['kernel_ms'].values()):.3f}) {summary['kernel_ms']}")
        if summary["kernels_top"]:
            print("   top kernels (ms, calls):")
            for name, ms, n in summary["kernels_top"]:
                print(f"      {ms:9.3f} {n:6d}  {name}")
        print("   host ops by self CPU time (ms, calls):")
        for name, ms, n in summary["host_ops_ms"]:
            print(f"      {ms:9.3f} {n:6d}  {name}")
    custom = parallel_state.custom_all_reduce()
    print(json.dumps({
        "step": "ttft_profile", "tensor_parallel_size": a.tensor_parallel_size,
        "custom_all_reduce": custom is not None, "input_len": a.input_len,
        "time_to_first_token_ms": round(ttft_ms, 2), "warm_up_ttft_ms": warm_ms,
        "prefill_forward_gpu_ms": round(statistics.median(r[1] for r in runs), 3),
        "host_ms": phases, "kernel_ms_by_rank": [r["kernel_ms"] for r in by_rank],
        "device_busy_ms_by_rank": [round(sum(r["kernel_ms"].values()), 3) for r in by_rank],
        "device": torch.cuda.get_device_name() if CUDA else "cpu"}), flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
