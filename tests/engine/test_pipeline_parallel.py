"""Pipeline parallelism, run on CPU through gloo: each stage (a process, or tp processes) holds a
contiguous range of layers and its own KV cache, and hands hidden states and residuals to the
next; up to one step per stage is in flight, each with requests no other holds. The greedy ids
equal HF transformers' (float32) for 2 and 3 stages, 2 stages x 2 tensor ranks, uneven layer
splits, chunked prefill with preemption, and async scheduling, with the queue of steps full.
Families without stage support, partitions that do not add up and dying stages give clear
errors."""
import multiprocessing
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from kubeinfer import LLM, SamplingParams
from kubeinfer.engine.config import ParallelConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.pipeline_stage import layer_range
from tests.engine.test_consistency import NUM_OUT, hf_greedy, make_prompts

KW = dict(dtype="float32", device="cpu", max_model_len=128, max_num_batched_tokens=32,
          num_gpu_blocks_override=40)


def run_greedy(llm, prompts, params=None):
    """Greedy ids of each prompt, the preemptions seen, and the most steps in flight at once.
    Asserts that a step never takes a request that a step in flight holds."""
    engine = llm.engine
    params = params or SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    tokens = {str(i): [] for i in range(len(prompts))}
    num_preemptions = max_in_flight = 0
    launch = engine.executor.execute_model

    def recording_launch(out):
        nonlocal max_in_flight
        mine = set(out.num_scheduled_tokens)
        for step in engine._in_flight:
            assert not mine & set(step.sched_out.num_scheduled_tokens), "a request in two steps"
        max_in_flight = max(max_in_flight, len(engine._in_flight) + 1)
        return launch(out)

    calls = []  # what each step() call did, in order
    read, process = engine.executor.get_output, engine._process

    def recording_read(handle):
        calls.append("read")
        return read(handle)

    def recording_process(updates, stats):
        calls.append("process")
        return process(updates, stats)

    def recording_launch_step(out):
        calls.append("launch")
        return recording_launch(out)

    engine.executor.execute_model = recording_launch_step
    engine.executor.get_output, engine._process = recording_read, recording_process
    try:
        while engine.has_unfinished_requests():
            calls.clear()
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
            num_preemptions = max(num_preemptions, engine.scheduler._num_preemptions)
            if engine.scheduler.in_flight.enabled and "read" in calls and "launch" in calls:
                # with stages: read the oldest, launch the next, then make the outputs
                assert calls == ["read", "launch", "process"], calls
    finally:
        del engine.executor.execute_model, engine.executor.get_output, engine._process
    assert engine.kv.num_free_blocks == engine.num_blocks
    return [tokens[str(i)] for i in range(len(prompts))], num_preemptions, max_in_flight


