"""The parallel groups of this process: which ranks a layer's collectives meet.

One module owns them, so layers read the group from here and nothing else keeps a copy. The
engine's ranks form a grid of pipeline stages x tensor-parallel ranks (vLLM's layout): global rank
r is tensor rank r % tp of stage r // tp. The tensor-parallel group is the tp ranks of this
process's stage (every rank of the engine when there is one stage, exactly as before pipeline
parallelism); the pipeline group is the ranks of every stage with this process's tensor rank, and
hidden states go point to point along it. With no group joined the process is one device and every
collective below is a no-op. `init_parallel` joins the groups (NCCL between GPUs, gloo on CPU)
and, on GPUs of one node, builds the tensor group's custom all-reduce (custom_all_reduce.py), which
`tp_all_reduce` uses for the messages it takes; NCCL does the rest.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from kubeinfer.engine.custom_all_reduce import CustomAllReduce

_TP_GROUP: dist.ProcessGroup | None = None
_PP_RANKS: list[int] | None = None  # global ranks of this process's pipeline group, by stage
_PP_RANK = 0
_PP_PARTITION: tuple[int, ...] | None = None  # layers per stage, when the user set them
_CUSTOM_AR: CustomAllReduce | None = None  # the tensor group's P2P all-reduce (GPUs), if built
_PP_SENDS: list = []  # the last step's hidden-state sends to the next stage (dist.Work)
# how long a collective or point-to-point receive waits for a peer before raising (a worker
# node that never arrives, a stage stuck); the executor's death watch stops the engine sooner
# when a local worker dies
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=1)


def init_parallel(rank: int, tp: int, pp: int, init_method: str, device: torch.device,
                  timeout: datetime.timedelta = COLLECTIVE_TIMEOUT,
                  layer_partition: tuple[int, ...] | None = None,
                  custom_all_reduce: bool = False) -> None:
    """Join the engine's tp x pp ranks rendezvousing at `init_method` (tcp://host:port) as global
    rank `rank`, then its tensor-parallel and pipeline groups. `layer_partition`: layers per stage
    (--pp-layer-partition), read by the models through `pp_layer_partition`. `custom_all_reduce`:
    try the P2P all-reduce for the tensor group (GPUs of one node, one pipeline stage); every rank
    passes the same value."""
    global _TP_GROUP, _PP_RANKS, _PP_RANK, _PP_PARTITION, _CUSTOM_AR
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method,
                            rank=rank, world_size=tp * pp, timeout=timeout)
    if pp == 1:
        _TP_GROUP = dist.group.WORLD
        if custom_all_reduce and device.type == "cuda" and tp > 1:
            _CUSTOM_AR = CustomAllReduce.create(_TP_GROUP, device)
        return
    # every rank creates every group, in the same order (new_group is a collective)
    for stage in range(pp):
        group = dist.new_group(list(range(stage * tp, (stage + 1) * tp)))
        if stage == rank // tp:
            _TP_GROUP = group
    _PP_RANKS = [stage * tp + rank % tp for stage in range(pp)]
    _PP_RANK = rank // tp
    _PP_PARTITION = layer_partition


def init_tensor_parallel(rank: int, world_size: int, port: int, device: torch.device) -> None:
    """Join the tensor-parallel group of `world_size` ranks rendezvousing on 127.0.0.1:port."""
    init_parallel(rank, world_size, 1, f"tcp://127.0.0.1:{port}", device)


def destroy_parallel(tear_down: bool) -> None:
    """Forget the groups; with `tear_down` also leave them (gloo). An NCCL group whose all-reduces
    were captured in CUDA graphs is never torn down (executor.py says why)."""
    global _TP_GROUP, _PP_RANKS, _PP_RANK, _PP_PARTITION, _CUSTOM_AR, _PP_SENDS
    _TP_GROUP, _PP_RANKS, _PP_RANK, _PP_PARTITION = None, None, 0, None
    _CUSTOM_AR, _PP_SENDS = None, []
    if tear_down and dist.is_initialized():
        dist.destroy_process_group()


destroy_tensor_parallel = destroy_parallel


def tp_size() -> int:
    return 1 if _TP_GROUP is None else dist.get_world_size(_TP_GROUP)


def tp_rank() -> int:
    return 0 if _TP_GROUP is None else dist.get_rank(_TP_GROUP)


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the tensor group, in place: the P2P kernel for the messages the custom
    all-reduce takes (decode-sized, on GPUs), NCCL or gloo for the rest."""
    if _CUSTOM_AR is not None and _CUSTOM_AR.should_use(x):
        return _CUSTOM_AR.all_reduce(x)
    if tp_size() > 1:
        dist.all_reduce(x, group=_TP_GROUP)
    return x


def custom_all_reduce() -> CustomAllReduce | None:
    """The tensor group's custom all-reduce, or None where NCCL (or gloo) does every one."""
    return _CUSTOM_AR


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


# ---- pipeline stages ---------------------------------------------------------------------------
def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def pp_size() -> int:
    return 1 if _PP_RANKS is None else len(_PP_RANKS)


def pp_rank() -> int:
    return _PP_RANK


def pp_layer_partition() -> tuple[int, ...] | None:
    return _PP_PARTITION


def is_first_stage() -> bool:
    return _PP_RANK == 0


def is_last_stage() -> bool:
    return _PP_RANK == pp_size() - 1


def pp_send_next(tensors: list[torch.Tensor]) -> None:
    """Send `tensors` to the same tensor rank of the next stage (in order, each whole) without
    waiting for it to receive them, so this stage can start its next step while the next stage
    computes this one. The previous call's sends are waited on first: one step's sends are
    outstanding at most (on a GPU the wait is the stream's, not the host's)."""
    global _PP_SENDS
    for work in _PP_SENDS:
        work.wait()
    dst = _PP_RANKS[_PP_RANK + 1]
    # the works keep the tensors alive until they are sent
    _PP_SENDS = [dist.isend(t.contiguous(), dst=dst) for t in tensors]


def pp_recv_prev(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Receive into `tensors` (preallocated, the sender's shapes) from the previous stage."""
    src = _PP_RANKS[_PP_RANK - 1]
    for t in tensors:
        dist.recv(t, src=src)
    return tensors

