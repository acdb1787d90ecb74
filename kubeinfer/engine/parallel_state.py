"""The parallel groups of this process: which ranks a layer's collectives meet.

One module owns them, so layers read the group from here and nothing else keeps a copy: the
tensor-parallel group today (every rank of the engine), the pipeline-parallel group next. With no
group joined the process is one device and every collective below is a no-op.
`init_tensor_parallel` joins the group (NCCL between GPUs, gloo on CPU for tests).
"""
from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from kubeinfer.engine.errors import ConfigError

_TP_GROUP: dist.ProcessGroup | None = None


def init_tensor_parallel(rank: int, world_size: int, port: int, device: torch.device) -> None:
    """Join the tensor-parallel group of `world_size` ranks rendezvousing on 127.0.0.1:port."""
    global _TP_GROUP
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(hours=1))
    _TP_GROUP = dist.group.WORLD


def destroy_tensor_parallel(tear_down: bool) -> None:
    """Forget the group; with `tear_down` also leave it (gloo). An NCCL group whose all-reduces
    were captured in CUDA graphs is never torn down (executor.py says why)."""
    global _TP_GROUP
    _TP_GROUP = None
    if tear_down and dist.is_initialized():
        dist.destroy_process_group()


def tp_size() -> int:
    return 1 if _TP_GROUP is None else dist.get_world_size(_TP_GROUP)


def tp_rank() -> int:
    return 0 if _TP_GROUP is None else dist.get_rank(_TP_GROUP)


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_size() > 1:
        dist.all_reduce(x, group=_TP_GROUP)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    size = tp_size()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=dim)


def tp_broadcast_from_first(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's `x` on every rank, on the device (no host round trip); in place."""
    if tp_size() > 1:
        dist.broadcast(x, src=dist.get_global_rank(_TP_GROUP, 0), group=_TP_GROUP)
    return x