@pytest.fixture(scope="module")
def three_layer_llama(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with 3 layers, so 2 stages split it unevenly."""
    src = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("tiny-llama-3")
    config = transformers.AutoConfig.from_pretrained(src)
    config.num_hidden_layers = 3
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    for f in src.iterdir():
        if "token" in f.name or f.name == "generation_config.json":
            shutil.copy(f, out / f.name)
    return out


# plain llama over 2 stages (sync) is the uneven-split test's engine below
@pytest.mark.parametrize("arch,tp,extra", [
    ("qwen3", 1, dict(async_scheduling=True)),  # tied embeddings: the last stage loads its head
    ("llama", 2, {}),
], ids=["qwen3-pp2-async-tied", "llama-pp2xtp2"])
def test_pipeline_greedy_matches_hf(tiny_model_dir, arch, tp, extra):
    path = tiny_model_dir(arch)
    llm = LLM(str(path), pipeline_parallel_size=2, tensor_parallel_size=tp, **KW, **extra)
    try:
        assert len(llm.engine.executor.workers.procs) == 2 * tp - 1
        # the last stage's sampler is on this node: it pushes results (pipeline_results.py)
        assert llm.engine.executor.workers.results is not None
        assert len(llm.engine.runner.attn_layers) == 1  # stage 0 holds layer 0 only
        prompts = make_prompts(llm.engine.vocab_size)
        expected = hf_greedy(path, prompts)
        tokens, _, max_in_flight = run_greedy(llm, prompts)
        assert tokens == expected
        assert max_in_flight == 2  # the queue filled: one step per stage
        assert run_greedy(llm, prompts)[0] == expected  # prefix-cache hits on the second round
        with pytest.raises(ConfigError, match="parallel engine is running in this process"):
            LLM(str(path), **KW)  # would build a shard of this engine's model and hang
    finally:
        llm.engine.shutdown()
    assert not multiprocessing.active_children()


def test_uneven_split_with_chunked_prefill_and_preemption(three_layer_llama):
    partition = (1, 2)  # the last stage holds two layers and the LM head
    prompts = make_prompts(512)
    expected = hf_greedy(three_layer_llama, prompts)
    # before the pipeline engine: its groups are this process's while it runs
    one_device = with_logprobs(LLM(str(three_layer_llama), dtype="float32", device="cpu",
                                   max_model_len=80, max_num_batched_tokens=7), prompts[:3])
    llm = LLM(str(three_layer_llama), pipeline_parallel_size=2, pp_layer_partition=partition,
              dtype="float32", device="cpu", max_num_batched_tokens=7, max_model_len=80,
              num_gpu_blocks_override=8, max_num_seqs=6)
    try:
        assert len(llm.engine.runner.attn_layers) == partition[0]
        tokens, num_preemptions, max_in_flight = run_greedy(llm, prompts)
        assert tokens == expected
        assert num_preemptions > 0, "the small cache should have forced a preemption"
        assert max_in_flight == 2
        # logprobs and prompt logprobs come from the last stage's sampler, as one device's
        assert_same_logprobs(with_logprobs(llm, prompts[:3]), one_device)
    finally:
        llm.engine.shutdown()


def test_three_stages_keep_three_steps_in_flight(three_layer_llama):
    """One layer a stage; greedy ids as HF's, and penalties (which read every earlier token of
    a request on the sampling rank) as one device's, with the queue three steps deep."""
    prompts = make_prompts(512)
    penalized = SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=1.5,
                               presence_penalty=0.5)
    one_device = LLM(str(three_layer_llama), **KW)
    try:
        expected_penalized = run_greedy(one_device, prompts, penalized)[0]
    finally:
        one_device.engine.shutdown()
    expected = hf_greedy(three_layer_llama, prompts)
    llm = LLM(str(three_layer_llama), pipeline_parallel_size=3, **KW)
    try:
        tokens, _, max_in_flight = run_greedy(llm, prompts)
        assert tokens == expected
        assert max_in_flight == 3
        assert run_greedy(llm, prompts, penalized)[0] == expected_penalized
        assert aborted_in_flight(llm, prompts) == expected[1:]
    finally:
        llm.engine.shutdown()
    assert not multiprocessing.active_children()


