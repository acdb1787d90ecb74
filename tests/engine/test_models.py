"""Native models against HF transformers: same logits through the paged KV cache, per architecture."""
from __future__ import annotations

import pytest
import torch

from kubeinfer.engine.config import ModelConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.rotary import get_rope
from kubeinfer.engine.loader.model import load_model
from kubeinfer.engine.models.registry import get_model_class, supported_architectures
from tests.fixtures.paged_runner import PagedRunner
from tests.fixtures.tiny_models import TINY_ARCHS, VOCAB_SIZE

ATOL = 1e-4


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


@pytest.fixture(scope="module")
def hf_models(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return {arch: AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32).eval()
            for arch in TINY_ARCHS}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_prefill_then_decode_match_hf(arch, tiny_model_dir, hf_models):
    model, _ = load_model(ModelConfig(model=str(tiny_model_dir(arch))), "cpu")
    gen = torch.Generator().manual_seed(1)
    # 13 tokens cross a block boundary and exceed the sliding window (8) of mistral and qwen2.
    prompts = [torch.randint(VOCAB_SIZE, (n,), generator=gen).tolist() for n in (13, 7)]
    runner = PagedRunner(model, num_reqs=2)
    out = runner.step({0: prompts[0], 1: prompts[1]})
    assert out[0].dtype == torch.float32 and out[0].shape == (13, VOCAB_SIZE)
    for r, prompt in enumerate(prompts):
        torch.testing.assert_close(out[r], hf_logits(hf_models[arch], prompt), atol=ATOL, rtol=0)
    # One decode token per request reads everything before it from the cache.
    nxt = [int(out[r][-1].argmax()) for r in range(2)]
    out = runner.step({0: [nxt[0]], 1: [nxt[1]]})
    for r, prompt in enumerate(prompts):
        torch.testing.assert_close(out[r][-1], hf_logits(hf_models[arch], prompt + [nxt[r]])[-1],
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_chunked_prefill_matches_hf(arch, tiny_model_dir, hf_models):
    """A prompt in two chunks, batched with another request's decode-free prefill."""
    model, _ = load_model(ModelConfig(model=str(tiny_model_dir(arch))), "cpu")
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(VOCAB_SIZE, (21,), generator=gen).tolist()
    other = torch.randint(VOCAB_SIZE, (3,), generator=gen).tolist()
    runner = PagedRunner(model, num_reqs=2)
    runner.step({0: prompt[:9]})
    out = runner.step({1: other, 0: prompt[9:]})
    torch.testing.assert_close(out[0], hf_logits(hf_models[arch], prompt)[9:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], hf_logits(hf_models[arch], other), atol=ATOL, rtol=0)


def test_forward_without_context_matches_hf(tiny_model_dir, hf_models):
    """No forward context (a profiling run): the tokens are one causal sequence, no cache needed."""
    model, _ = load_model(ModelConfig(model=str(tiny_model_dir("mistral"))), "cpu")
    prompt = torch.randint(VOCAB_SIZE, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        logits = model.compute_logits(model(torch.tensor(prompt), torch.arange(len(prompt))))
    torch.testing.assert_close(logits, hf_logits(hf_models["mistral"], prompt), atol=ATOL, rtol=0)


def test_params_are_fused_and_tied(tiny_model_dir):
    model, _ = load_model(ModelConfig(model=str(tiny_model_dir("qwen3"))), "cpu")
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert "model.layers.0.self_attn.q_norm.weight" in names
    assert model.lm_head.weight is model.model.embed_tokens.weight
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    assert qkv.shape == ((4 + 2 * 2) * 32, 64)  # explicit head_dim 32, not hidden/heads = 16
    qwen2, _ = load_model(ModelConfig(model=str(tiny_model_dir("qwen2"))), "cpu")
    windows = [layer.attn.sliding_window for layer in (l.self_attn for l in qwen2.model.layers)]
    assert windows == [None, 8]  # max_window_layers=1: only layer 1 slides
    assert qwen2.model.layers[0].self_attn.qkv_proj.bias is not None


ROPE_CASES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("rope_type", sorted(ROPE_CASES))
def test_rotary_table_matches_hf(rope_type):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                      intermediate_size=64, vocab_size=32, max_position_embeddings=256,
                      rope_parameters={"rope_theta": 10000.0, **ROPE_CASES[rope_type]})
    rope = get_rope(cfg, 16, max_position=256)
    positions = torch.arange(256)
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), positions[None])
    ours_cos, ours_sin = rope.cos_sin_cache.chunk(2, dim=-1)
    torch.testing.assert_close(ours_cos, cos[0, :, :8], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_sin, sin[0, :, :8], atol=1e-6, rtol=0)


def test_unsupported_rope_type_is_a_clear_error():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64,
                      vocab_size=32, rope_parameters={"rope_theta": 1e4, "rope_type": "longrope",
                                                      "short_factor": [1.0] * 8, "long_factor": [1.0] * 8})
    with pytest.raises(ConfigError, match="RoPE type 'longrope'.*supports default"):
        get_rope(cfg, 16)


