"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE): greedy token ids equal HF
transformers' on tiny random float32 models loaded through our loader, batched with prompts of
several lengths, with chunked prefill, under preemption and under tensor parallelism (gloo on
CPU); configs the fused experts cannot run are refused with what to fix. On a GPU the same
models run the Triton kernels under CUDA graphs."""
from __future__ import annotations

import json
import multiprocessing
import shutil

import pytest
import torch
from transformers import AutoConfig

from kubeinfer import LLM, SamplingParams
from kubeinfer.engine.tensor_parallel_check import check_tensor_parallel
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.moe import FusedMoE
from tests.engine.test_consistency import NUM_OUT, hf_greedy, make_prompts
from tests.fixtures.tiny_models import VOCAB_SIZE
from tests.fixtures.tiny_moe_models import TINY_MOE_ARCHS, build_tiny_moe_model

PARAMS = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
VARIANTS = {
    "default": dict(),
    # chunked prefill (a 13-token budget) and preemption (8 blocks for 6 requests) together
    "chunked_preempt": dict(max_num_batched_tokens=13, max_model_len=80, num_gpu_blocks_override=8,
                            max_num_seqs=6),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    prompts = make_prompts(VOCAB_SIZE)
    out = {}
    for arch in TINY_MOE_ARCHS:
        path = build_tiny_moe_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        out[arch] = (path, prompts, hf_greedy(path, prompts))
    return out


def run_steps(llm, prompts) -> tuple[list[list[int]], int]:
    """Greedy outputs stepped by hand, and the number of preemptions seen on the way."""
    for i, p in enumerate(prompts):
        llm.engine.add_request(str(i), p, PARAMS)
    tokens = {str(i): [] for i in range(len(prompts))}
    num_preemptions = 0
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            tokens[out.request_id] += out.new_token_ids
        num_preemptions += llm.engine.scheduler._num_preemptions
    return [tokens[str(i)] for i in range(len(prompts))], num_preemptions


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", TINY_MOE_ARCHS)
def test_greedy_matches_hf(cases, arch, variant):
    path, prompts, expected = cases[arch]
    llm = LLM(str(path), dtype="float32", block_size=16, **VARIANTS[variant])
    num_moe = sum(isinstance(m, FusedMoE) for m in llm.engine.runner.model.modules())
    assert num_moe == (1 if arch == "qwen2_moe" else 2)  # qwen2_moe's layer 1 is dense
    if variant == "chunked_preempt":
        got, num_preemptions = run_steps(llm, prompts)
        assert num_preemptions > 0, "the small cache should have forced a preemption"
        assert got == expected
    else:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS)
        assert [o.outputs[0].token_ids for o in outs] == expected
    if variant == "default":  # again, over the prefix cache the first round filled
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS)
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert outs[1].num_cached_tokens >= 32
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks


def test_tensor_parallel_matches_hf(cases):
    # Routed and shared experts split over 2 ranks, summed by one all-reduce per layer.
    path, prompts, expected = cases["qwen2_moe"]
    llm = LLM(str(path), dtype="float32", tensor_parallel_size=2, max_model_len=128,
              max_num_batched_tokens=32, num_gpu_blocks_override=40)
    try:
        experts = next(m for m in llm.engine.runner.model.modules() if isinstance(m, FusedMoE))
        assert experts.intermediate_size == 48 // 2 and experts.w13_weight.shape == (8, 48, 64)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
    finally:
        llm.engine.shutdown()
    assert not multiprocessing.active_children()


def test_tp_size_must_divide_the_expert_width(cases):
    config = AutoConfig.from_pretrained(cases["qwen3_moe"][0])
    config.moe_intermediate_size = 50
    with pytest.raises(ConfigError, match=r"does not divide the model's moe_intermediate_size "
                                          r"\(50\); use one of \[1, 2\]"):
        check_tensor_parallel(config, 4, "cpu", num_gpus=0)


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes,message", [
    ({"num_experts_per_tok": 9}, r"num_experts_per_tok \(9\) in config.json must be between 1 and "
                                 r"the number of experts \(8\)"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' .* only 'silu' is"),
    ({"num_local_experts": 4}, r"loading the weights in .* failed: the checkpoint has a tensor of "
                               r"expert 4, but config.json says 4 experts \(0 to 3\)"),
], ids=["top_k", "activation", "fewer_experts_than_checkpoint"])
def test_bad_config_is_a_config_error(cases, tmp_path, changes, message):
    path = _edited_copy(cases["qwen3_moe"][0], tmp_path / "model", **changes)
    with pytest.raises(ConfigError, match=message):
        LLM(str(path), dtype="float32")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", TINY_MOE_ARCHS)
def test_gpu_greedy_matches_hf(cases, arch):
    # The Triton routing and expert GEMMs, eagerly for prefill and in CUDA graphs for decode.
    path, prompts, expected = cases[arch]
    llm = LLM(str(path), dtype="float32", device="cuda", max_model_len=256,
              max_num_batched_tokens=64, gpu_memory_utilization=0.3)
    assert llm.engine.runner.graph_runner is not None
    for _ in range(2):  # second round: prefix-cache hits
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS)
        assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