def aborted_in_flight(llm, prompts):
    """Abort request 0 while its step is in flight; the others' greedy ids, and a whole pool."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    tokens = {str(i): [] for i in range(len(prompts))}
    while not any("0" in step.sched_out.num_scheduled_tokens for step in engine._in_flight):
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    engine.abort_request("0")
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert engine.kv.num_free_blocks == engine.num_blocks
    assert len(tokens.pop("0")) < NUM_OUT
    return [tokens[str(i)] for i in range(1, len(prompts))]


def with_logprobs(llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=2, prompt_logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    return [(o.outputs[0].token_ids, rounded(o.outputs[0].logprobs), rounded(o.prompt_logprobs))
            for o in outs]


def assert_same_logprobs(got, expected):
    """Equal token ids and ranks; logprobs within 1e-3 (steps split into micro-batches sum in
    other orders, so the last float32 digits move)."""
    got_leaves, expected_leaves = list(leaves(got)), list(leaves(expected))
    assert [type(v) for v in got_leaves] == [type(v) for v in expected_leaves]
    for g, e in zip(got_leaves, expected_leaves):
        assert g == pytest.approx(e, abs=1e-3) if isinstance(e, float) else g == e, (got, expected)


def leaves(x):
    """The scalars of nested lists, tuples and dicts (keys included), in order."""
    if isinstance(x, (list, tuple)):
        for v in x:
            yield from leaves(v)
    elif isinstance(x, dict):
        for k, v in x.items():
            yield k
            yield from leaves(v)
    else:
        yield x


def rounded(x):
    """Floats to 4 places, anywhere in nested lists, tuples, dicts and Logprob objects."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, (list, tuple)):
        return [rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if hasattr(x, "logprob"):
        return (round(x.logprob, 4), x.rank)
    return x


def test_layer_ranges():
    assert [layer_range(5, s, 2) for s in range(2)] == [(0, 3), (3, 5)]
    assert [layer_range(32, s, 4) for s in range(4)] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert [layer_range(4, s, 2, (3, 1)) for s in range(2)] == [(0, 3), (3, 4)]


def test_partition_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.setenv("KUBEINFER_PP_LAYER_PARTITION", "5,3")
    assert ParallelConfig(pipeline_parallel_size=2).pp_layer_partition == (5, 3)
    assert ParallelConfig(pipeline_parallel_size=2, pp_layer_partition="4,4").pp_layer_partition \
        == (4, 4)
    with pytest.raises(ConfigError, match="names 2 stages but --pipeline-parallel-size is 3"):
        ParallelConfig(pipeline_parallel_size=3)
    monkeypatch.setenv("KUBEINFER_PP_LAYER_PARTITION", "5;3")
    with pytest.raises(ConfigError, match="cannot read '5;3' as a layer partition"):
        ParallelConfig(pipeline_parallel_size=2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(pipeline_parallel_size=2, pp_layer_partition=(2, 1)),
     r"'2,1' must give each of the 2 stages at least one layer and 2 layers in all"),
    (dict(pipeline_parallel_size=3), r"needs at least one decoder layer per stage but the model "
                                     r"has 2"),
], ids=["partition-sum", "too-many-stages"])
def test_bad_splits_are_refused_before_any_process_starts(tiny_model_dir, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LLM(str(tiny_model_dir("llama")), **KW, **kwargs)
    assert not multiprocessing.active_children()


def test_families_without_stage_support_are_refused_by_name(tmp_path):
    from tests.fixtures.tiny_gpt_families import build_gpt_model

    path = build_gpt_model("gpt2", tmp_path)
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel does not support pipeline parallelism; "
                                          r"the architectures that do are .*LlamaForCausalLM.*"
                                          r"MixtralForCausalLM"):
        LLM(str(path), pipeline_parallel_size=2, **KW)
    assert not multiprocessing.active_children()


def test_a_dying_stage_stops_the_engine_instead_of_hanging(tiny_model_dir):
    script = f"""
import os, signal, time
from kubeinfer import LLM
llm = LLM({str(tiny_model_dir("llama"))!r}, pipeline_parallel_size=2, dtype="float32",
          device="cpu", max_model_len=128, num_gpu_blocks_override=40)
os.kill(llm.engine.executor.workers.procs[0].pid, signal.SIGKILL)
time.sleep(60)
print("still running")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 1 and "still running" not in proc.stdout
    assert "worker kubeinfer-tp1 exited with code -9" in proc.stderr


def test_embedding_models_refuse_pipeline_stages(tiny_bert_dir):
    with pytest.raises(ConfigError, match="--pipeline-parallel-size=2 is not supported for "
                                          "embedding models"):
        LLM(str(tiny_bert_dir), pipeline_parallel_size=2, device="cpu")
    assert not multiprocessing.active_children()


def test_worker_node_ranks_cannot_run_an_engine(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"node rank 1 is a worker node: it runs `kubeinfer serve "
                                          r"MODEL --headless"):
        LLM(str(tiny_model_dir("llama")), pipeline_parallel_size=2, nnodes=2, node_rank=1, **KW)
