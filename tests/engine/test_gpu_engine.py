"""On a GPU: Triton kernels and CUDA graphs still give HF's greedy tokens (float32, so no near-ties
from rounding). Skipped where no GPU is present; `make test-gpu` runs it."""
import pytest
import torch

from kubeinfer import LLM, SamplingParams
from kubeinfer.engine.parallel_state import custom_all_reduce
from tests.engine.test_consistency import NUM_OUT, hf_greedy, make_prompts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("eager,async_sched", [(False, None), (False, False), (True, None)],
                         ids=["graphs-async", "graphs-sync", "eager-async"])
def test_gpu_greedy_matches_hf(tiny_model_dir, arch, eager, async_sched):
    path = tiny_model_dir(arch)
    llm = LLM(str(path), dtype="float32", device="cuda", enforce_eager=eager, max_model_len=256,
              max_num_batched_tokens=64, gpu_memory_utilization=0.3, async_scheduling=async_sched)
    assert (llm.engine.runner.graph_runner is None) == eager
    assert llm.engine.config.scheduler.async_scheduling == (async_sched is None)  # on by default
    prompts = make_prompts(llm.engine.vocab_size)
    expected = hf_greedy(path, prompts)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
    for _ in range(2):  # second round: prefix-cache hits
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks


def test_gpu_sampling_runs_on_device(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), device="cuda", max_model_len=256,
              gpu_memory_utilization=0.3)
    outs = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 8,
                        SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=16,
                                       ignore_eos=True, seed=1, logprobs=2))
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1  # same seed, same tokens



@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_tensor_parallel_2_matches_hf(tiny_model_dir):
    """Two ranks over NCCL and the custom all-reduce (P2P kernels for the small messages),
    all-reduces captured in the CUDA graphs, async scheduling on. One tensor-parallel engine per
    process on CUDA (kubeinfer/engine/executor.py says why)."""
    path = tiny_model_dir("qwen3")
    llm = LLM(str(path), dtype="float32", device="cuda", tensor_parallel_size=2,
              max_model_len=256, max_num_batched_tokens=64, gpu_memory_utilization=0.3)
    try:
        prompts = make_prompts(llm.engine.vocab_size)
        params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts)
        assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
        # ... with the decode all-reduces on the custom P2P kernels (the default), not NCCL
        custom = custom_all_reduce()
        assert custom is not None, "the custom all-reduce fell back to NCCL: see the log"
        assert custom.num_one_shot > 0
    finally:
        llm.engine.shutdown()


def test_gpu_prompt_logprobs_and_logit_bias_match_cpu(tiny_model_dir):
    """The paths that only run their device copies on a GPU (pinned prompt-logprob rows read with
    the step's event, async scheduling, graphs for the decode steps) give the CPU engine's values."""
    path = str(tiny_model_dir("llama"))
    prompts = make_prompts(300)
    params = SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=3, logit_bias={7: 0.5})

    def run(llm):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return [(o.outputs[0].token_ids,
                 [None if d is None else {t: (lp.logprob, lp.rank) for t, lp in d.items()}
                  for d in o.prompt_logprobs]) for o in outs]

    kw = dict(dtype="float32", max_model_len=256, max_num_batched_tokens=64)
    gpu = run(LLM(path, device="cuda", gpu_memory_utilization=0.3, **kw))
    cpu = run(LLM(path, device="cpu", **kw))
    assert [g[0] for g in gpu] == [c[0] for c in cpu]
    for (_, g), (_, c) in zip(gpu, cpu):
        for gd, cd in zip(g[1:], c[1:]):
            assert gd.keys() == cd.keys()
            assert all(abs(gd[t][0] - cd[t][0]) < 1e-3 and gd[t][1] == cd[t][1] for t in gd)


@pytest.mark.parametrize("eager,async_sched", [(False, True), (False, False), (True, True)],
                         ids=["graphs-async", "graphs-sync", "eager-async"])
def test_gpu_structured_outputs_equal_cpu(tiny_model_dir, eager, async_sched):
    """The Triton bitmask kernel, the pinned mask copy, CUDA graphs and async scheduling give the
    CPU engine's constrained tokens (float32), and every finished reply validates."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 999},
                                               "tag": {"enum": ["a", "bb"]}},
              "required": ["n", "tag"], "additionalProperties": False}
    params = SamplingParams(temperature=0.0, max_tokens=60, n=2,
                            structured_outputs={"json": schema, "disable_any_whitespace": True})
    path = str(tiny_model_dir("llama"))
    prompts = [{"prompt_token_ids": p} for p in make_prompts(500)]
    kw = dict(dtype="float32", max_model_len=256, max_num_batched_tokens=64)
    cpu = LLM(path, device="cpu", **kw).generate(prompts, params)
    gpu = LLM(path, device="cuda", enforce_eager=eager, async_scheduling=async_sched,
              gpu_memory_utilization=0.3, **kw).generate(prompts, params)
    assert [[c.token_ids for c in o.outputs] for o in gpu] == \
        [[c.token_ids for c in o.outputs] for o in cpu]
    for o in gpu:
        for c in o.outputs:
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), schema)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_pipeline_parallel_2_matches_hf(tiny_model_dir):
    """Two pipeline stages over NCCL (hidden states sent point to point, two steps in flight,
    decode steps replaying each stage's CUDA graphs), async scheduling on, tied embeddings loaded
    by the last stage. Its own pytest run (gpu_suite's tests_pp): one NCCL engine per process."""
    path = tiny_model_dir("qwen3")
    llm = LLM(str(path), dtype="float32", device="cuda", pipeline_parallel_size=2,
              max_model_len=256, max_num_batched_tokens=64, gpu_memory_utilization=0.3)
    try:
        prompts = make_prompts(llm.engine.vocab_size)
        params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts)
        assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
        assert llm.engine.peak_steps_in_flight == 2
        assert llm.engine.runner.graph_runner is not None  # stage 0's graphs
    finally:
        llm.engine.shutdown()
