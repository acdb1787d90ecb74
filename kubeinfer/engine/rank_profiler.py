"""torch.profiler on one rank, started and stopped on every rank through
`Executor.collective_rpc("profile", ...)` (benchmarks/profile_ttft.py), so the workers' side of a
tensor-parallel step can be seen too: a rank whose host is late shows as its peers' long
all-reduce kernels, and the late rank's own host-op table says what held it.

`stop()` returns a small plain-data summary (it travels back down the workers' pipes): device
time by kind of kernel and the host ops with the most self time.
"""
from __future__ import annotations

import collections

import torch

_PROFILER: torch.profiler.profile | None = None


def start() -> None:
    global _PROFILER
    if _PROFILER is not None:
        raise RuntimeError("the profiler is already running on this rank; stop it first")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _PROFILER = torch.profiler.profile(activities=activities)
    _PROFILER.__enter__()


def stop(num_rows: int = 12) -> dict:
    """Stop and summarise: {"kernel_ms": {kind: ms}, "kernels_top": [(name, ms, calls)],
    "host_ops_ms": [(name, self ms, calls)]}."""
    global _PROFILER
    if _PROFILER is None:
        raise RuntimeError("the profiler is not running on this rank")
    prof, _PROFILER = _PROFILER, None
    prof.__exit__(None, None, None)
    events = prof.key_averages()
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:num_rows]
    kernels = sorted(((e, _device_us(e)) for e in events if _is_kernel(e)), key=lambda p: -p[1])
    return {"kernel_ms": kernel_kinds(events),
            "kernels_top": [(e.key[:80], round(us / 1e3, 3), e.count)
                            for e, us in kernels[:num_rows]],
            "host_ops_ms": [(e.key[:80], round(e.self_cpu_time_total / 1e3, 3), e.count)
                            for e in host]}


def _device_us(e) -> float:
    us = getattr(e, "self_device_time_total", None)
    return getattr(e, "self_cuda_time_total", 0) if us is None else us


def _is_kernel(e) -> bool:
    # host-side ops (aten::, cuda* runtime calls, c10d::) carry their kernels' time as well:
    # count the kernels themselves, once
    return bool(_device_us(e)) and not e.key.startswith(("aten::", "cuda", "c10d::",
                                                          "record_param", "symm_mem::"))


def kernel_kinds(events) -> dict[str, float]:
    """Device time (ms) by kind of kernel: nccl, custom_all_reduce (symm_mem), gemm, attention,
    copy, other."""
    kinds: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if not _is_kernel(e):
            continue
        us = _device_us(e)
        name = e.key.lower()
        kind = ("nccl" if "nccl" in name else
                "custom_all_reduce" if "all_reduce" in name or "allreduce" in name else
                "gemm" if any(k in name for k in ("gemm", "nvjet", "cutlass", "sm90", "cublas")) else
                "attention" if "attention" in name else
                "copy" if "memcpy" in name or "copy" in name else "other")
        kinds[kind] += us / 1e3
    return {k: round(v, 3) for k, v in sorted(kinds.items())}
