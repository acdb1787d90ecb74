"""Multi-node without Ray, on one machine: two "nodes" of one rank each (127.0.0.1, gloo) run a
2-stage pipeline; node 0 is the engine (an `LLM` here), node 1 `kubeinfer serve --headless`. The
greedy ids equal HF transformers'; a node that never arrives, node 0 that never answers and
inconsistent flags end with a clear error and a non-zero exit."""
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from kubeinfer import LLM, SamplingParams
from kubeinfer.engine.errors import ConfigError
from tests.engine.test_consistency import NUM_OUT, hf_greedy, make_prompts

ENGINE = dict(dtype="float32", device="cpu", max_model_len=128, num_gpu_blocks_override=40)
FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-model-len", "128",
         "--num-gpu-blocks-override", "40"]


def free_port_pair() -> int:
    """A port P with P + 1 free too (torch.distributed's store and the node connections)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def serve(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kubeinfer.cli", "serve", *args],
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), text=True, **popen)


def test_two_nodes_one_rank_each_match_hf(tiny_model_dir):
    path = tiny_model_dir("llama")
    port = free_port_pair()
    node1 = serve(str(path), *FLAGS, "-pp", "2", "--nnodes", "2", "--node-rank", "1",
                  "--master-addr", "127.0.0.1", "--master-port", str(port), "--headless")
    try:
        llm = LLM(str(path), pipeline_parallel_size=2, nnodes=2, node_rank=0,
                  master_addr="127.0.0.1", master_port=port, **ENGINE)
        try:
            assert llm.engine.executor.workers.procs == []  # node 0 has rank 0 only
            # the sampler is on the other node: its results are asked for, relayed (node_relay.py)
            assert llm.engine.executor.workers.results is None
            prompts = make_prompts(llm.engine.vocab_size)
            params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts)
        finally:
            llm.engine.shutdown()
        assert node1.wait(timeout=60) == 0  # node 0 stopped it
    finally:
        node1.kill()


def test_a_worker_node_that_never_arrives_is_a_clear_error(tiny_model_dir):
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"worker node\(s\) \[1\] did not join within 1 s: start "
                                          r"`kubeinfer serve MODEL --headless --nnodes 2"):
        LLM(str(tiny_model_dir("llama")), pipeline_parallel_size=2, nnodes=2,
            master_port=free_port_pair(), rendezvous_timeout=1, **ENGINE)
    assert time.monotonic() - start < 30
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("flags,message", [
    (["--nnodes", "2", "--node-rank", "1", "--rendezvous-timeout", "1", "--headless"],
     "node 0 did not answer at 127.0.0.1:"),
    (["--nnodes", "2", "--node-rank", "1"], "--node-rank 1 without --headless"),
    (["--nnodes", "2", "--headless"], "--node-rank 0 with --headless"),
    (["--nnodes", "2", "--node-rank", "2", "--headless"], "--node-rank must be between 0 and"),
], ids=["node0-never-answers", "worker-without-headless", "headless-node0", "rank-out-of-range"])
def test_worker_node_errors_exit_non_zero(tiny_model_dir, flags, message):
    proc = serve(str(tiny_model_dir("llama")), *FLAGS, "-pp", "2", "--master-port",
                 str(free_port_pair()), *flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert message in err


def test_a_worker_node_that_dies_stops_node_0(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    port = free_port_pair()
    node1 = serve(path, *FLAGS, "-pp", "2", "--nnodes", "2", "--node-rank", "1",
                  "--master-port", str(port), "--headless")
    script = f"""
import time
from kubeinfer import LLM
llm = LLM({path!r}, pipeline_parallel_size=2, nnodes=2, master_port={port}, **{ENGINE!r})
print("ready", flush=True)
time.sleep(60)
print("still running", flush=True)
"""
    node0 = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        assert node0.stdout.readline().strip() == "ready"
        node1.kill()
        out, err = node0.communicate(timeout=60)
        assert node0.returncode == 1 and "still running" not in out
        assert "node 1 went away; the other ranks cannot go on without it" in err
    finally:
        node0.kill()
        node1.kill()


def test_nodes_started_with_other_sizes_are_refused_on_both(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    port = free_port_pair()
    node1 = serve(path, *FLAGS, "-pp", "2", "-tp", "2", "--nnodes", "2", "--node-rank", "1",
                  "--master-port", str(port), "--headless", stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
    try:
        with pytest.raises(ConfigError, match=r"node 1 was started with tensor x pipeline x nodes "
                                              r"\(2, 2, 2\) but node 0 with \(1, 2, 2\)"):
            LLM(path, pipeline_parallel_size=2, nnodes=2, master_port=port, **ENGINE)
        _, err = node1.communicate(timeout=60)
        assert node1.returncode == 1 and "start every node with the same sizes" in err
    finally:
        node1.kill()
