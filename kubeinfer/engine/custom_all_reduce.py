"""The tensor-parallel all-reduce for small and mid-size messages on GPUs of one node: peer-to-peer
loads from a buffer every rank has mapped (torch symmetric memory), in one kernel on the compute
stream, instead of NCCL.

Why: a decode step of Llama 8B at TP 2 all-reduces 65 messages of [batch, 4096] bf16 (8 KiB at
batch 1). NCCL spends most of each on its protocol and the hand-off to its own stream; a kernel
that reads the peers' copies straight over NVLink takes a few microseconds (vLLM's custom
all-reduce and its symmetric-memory communicator, TensorRT-LLM's one-shot all-reduce).

What: at start-up every rank of the tensor-parallel group allocates one buffer of `max_bytes`
with `torch.distributed._symmetric_memory.empty` and maps the others' with `rendezvous` (CUDA IPC
handles; no multicast object is needed: NVLink multicast stays off, TORCH_SYMM_MEM_DISABLE_MULTICAST
=1). An all-reduce of `x` copies it into this rank's buffer and runs
  - up to ONE_SHOT_MAX_BYTES: `symm_mem.one_shot_all_reduce_out` (every rank reads every peer's
    whole buffer and writes the sum into x: one barrier, one pass),
  - up to `max_bytes`: `symm_mem.two_shot_all_reduce_` (reduce-scatter then all-gather over the
    buffers, each rank reads 1/world of each peer's; then copied back into x),
and bigger messages, other dtypes (the kernels take bf16 and float32) and sizes that are not a
multiple of 4 bytes go to NCCL. The choice depends only on the message's size and dtype, which
are the same on every rank, so the ranks never disagree on the path. The buffer is allocated once
and the ops allocate nothing, so the same calls are captured in CUDA graphs. The kernels start and
end with a barrier over the ranks' signal pads, so the next all-reduce cannot overwrite a buffer
a peer still reads.

Failure: every step of the set-up that can fail (the ops missing from this torch, no P2P access,
the allocation, the rendezvous, a self-test that must give world_size) is checked, the ranks
agree on the outcome with one NCCL all-reduce, and on any failure every rank logs why and keeps
NCCL. A CPU engine (gloo) never builds one.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

MiB = 1 << 20
# Per message: one-shot reads world_size x the message over NVLink and wins while that is small;
# two-shot moves 2 x (world - 1) / world of it and wins up to a few MiB, past which NCCL's
# pipelined ring is as fast and needs no copies. (torch's intra-node all-reduce switched at
# 256 KiB and 10 MiB on H100; vLLM's custom all-reduce stops at 8 MiB.)
ONE_SHOT_MAX_BYTES = 512 * 1024
DEFAULT_MAX_BYTES = 8 * MiB
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)  # what the symm_mem kernels dispatch on
MAX_WORLD_SIZE = 8  # one node's NVLink peers


class CustomAllReduce:
    """One tensor-parallel group's symmetric buffer and the all-reduce over it.

    Build it with `CustomAllReduce.create(group, device)` (a collective: every rank of `group`
    calls it at the same point); it returns None where the custom path cannot run, on every rank
    alike."""

    def __init__(self, group: dist.ProcessGroup, buffer: torch.Tensor, max_bytes: int):
        self.group = group
        self.group_name = group.group_name
        self.buffer = buffer  # uint8 [max_bytes], symmetric: mapped by every rank
        self.max_bytes = max_bytes
        self.world_size = dist.get_world_size(group)
        # the kernels store 16-byte vectors: an x whose address is not 16-byte aligned (a view
        # into a larger tensor) gets its one-shot sum here first. A local choice: the collective
        # is the same either way, so the ranks may differ in it.
        self.scratch = torch.empty(ONE_SHOT_MAX_BYTES, dtype=torch.uint8, device=buffer.device)
        self.num_one_shot = 0  # calls by kind, for the profile (host counters; graphs count once)
        self.num_two_shot = 0

    # ---- building it ----------------------------------------------------------------------------
    @classmethod
    def create(cls, group: dist.ProcessGroup, device: torch.device,
               max_bytes: int = DEFAULT_MAX_BYTES) -> "CustomAllReduce | None":
        """The group's custom all-reduce, or None (logged once, on every rank alike) when any
        step fails on any rank; NCCL then does every all-reduce."""
        world = dist.get_world_size(group)
        reason = unsupported_reason(device, world)
        if reason is None:
            reason = _check_local(device, world)
        # every rank must take the same path: agree before the collective set-up
        failed = _any_rank(reason is not None, group, device)
        if failed:
            _log_fallback(reason or "another rank of the group cannot use it")
            return None
        car, reason = None, None
        try:
            car = cls(group, _symmetric_buffer(group, device, max_bytes), max_bytes)
            reason = car._self_test(device)
        except Exception as e:  # noqa: BLE001 - any failure here means: use NCCL
            reason = f"{type(e).__name__}: {e}"
        if _any_rank(reason is not None, group, device):
            _log_fallback(reason or "its set-up failed on another rank of the group")
            return None
        logger.info("custom all-reduce: symmetric-memory P2P buffers of %d MiB over %d GPUs "
                    "(one-shot up to %d KiB, two-shot up to %d MiB, NCCL above)",
                    max_bytes // MiB, world, ONE_SHOT_MAX_BYTES // 1024, max_bytes // MiB)
        return car

    def _self_test(self, device: torch.device) -> str | None:
        """Both kernels on known data; None when the sums are right."""
        for numel in (1024, ONE_SHOT_MAX_BYTES // 4 + 1024):  # one-shot, then two-shot (float32)
            x = torch.full((numel,), float(dist.get_rank(self.group) + 1), dtype=torch.float32,
                           device=device)
            self.all_reduce(x)
            want = self.world_size * (self.world_size + 1) / 2
            torch.cuda.synchronize(device)
            if not bool((x == want).all()):
                return f"its self-test summed to {x[0].item()} instead of {want}"
        self.num_one_shot = self.num_two_shot = 0
        return None

    # ---- using it -------------------------------------------------------------------------------
    def should_use(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.is_contiguous() and \
            kernel_for(x.numel() * x.element_size(), x.dtype, self.max_bytes) is not None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group in place (as dist.all_reduce) and return it. The caller checks
        `should_use(x)` first."""
        nbytes = x.numel() * x.element_size()
        if kernel_for(nbytes, x.dtype, self.max_bytes) == "one_shot":
            self.num_one_shot += 1
            return self.one_shot(x)
        self.num_two_shot += 1
        return self.two_shot(x)

    # the two kernels, for any message that fits the buffer (benchmarks/bench_all_reduce.py
    # times each at every size)
    def one_shot(self, x: torch.Tensor) -> torch.Tensor:
        nbytes = x.numel() * x.element_size()
        buf = self.buffer[:nbytes].view(x.dtype)
        buf.copy_(x.view(-1))
        if x.data_ptr() % 16 == 0:
            torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", self.group_name, x.view(-1))
        else:
            if nbytes > self.scratch.numel():  # all_reduce never sends one this big here
                raise ValueError(f"an unaligned one-shot message of {nbytes} bytes is larger "
                                 f"than the scratch buffer ({self.scratch.numel()})")
            out = self.scratch[:nbytes].view(x.dtype)
            torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", self.group_name, out)
            x.view(-1).copy_(out)
        return x

    def two_shot(self, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffer[:x.numel() * x.element_size()].view(x.dtype)
        buf.copy_(x.view(-1))
        torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", self.group_name)
        x.view(-1).copy_(buf)
        return x


def kernel_for(nbytes: int, dtype: torch.dtype, max_bytes: int = DEFAULT_MAX_BYTES) -> str | None:
    """"one_shot", "two_shot", or None (NCCL) for a message of `nbytes` bytes of `dtype`.

    Only what is the same on every rank (size, dtype) may decide, or one rank would wait in this
    kernel while another waits in NCCL. The kernels need bf16 or float32 and a size that is a
    multiple of 4 bytes."""
    if dtype not in SUPPORTED_DTYPES or nbytes <= 0 or nbytes % 4 or nbytes > max_bytes:
        return None
    return "one_shot" if nbytes <= ONE_SHOT_MAX_BYTES else "two_shot"


def unsupported_reason(device: torch.device, world_size: int) -> str | None:
    """Why this engine's shape cannot use the custom all-reduce at all (None: it may)."""
    if device.type != "cuda":
        return "the engine runs on CPU (gloo)"
    if not 2 <= world_size <= MAX_WORLD_SIZE:
        return f"it serves 2 to {MAX_WORLD_SIZE} GPUs of one node, not {world_size}"
    return None


def _check_local(device: torch.device, world_size: int) -> str | None:
    """What this rank can check alone, before any collective: the ops and P2P access."""
    try:
        import torch.distributed._symmetric_memory  # noqa: F401 - registers nothing we need, but
        # its absence means this torch has no symmetric memory at all
    except ImportError as e:
        return f"this torch has no symmetric memory ({e})"
    for op in ("one_shot_all_reduce_out", "two_shot_all_reduce_"):
        if not hasattr(torch.ops.symm_mem, op):
            return f"this torch ({torch.__version__}) lacks torch.ops.symm_mem.{op}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    # ranks of one node use GPUs 0..world-1 (worker_process.py): each must reach the others
    for peer in range(min(world_size, torch.cuda.device_count())):
        if peer != index and not torch.cuda.can_device_access_peer(index, peer):
            return f"GPU {index} cannot access GPU {peer} peer to peer"
    return None


def _symmetric_buffer(group: dist.ProcessGroup, device: torch.device,
                      max_bytes: int) -> torch.Tensor:
    import torch.distributed._symmetric_memory as symm_mem

    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:  # needed before torch 2.8, a deprecated no-op after
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enable(group.group_name)
    buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
    symm_mem.rendezvous(buffer, group.group_name)
    return buffer


def _any_rank(flag: bool, group: dist.ProcessGroup, device: torch.device) -> bool:
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _log_fallback(reason: str) -> None:
    logger.warning("custom all-reduce is off, NCCL does every all-reduce: %s (pass "
                   "--disable-custom-all-reduce to skip the attempt)", reason)
