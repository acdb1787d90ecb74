"""The custom (P2P symmetric-memory) all-reduce: which messages take which kernel, the flag, the
fallback that every rank agrees on (gloo ranks on CPU), and on two GPUs the sums against NCCL's,
eager and in CUDA graphs (gpu_suite's tests_tp step)."""
import socket

import pytest
import torch

from kubeinfer.engine.args import EngineArgs
from kubeinfer.engine import worker_process
from kubeinfer.engine.custom_all_reduce import (DEFAULT_MAX_BYTES, ONE_SHOT_MAX_BYTES,
                                                kernel_for, unsupported_reason)
from tests.fixtures import all_reduce_ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(target, world: int, *args, device_type: str = "cuda", timeout: float = 240) -> dict:
    """Run `target` on `world` ranks, started as the engine starts ranks on `device_type`
    (spawned on CUDA, forked from the preloaded fork server on CPU); their results by rank (fails
    on a rank's error)."""
    ctx = worker_process._process_context(device_type)
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=all_reduce_ranks.run_rank,
                         args=(target, rank, world, port, queue, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, result in results.items():
        assert not (isinstance(result, str) and result.startswith("error")), f"rank {rank}: {result}"
    return results


@pytest.mark.parametrize("nbytes,dtype,kind", [
    (8192, torch.bfloat16, "one_shot"),                   # decode, batch 1, hidden 4096
    (ONE_SHOT_MAX_BYTES, torch.bfloat16, "one_shot"),
    (ONE_SHOT_MAX_BYTES + 4, torch.float32, "two_shot"),
    (DEFAULT_MAX_BYTES, torch.bfloat16, "two_shot"),
    (DEFAULT_MAX_BYTES + 16, torch.bfloat16, None),        # NCCL's
    (8192, torch.float16, None),                           # the kernels take bf16 and float32
    (70, torch.bfloat16, None),                            # not a multiple of 4 bytes
    (0, torch.float32, None),
])
def test_messages_take_the_kernel_their_size_and_dtype_call_for(nbytes, dtype, kind):
    assert kernel_for(nbytes, dtype) == kind


def test_only_gpus_of_one_node_can_use_it():
    assert "CPU" in unsupported_reason(torch.device("cpu"), 2)
    assert "not 1" in unsupported_reason(torch.device("cuda", 0), 1)
    assert "not 16" in unsupported_reason(torch.device("cuda", 0), 16)
    assert unsupported_reason(torch.device("cuda", 0), 2) is None


@pytest.mark.parametrize("kwargs,tries", [
    (dict(tensor_parallel_size=2), True),
    (dict(tensor_parallel_size=2, disable_custom_all_reduce=True), False),
    (dict(tensor_parallel_size=1), False),
    (dict(tensor_parallel_size=2, pipeline_parallel_size=2), False),  # stages run eagerly
    (dict(tensor_parallel_size=2, nnodes=2), False),                  # no NVLink between nodes
])
def test_the_flag_and_the_shapes_that_try_it(kwargs, tries):
    config = EngineArgs(model="m", **kwargs).create_engine_config()
    assert config.parallel.tries_custom_all_reduce == tries


@pytest.mark.parametrize("scenario", ["local_check_fails_on_one_rank",
                                      "shared_setup_fails_on_one_rank"])
def test_a_failure_on_one_rank_turns_it_off_on_every_rank(scenario):
    """Ranks that disagreed would wait for each other in different collectives forever."""
    results = _run_ranks(all_reduce_ranks.gloo_fallback, 2, scenario, device_type="cpu",
                         timeout=120)
    for rank in (0, 1):
        is_off, summed = results[rank]
        assert is_off
        assert summed == [3.0] * 8  # the group still all-reduces (gloo here, NCCL on GPUs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs")
def test_gpu_tensor_parallel_custom_all_reduce_equals_nccl():
    results = _run_ranks(all_reduce_ranks.nccl_compare, 2)
    for rank, checked in results.items():
        assert isinstance(checked, list), f"rank {rank}: {checked}"
        kinds = {kind for *_, kind in checked}
        assert kinds == {"one_shot", "two_shot", None}, kinds  # every path was compared


def test_tp_all_reduce_sends_the_messages_it_takes_to_the_custom_kernel(monkeypatch):
    from kubeinfer.engine import parallel_state

    class Fake:  # stands for the GPU object: takes float32 messages of up to 64 bytes
        calls = []

        def should_use(self, x):
            return x.dtype == torch.float32 and x.numel() * 4 <= 64

        def all_reduce(self, x):
            self.calls.append(x.numel())
            return x.mul_(2)  # what two ranks holding the same x would sum to

    monkeypatch.setattr(parallel_state, "_CUSTOM_AR", Fake())
    assert parallel_state.tp_all_reduce(torch.ones(16)).tolist() == [2.0] * 16
    # not taken: with no group in this process the sum over one rank is x itself
    assert parallel_state.tp_all_reduce(torch.ones(17)).tolist() == [1.0] * 17
    assert parallel_state.tp_all_reduce(torch.ones(4, dtype=torch.float64)).tolist() == [1.0] * 4
    assert Fake.calls == [16]