def test_unknown_architecture_lists_supported():
    from transformers import PretrainedConfig

    with pytest.raises(ConfigError) as err:
        get_model_class(PretrainedConfig(architectures=["NoSuchForCausalLM"]))
    msg = str(err.value)
    assert "NoSuchForCausalLM" in msg and "not supported" in msg
    assert all(a in msg for a in supported_architectures())


def test_model_type_fallback_when_architectures_missing():
    from transformers import Qwen3Config

    assert get_model_class(Qwen3Config()).__name__ == "Qwen3ForCausalLM"


def test_step_without_bound_cache_is_a_clear_error(tiny_model_dir):
    from kubeinfer.engine.forward_context import AttentionMetadata, set_forward_context

    model, _ = load_model(ModelConfig(model=str(tiny_model_dir("llama"))), "cpu")
    meta = AttentionMetadata(slot_mapping=torch.arange(3), query_start_loc=torch.tensor([0, 3]),
                             seq_lens=torch.tensor([3]), block_tables=torch.zeros(1, 1, dtype=torch.int32),
                             max_query_len=3, max_seq_len=3)
    with set_forward_context(meta), pytest.raises(RuntimeError, match="bind_kv_cache"):
        model(torch.tensor([1, 2, 3]), torch.arange(3))


@pytest.mark.parametrize("tp", [2, 4])  # 4 > 2 KV heads: each KV head is replicated on two ranks
def test_weight_loaders_shard_for_tensor_parallel(tp, monkeypatch):
    """Each rank's slice, computed with its shard only, equals the matching part of the full layer."""
    import torch.nn.functional as F

    from kubeinfer.engine.layers import embedding, linear

    hidden, head, heads, kv_heads, inter, vocab = 16, 4, 4, 2, 12, 10
    gen = torch.Generator().manual_seed(0)
    w = {n: torch.randn(*s, generator=gen) for n, s in {
        "q": (heads * head, hidden), "k": (kv_heads * head, hidden), "v": (kv_heads * head, hidden),
        "qb": (heads * head,), "kb": (kv_heads * head,), "vb": (kv_heads * head,),
        "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter), "down_b": (hidden,),
        "emb": (vocab, hidden)}.items()}
    x = torch.randn(3, hidden, generator=gen)
    h = torch.randn(3, inter, generator=gen)
    down_sum = torch.zeros(3, hidden)
    emb_rows = []
    for rank in range(tp):
        for mod in (linear, embedding):
            monkeypatch.setattr(mod, "tp_size", lambda: tp)
            monkeypatch.setattr(mod, "tp_rank", lambda rank=rank: rank)
        qkv = linear.QKVParallelLinear(hidden, head, heads, kv_heads, bias=True)
        for sid in "qkv":
            qkv.weight.weight_loader(qkv.weight, w[sid], sid)
            qkv.bias.weight_loader(qkv.bias, w[sid + "b"], sid)
        q, k, v = F.linear(x, qkv.weight, qkv.bias).split(
            [qkv.num_heads * head, qkv.num_kv_heads * head, qkv.num_kv_heads * head], dim=-1)
        nq, kv_index = heads // tp, rank * kv_heads // tp  # one KV head per rank for tp 2 and 4
        full_q = F.linear(x, w["q"], w["qb"]).view(3, heads, head)
        torch.testing.assert_close(q.view(3, -1, head), full_q[:, rank * nq:(rank + 1) * nq])
        for part, name in ((k, "k"), (v, "v")):
            full = F.linear(x, w[name], w[name + "b"]).view(3, kv_heads, head)
            torch.testing.assert_close(part.view(3, -1, head), full[:, kv_index:kv_index + 1])
        gate_up = linear.MergedColumnParallelLinear(hidden, [inter, inter])
        gate_up.weight.weight_loader(gate_up.weight, w["gate"], 0)
        gate_up.weight.weight_loader(gate_up.weight, w["up"], 1)
        n = inter // tp
        gate, up = F.linear(x, gate_up.weight).split(n, dim=-1)
        torch.testing.assert_close(gate, F.linear(x, w["gate"])[:, rank * n:(rank + 1) * n])
        torch.testing.assert_close(up, F.linear(x, w["up"])[:, rank * n:(rank + 1) * n])
        down = linear.RowParallelLinear(inter, hidden, bias=True)
        down.weight.weight_loader(down.weight, w["down"])
        down.bias.weight_loader(down.bias, w["down_b"])
        down_sum += F.linear(h[:, rank * n:(rank + 1) * n], down.weight)  # what all-reduce sums
        emb = embedding.VocabParallelEmbedding(vocab, hidden)
        emb.weight.weight_loader(emb.weight, w["emb"])
        emb_rows.append(emb.weight.detach().clone())
    torch.testing.assert_close(down_sum + down.bias, F.linear(h, w["down"], w["down_b"]))
    padded = torch.cat(emb_rows)
    torch.testing.assert_close(padded[:vocab], w["emb"])
    assert not padded[vocab:].any()
