"""Native Gemma, Gemma 2, Gemma 3 (text) and Phi-3 models against HF transformers.

Strict consistency as in test_consistency.py: tiny random float32 models (tests/fixtures/
tiny_natives.py) saved in HF layout and loaded through our loader; greedy token ids equal HF's
`generate` (eager attention, which applies Gemma 2's soft-cap) for prompts of several lengths in one
batch, once as they come and once with chunked prefill. Sliding windows (8) are smaller than every
prompt but one. Logits are compared too, since the final soft-cap never changes an argmax.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from kubeinfer import LLM, SamplingParams
from kubeinfer.engine.config import ModelConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.rotary import rope_parameters
from kubeinfer.engine.loader.model import load_model
from kubeinfer.engine.models.registry import get_model_class
from tests.fixtures.tiny_natives import (LONGROPE_ORIGINAL_MAX, NATIVE_ARCHS, build_native_model,
                                         native_config)

NUM_OUT = 8
VARIANTS = {"default": dict(), "chunked_prefill": dict(max_num_batched_tokens=7)}


def make_prompts(arch: str) -> list[list[int]]:
    # longrope: HF uses the short factors until a sequence passes the pretrained length and the
    # long ones after; the engine fixes the long ones (see phi3.py), so its prompts are all longer.
    lengths = (33, 50) if arch == "phi3_longrope" else (5, 19, 40)
    assert arch != "phi3_longrope" or min(lengths) > LONGROPE_ORIGINAL_MAX
    g = torch.Generator().manual_seed(len(arch))
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    gc = GenerationConfig(do_sample=False, max_new_tokens=NUM_OUT, min_new_tokens=NUM_OUT, pad_token_id=0)
    gc.eos_token_id = None
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               generation_config=gc)[0, len(p):].tolist() for p in prompts]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """arch -> (model folder, prompts, HF greedy ids, HF model)."""
    out = {}
    for arch in NATIVE_ARCHS:
        path = build_native_model(arch, tmp_path_factory.mktemp(f"native-{arch}"))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
        prompts = make_prompts(arch)
        out[arch] = (path, prompts, hf_greedy(hf, prompts), hf)
    return out


@pytest.mark.parametrize("arch", NATIVE_ARCHS)
def test_logits_match_hf(cases, arch):
    path, prompts, _, hf = cases[arch]
    model, _ = load_model(ModelConfig(model=str(path), dtype="float32"), "cpu", path=path)
    ids = torch.tensor(prompts[-1])
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
        got = model.compute_logits(model(ids, torch.arange(len(ids))))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if arch == "gemma2":  # the final soft-cap (3.0) bounds the logits
        assert got.abs().max() < 3.0 and want.abs().max() > 1.0


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", NATIVE_ARCHS)
def test_greedy_matches_hf(cases, arch, variant):
    path, prompts, expected, _ = cases[arch]
    llm = LLM(str(path), dtype="float32", block_size=16, **VARIANTS[variant])
    params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks


def test_features_are_really_on(cases):
    # The tiny configs exercise what the brief names; a refactor of the fixtures must not drop it.
    from kubeinfer.engine.layers.attention import get_attention_layers

    for arch in ("gemma2", "gemma3"):
        model, _ = load_model(ModelConfig(model=str(cases[arch][0]), dtype="float32"), "cpu",
                              path=cases[arch][0])
        windows = [layer.sliding_window for layer in get_attention_layers(model)]
        assert 8 in windows and None in windows, windows
        assert all(a.scale == pytest.approx(20 ** -0.5) for a in get_attention_layers(model))
    assert {a.softcap for a in get_attention_layers(model)} == {None}  # Gemma 3: no attention cap
    ropes = {id(layer.self_attn.rotary_emb) for layer in model.model.layers}
    assert len(ropes) == 2  # local and global tables


def test_unsupported_activation_is_a_config_error():
    config = native_config("gemma")
    config.hidden_act = "relu"
    with pytest.raises(ConfigError, match="relu"):
        get_model_class(config)(config)


def test_bidirectional_gemma3_is_a_config_error():
    config = native_config("gemma3")
    config.use_bidirectional_attention = True
    with pytest.raises(ConfigError, match="bidirectional"):
        get_model_class(config)(config)


def test_per_layer_rope_needs_a_layer_type():
    config = native_config("gemma3")
    with pytest.raises(ConfigError, match="per layer type"):
        rope_parameters(config)
    assert rope_parameters(config, "full_attention")["rope_type"] == "linear"


def test_phi3_fused_qkv_of_wrong_size_is_refused():
    config = native_config("phi3")
    model = get_model_class(config)(config)
    bad = torch.zeros(5, config.hidden_size)
    with pytest.raises(ValueError, match="qkv_proj"):
        model.load_weights([("model.layers.0.self_attn.qkv_proj.weight", bad)])


@pytest.mark.parametrize("arch", ["gemma3", "phi3_longrope"])
def test_tensor_parallel_2_matches_hf(cases, arch):
    # gloo on CPU: each rank holds half the heads (Gemma 3's per-head q/k norms, Phi-3's fused
    # checkpoint qkv_proj / gate_up_proj cut into per-rank q, k, v, gate and up slices).
    import multiprocessing

    path, prompts, expected, _ = cases[arch]
    llm = LLM(str(path), dtype="float32", device="cpu", tensor_parallel_size=2,
              max_num_batched_tokens=32)
    try:
        assert llm.engine.runner.attn_layers[0].num_heads == 2
        params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
    finally:
        llm.engine.shutdown()
    assert not multiprocessing.active_children()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("eager", [False, True], ids=["cuda_graphs", "eager"])
@pytest.mark.parametrize("arch", NATIVE_ARCHS)
def test_gpu_greedy_matches_hf(cases, arch, eager):
    # The Triton paths: soft-capped attention, GeGLU, head_dim 32 / 16, partial rotary, and decode
    # batches replayed from CUDA graphs.
    path, prompts, expected, _ = cases[arch]
    llm = LLM(str(path), dtype="float32", device="cuda", enforce_eager=eager, max_model_len=256,
              block_size=16)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
