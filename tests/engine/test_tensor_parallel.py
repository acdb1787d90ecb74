"""Tensor parallelism, run on CPU through gloo: rank 0 and its worker processes, each holding a
shard of every layer and running the same runner methods (executor.collective_rpc), give HF
transformers' greedy tokens (float32), synchronously and with async scheduling, with KV heads split
and replicated. The GPU run (NCCL, CUDA graphs) is in
tests/engine/test_gpu_engine.py."""
import multiprocessing

import pytest
import torch
from transformers import AutoConfig

from kubeinfer import LLM, SamplingParams
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.tensor_parallel_check import check_tensor_parallel
from tests.engine.test_consistency import NUM_OUT, hf_greedy, make_prompts

KW = dict(dtype="float32", device="cpu", max_model_len=128, max_num_batched_tokens=32,
          num_gpu_blocks_override=40)


def greedy(llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
    return [o.outputs[0].token_ids for o in outs]


# sync and async scheduling at TP 2; TP 4 (KV heads replicated over ranks) once, with async: four
# ranks on the CI's two cores cost ~20 s a run
@pytest.mark.parametrize("arch,tp,async_sched", [("llama", 2, False), ("qwen3", 2, True),
                                                  ("llama", 4, True)],
                         ids=["llama-tp2-sync", "qwen3-tp2-async", "llama-tp4-kv-replicated-async"])
def test_tensor_parallel_greedy_matches_hf(tiny_model_dir, arch, tp, async_sched):
    path = tiny_model_dir(arch)
    llm = LLM(str(path), tensor_parallel_size=tp, async_scheduling=async_sched, **KW)
    try:
        workers = llm.engine.executor.workers
        assert workers is not None and len(workers.procs) == tp - 1
        assert all(p.is_alive() for p in workers.procs)
        attn = llm.engine.runner.attn_layers[0]
        assert attn.num_heads == 4 // tp and attn.num_kv_heads == max(1, 2 // tp)  # this rank's share
        prompts = make_prompts(llm.engine.vocab_size)
        expected = hf_greedy(path, prompts)
        assert greedy(llm, prompts) == expected
        assert greedy(llm, prompts) == expected  # prefix-cache hits on the second round
    finally:
        llm.engine.shutdown()
    assert not multiprocessing.active_children()


def test_sizes_that_do_not_divide_the_model_are_refused_before_any_process_starts(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"--tensor-parallel-size=3 does not divide the model's "
                                          r"num_attention_heads \(4\); use one of \[1, 2, 4\]"):
        LLM(str(tiny_model_dir("llama")), tensor_parallel_size=3, **KW)
    assert not multiprocessing.active_children()


def test_more_ranks_than_gpus_is_refused(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir("llama"))
    with pytest.raises(ConfigError, match="--tensor-parallel-size=2 needs 2 GPUs but 1 is visible"):
        check_tensor_parallel(config, 2, "cuda", num_gpus=1)
    check_tensor_parallel(config, 2, "cuda", num_gpus=2)
    check_tensor_parallel(config, 4, "cpu", num_gpus=0)  # 2 KV heads, each on 2 ranks


def test_a_checkpoint_that_fails_to_load_stops_every_rank(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_model_dir("qwen3")  # one shard
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    del tensors[next(k for k in tensors if "mlp.down_proj" in k)]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="lacks 1 weights"):
        LLM(str(tmp_path), tensor_parallel_size=2, **KW)
    assert not multiprocessing.active_children()
    assert not torch.distributed.is_initialized()  # a later engine can start its own group


def test_a_second_group_in_one_process_is_refused_clearly(tiny_model_dir, tmp_path):
    # stands in for an NCCL group left by an earlier engine, which cannot be torn down
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0,
                                         world_size=1)
    try:
        with pytest.raises(ConfigError, match="already ran in this process.*new process"):
            LLM(str(tiny_model_dir("llama")), tensor_parallel_size=2, **KW)
        assert not multiprocessing.active_children()
    finally:
        torch.distributed.destroy_process_group()


def test_a_worker_that_dies_stops_the_engine_instead_of_hanging(tiny_model_dir):
    import os
    import subprocess
    import sys

    script = f"""
import os, signal, time
from kubeinfer import LLM
llm = LLM({str(tiny_model_dir("llama"))!r}, tensor_parallel_size=2, dtype="float32", device="cpu",
          max_model_len=128, num_gpu_blocks_override=40)
os.kill(llm.engine.executor.workers.procs[0].pid, signal.SIGKILL)
time.sleep(60)
print("still running")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 1 and "still running" not in proc.stdout
    assert "tensor-parallel worker kubeinfer-tp1 exited with code -9" in proc.stderr


# async only: the harder path (sync scheduling: test_prompt_logprobs.py)
@pytest.mark.parametrize("async_sched", [True], ids=["async"])
def test_prompt_logprobs_under_tensor_parallelism_equal_one_device(tiny_model_dir, async_sched):
    """Prompt logprobs take extra LM-head gathers (chunked prefill here): every rank runs them in
    the same runner method, and the values equal a single device's."""
    path = str(tiny_model_dir("llama"))
    prompts = make_prompts(300)
    params = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=3)

    def run(llm):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [(o.outputs[0].token_ids,
                 [None if d is None else {t: (round(lp.logprob, 4), lp.rank) for t, lp in d.items()}
                  for d in o.prompt_logprobs]) for o in outs]

    expected = run(LLM(path, async_scheduling=async_sched, **KW))
    with LLM(path, tensor_parallel_size=2, async_scheduling=async_sched, **KW) as llm:
        got = run(llm)
    assert not multiprocessing.active_children()
    assert [g[0] for g in got] == [e[0] for e in expected]
    for (_, g), (_, e) in zip(got, expected):
        assert len(g) == len(e) and g[0] is None
        for gd, ed in zip(g[1:], e[1:]):
            assert gd.keys() == ed.keys()
            assert all(abs(gd[t][0] - ed[t][0]) < 1e-3 and gd[t][1] == ed[t][1] for t in gd)


def test_structured_outputs_under_tensor_parallelism_equal_one_device(tiny_model_dir):
    """Only rank 0 masks and samples; the workers run the same step without a grammar."""
    path = str(tiny_model_dir("llama"))
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    params = SamplingParams(temperature=0.0, max_tokens=30,
                            structured_outputs={"json": schema, "disable_any_whitespace": True})
    prompts = [{"prompt_token_ids": p} for p in make_prompts(300)[:3]]

    def run(llm):
        return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]

    expected = run(LLM(path, async_scheduling=True, **KW))
    with LLM(path, tensor_parallel_size=2, async_scheduling=True, **KW) as llm:
        assert run(llm) == expected
    assert not multiprocessing.active_children()
