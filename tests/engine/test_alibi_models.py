"""Native GPT-2, GPTBigCode, GPT-NeoX, Bloom, MPT and Falcon against HF transformers.

Strict consistency as in test_native_models.py: tiny random float32 models (tests/fixtures/
tiny_gpt_families.py) saved in HF layout and loaded through our loader; greedy token ids equal
HF's `generate` for prompts of several lengths in one batch, once as they come and once with
chunked prefill (so ALiBi and learned positions see chunks that start mid-sequence). Logits are
compared too. HF runs eager attention, except Falcon's ALiBi variant, whose eager path adds the
bias twice; its SDPA path (HF's default) is the reference there (see models/falcon.py).
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kubeinfer import LLM, SamplingParams
from kubeinfer.engine.config import ModelConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.alibi import bloom_alibi_slopes, mpt_alibi_slopes
from kubeinfer.engine.layers.attention import get_attention_layers
from kubeinfer.engine.loader.model import load_model
from kubeinfer.engine.models.registry import get_model_class
from tests.engine.test_native_models import NUM_OUT, VARIANTS, hf_greedy
from tests.fixtures.tiny_gpt_families import GPT_ARCHS, build_gpt_model, gpt_config

ALIBI_ARCHS = ("bloom", "mpt", "falcon_alibi")
# What a saved config.json names; a config built in memory has no `architectures` yet.
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "gpt_bigcode": "GPTBigCodeForCausalLM",
            "gpt_neox": "GPTNeoXForCausalLM", "bloom": "BloomForCausalLM",
            "mpt": "MptForCausalLM", "falcon_new": "FalconForCausalLM"}


def config_of(arch: str):
    config = gpt_config(arch)
    config.architectures = [HF_CLASS[arch]]
    return config


def make_prompts(arch: str) -> list[list[int]]:
    g = torch.Generator().manual_seed(len(arch) + 7)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 19, 40)]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """arch -> (model folder, prompts, HF greedy ids (computed on first use), HF model)."""
    out = {}
    for arch in GPT_ARCHS:
        path = build_gpt_model(arch, tmp_path_factory.mktemp(f"gpt-{arch}"))
        impl = "sdpa" if arch == "falcon_alibi" else "eager"
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                  attn_implementation=impl).eval()
        out[arch] = (path, make_prompts(arch), _LazyGreedy(hf), hf)
    return out


class _LazyGreedy:
    """HF generate's ids for the prompts, run once and only for the archs a test asks about."""

    def __init__(self, hf):
        self.hf, self.ids = hf, None

    def get(self, prompts: list[list[int]]) -> list[list[int]]:
        if self.ids is None:
            self.ids = hf_greedy(self.hf, prompts)
        return self.ids


@pytest.mark.parametrize("arch", GPT_ARCHS)
def test_logits_match_hf(cases, arch):
    path, prompts, _, hf = cases[arch]
    model, _ = load_model(ModelConfig(model=str(path), dtype="float32"), "cpu", path=path)
    ids = torch.tensor(prompts[-1])
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
        got = model.compute_logits(model(ids, torch.arange(len(ids))))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# The paged path for every family and layout that enters attention differently (ALiBi, learned
# positions, multi-query, partial rotary, grouped KV), with chunked prefill too; the other tiny
# variants differ only in weight layout and block wiring, which test_logits_match_hf covers.
GREEDY_ARCHS = ALIBI_ARCHS + ("gpt2", "gpt_bigcode", "gpt_neox", "falcon_new")
GREEDY_CASES = [(arch, variant) for arch in GREEDY_ARCHS for variant in VARIANTS]


@pytest.mark.parametrize("arch,variant", GREEDY_CASES)
def test_greedy_matches_hf(cases, arch, variant):
    path, prompts, expected, _ = cases[arch]
    expected = expected.get(prompts)
    llm = LLM(str(path), dtype="float32", block_size=16, **VARIANTS[variant])
    params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks


def test_features_are_really_on(cases):
    # The tiny configs exercise what the brief names; a refactor of the fixtures must not drop it.
    def layers(arch):
        path = cases[arch][0]
        return get_attention_layers(load_model(ModelConfig(model=str(path), dtype="float32"),
                                               "cpu", path=path)[0])

    for arch in ALIBI_ARCHS:
        assert all(a.alibi_slopes is not None for a in layers(arch)), arch
    assert all(a.alibi_slopes is None for a in layers("falcon_new"))
    assert {a.num_kv_heads for a in layers("gpt_bigcode")} == {1}
    assert {a.num_kv_heads for a in layers("falcon_mq")} == {1}
    assert {a.num_kv_heads for a in layers("falcon_new")} == {2}
    assert [a.scale for a in layers("gpt2")] == pytest.approx([0.25, 0.125])  # 1/sqrt(16)/(i+1)
    mpt = load_model(ModelConfig(model=str(cases["mpt"][0]), dtype="float32"), "cpu",
                     path=cases["mpt"][0])[0]
    assert mpt.transformer.blocks[0].attn.clip_qkv == 1.5


@pytest.mark.parametrize("num_heads", [1, 3, 4, 6, 12, 20, 40, 71])
def test_alibi_slopes_equal_hf(num_heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    assert torch.equal(bloom_alibi_slopes(num_heads), _get_alibi_slopes(num_heads, "cpu"))
    # MPT's bias at relative position -1 is minus the slope.
    for bias_max in (8, 12):
        want = -build_mpt_alibi_tensor(num_heads, 2, alibi_bias_max=bias_max)[:, 0, 0]
        assert torch.equal(mpt_alibi_slopes(num_heads, bias_max), want)


@pytest.mark.parametrize("arch,setting,match", [
    ("mpt", {"attn_config": {"qk_ln": True}}, "qk_ln"),
    ("mpt", {"attn_config": {"alibi": False}}, "alibi false"),
    ("falcon_new", {"parallel_attn": False}, "parallel_attn"),
    ("gpt_neox", {"hidden_act": "swish"}, "swish"),
    ("gpt2", {"activation_function": "relu"}, "relu"),
])
def test_unsupported_config_is_a_config_error(arch, setting, match):
    config = config_of(arch)
    for key, value in setting.items():
        if key == "attn_config":
            for k, v in value.items():
                setattr(config.attn_config, k, v)
        else:
            setattr(config, key, value)
    with pytest.raises(ConfigError, match=match):
        get_model_class(config)(config)


@pytest.mark.parametrize("arch,name", [
    ("bloom", "transformer.h.0.self_attention.query_key_value.weight"),
    ("falcon_new", "transformer.h.0.self_attention.query_key_value.weight"),
    ("gpt_bigcode", "transformer.h.0.attn.c_attn.weight"),
    ("mpt", "transformer.blocks.0.attn.Wqkv.weight"),
])
def test_fused_qkv_of_wrong_size_is_refused(arch, name):
    config = config_of(arch)
    model = get_model_class(config)(config)
    bad = torch.zeros(5, config.hidden_size)
    with pytest.raises(ValueError, match="rows"):
        model.load_weights([(name, bad)])


@pytest.mark.parametrize("arch", ["bloom"])
def test_tensor_parallel_2_matches_hf(cases, arch):
    # gloo on CPU: Bloom's 6 heads split 3 + 3, each rank with its own three ALiBi slopes.
    import multiprocessing

    path, prompts, expected, _ = cases[arch]
    expected = expected.get(prompts)
    llm = LLM(str(path), dtype="float32", device="cpu", tensor_parallel_size=2,
              max_num_batched_tokens=32)
    try:
        attn = llm.engine.runner.attn_layers[0]
        assert attn.num_heads == 3
        torch.testing.assert_close(attn.alibi_slopes.cpu(), bloom_alibi_slopes(6)[:3])
        params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
    finally:
        llm.engine.shutdown()
    assert not multiprocessing.active_children()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("eager", [False, True], ids=["cuda_graphs", "eager"])
@pytest.mark.parametrize("arch", GPT_ARCHS)
def test_gpu_greedy_matches_hf(cases, arch, eager):
    # The Triton paths: ALiBi in the attention kernel (prefill, mixed and decode batches replayed
    # from CUDA graphs), multi-query and grouped KV, partial rotary.
    path, prompts, expected, _ = cases[arch]
    expected = expected.get(prompts)
    llm = LLM(str(path), dtype="float32", device="cuda", enforce_eager=eager, max_model_len=128,
              block_size=16)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
