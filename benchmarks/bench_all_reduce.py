"""The tensor-parallel all-reduce at every message size: NCCL against the custom kernels (one-shot,
two-shot over symmetric memory), inside CUDA graphs (as decode runs them) and eagerly (as prefill
does, host cost included), so one run shows where each wins and whether custom_all_reduce.py's
thresholds (ONE_SHOT_MAX_BYTES, DEFAULT_MAX_BYTES) sit at the crossovers.

    python3 benchmarks/bench_all_reduce.py [--world-size 2]

Spawns one process per GPU; rank 0 prints a table and one JSON line per size (bf16 messages,
hidden 4096: rows = tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS = [1, 4, 16, 64, 128, 256, 512, 1024, 2048, 8192]  # tokens of [rows, 4096] bf16
HIDDEN = 4096
GRAPH_CALLS = 20  # all-reduces per captured graph
EAGER_CALLS = 65  # a Llama 8B forward's all-reduces


def _time_graph(fn, x, replays: int = 10) -> float:
    """Microseconds per call of `fn(x)` replayed from a CUDA graph of GRAPH_CALLS calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn(x)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / (replays * GRAPH_CALLS)


def _time_eager(fn, x, reps: int = 5) -> float:
    """Microseconds per call of EAGER_CALLS eager calls, host and device, as a prefill makes them."""
    import time

    fn(x)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(EAGER_CALLS):
            fn(x)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 1e6 * best / EAGER_CALLS


def run(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from kubeinfer.engine import parallel_state as ps
    from kubeinfer.engine.custom_all_reduce import kernel_for

    ps.init_parallel(rank, world, 1, f"tcp://127.0.0.1:{port}", torch.device("cuda", rank),
                     custom_all_reduce=True)
    custom = ps.custom_all_reduce()
    if custom is None and rank == 0:
        print("custom all-reduce unavailable (see the warning above): NCCL only", flush=True)
    paths = {"nccl": lambda x: dist.all_reduce(x, group=ps._TP_GROUP)}
    if custom is not None:
        paths.update(one_shot=custom.one_shot, two_shot=custom.two_shot, engine=ps.tp_all_reduce)
    for rows in ROWS:
        x = torch.randn(rows, HIDDEN, device="cuda").to(torch.bfloat16)
        nbytes = x.numel() * x.element_size()
        row = {"step": "allreduce", "world_size": world, "bytes": nbytes, "tokens": rows,
               "engine_uses": kernel_for(nbytes, x.dtype) or "nccl"}
        for name, fn in paths.items():
            if name in ("one_shot", "two_shot") and nbytes > custom.max_bytes:
                continue
            row[f"{name}_graph_us"] = round(_time_graph(fn, x), 2)
            row[f"{name}_eager_us"] = round(_time_eager(fn, x), 2)
        if rank == 0:
            print(json.dumps(row), flush=True)
    torch.cuda.synchronize()
    dist.barrier()
    os._exit(0)  # the NCCL group is not torn down (kubeinfer/engine/executor.py says why)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world-size", type=int, default=2)
    a = ap.parse_args()
    if torch.cuda.device_count() < a.world_size:
        raise SystemExit(f"error: needs {a.world_size} GPUs, {torch.cuda.device_count()} visible")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(a.world_size, port), nprocs=a.world_size)


if __name__ == "__main__":
    main()
