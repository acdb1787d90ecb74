"""How many threads torch uses on CPU: the CPUs this process may really run on, shared by the
tensor-parallel ranks, unless the user said otherwise with OMP_NUM_THREADS.

torch's default is the machine's core count, which is wrong in two common places: a container
whose cgroup CPU quota is smaller than the node (a Kubernetes CPU limit) and a process pinned to
a few cores (taskset, cpusets). Both oversubscribe, and OpenMP threads that meet at a barrier after
every op stall whenever one of them is descheduled or throttled, which costs far more than the
idle core an undersubscribed process leaves. So the count rounds down.

OMP_NUM_THREADS is read here and nowhere else; it is a per-process count (its meaning for every
OpenMP program), so each tensor-parallel rank uses it as given.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup CPU quota in CPUs (cpu.max of cgroup v2, cfs quota/period of v1), or None when
    there is none or it cannot be read."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota (rounded down,
    at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.floor(limit))
    return max(1, cpus)


def choose_num_threads(world_size: int = 1, env: Mapping[str, str] = os.environ,
                       root: Path = CGROUP_ROOT) -> tuple[int, str]:
    """(threads for one rank, why). OMP_NUM_THREADS when it is a positive integer; otherwise the
    available CPUs split evenly over `world_size` ranks, at least one each."""
    value = env.get("OMP_NUM_THREADS", "").strip()
    if value:
        if value.isdigit() and int(value) > 0:
            return int(value), "OMP_NUM_THREADS"
        logger.warning("OMP_NUM_THREADS=%r is not a positive integer, so it is ignored; set it to "
                       "the number of threads each engine process should use, or unset it", value)
    cpus = available_cpus(root)
    why = f"{cpus} CPUs available (affinity and cgroup quota)"
    if world_size > 1:
        why += f", split over {world_size} tensor-parallel ranks"
    return max(1, cpus // world_size), why


def configure(device: torch.device, world_size: int = 1) -> None:
    """Set torch's intra-op thread count for this process when it computes on CPU."""
    if device.type != "cpu":
        return
    num_threads, why = choose_num_threads(world_size)
    torch.set_num_threads(num_threads)
    logger.info("CPU: %d torch threads (%s)", num_threads, why)
