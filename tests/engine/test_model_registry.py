"""Every architecture in the registry against HF transformers, and the backend's refusals.

Strict consistency: a tiny random model of each architecture (tests/fixtures/tiny_hf_archs.py) gives
the same greedy token ids through our engine (its registry-chosen implementation: native or the
transformers backend) as transformers' own `generate`, for prompts of several lengths in one batch,
with prefix caching and with chunked prefill. A registry entry without a tiny config fails here.
"""
from __future__ import annotations

import multiprocessing

import pytest
import torch

from kubeinfer import LLM, SamplingParams
from kubeinfer.engine.config import ModelConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.models import registry
from tests.fixtures.tiny_hf_archs import TINY_ARCH_CONFIGS, VOCAB_SIZE, build_tiny_arch, tiny_arch_config

# vision-language models are checked with images in tests/engine/multimodal/test_vlm_models.py
GENERATE_ARCHS = [a for a, impl in registry.architecture_table()
                  if impl not in ("native (pooling)", "native (vision-language)")]
NUM_OUT = 8
VARIANTS = {"default": dict(), "chunked_prefill": dict(max_num_batched_tokens=7)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core machine: a second OpenMP thread only spins (measured 20 ms vs
    # 0.08 ms for one attention matmul under load).
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def arch_case(tmp_path_factory):
    """arch -> (model folder, prompts, HF's greedy ids), built once per module."""
    cases: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cases:
            assert arch in TINY_ARCH_CONFIGS, (
                f"{arch} is in the registry but tests/fixtures/tiny_hf_archs.py has no tiny config "
                "for it; add one so the architecture is checked against transformers")
            path = build_tiny_arch(arch, tmp_path_factory.mktemp(arch))
            prompts = _prompts()
            cases[arch] = (path, prompts, _hf_greedy(path, prompts))
        return cases[arch]

    return get


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, VOCAB_SIZE, (37,), generator=g).tolist()  # a prefix over 2 blocks
    prompts = [shared + torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist() for n in (1, 14)]
    return prompts + [torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist() for n in (5, 30)]


def _hf_greedy(path, prompts) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gc = GenerationConfig(do_sample=False, max_new_tokens=NUM_OUT, min_new_tokens=NUM_OUT, pad_token_id=0)
    gc.eos_token_id = None
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               generation_config=gc)[0, len(p):].tolist() for p in prompts]


def _llm(path, **kwargs) -> LLM:
    return LLM(str(path), dtype="float32", skip_tokenizer_init=True, num_gpu_blocks_override=24,
               **kwargs)


def _generate(llm: LLM, prompts) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                         params)]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", GENERATE_ARCHS)
def test_greedy_matches_hf(arch_case, arch, variant):
    path, prompts, expected = arch_case(arch)
    llm = _llm(path, **VARIANTS[variant])
    impl = dict(registry.architecture_table())[arch]
    is_backend = type(llm.engine.runner.model).__name__ == "TransformersForCausalLM"
    assert is_backend == (impl == "transformers")
    assert _generate(llm, prompts) == expected
    # the second round reads the shared prefix from the cache that the first round filled
    assert _generate(llm, prompts) == expected


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM",
                                  *registry.backend_verified_natives()])
def test_backend_runs_native_architectures_too(arch_case, arch):
    path, prompts, expected = arch_case(arch)
    llm = _llm(path, model_impl="transformers", max_num_batched_tokens=7)
    assert type(llm.engine.runner.model).__name__ == "TransformersForCausalLM"
    assert _generate(llm, prompts) == expected


def test_dummy_weights_run_on_the_backend(arch_case):
    path, prompts, _ = arch_case("GPTJForCausalLM")
    outs = _generate(_llm(path, load_format="dummy"), prompts[:2])
    assert all(len(o) == NUM_OUT and all(0 <= t < VOCAB_SIZE for t in o) for o in outs)


def test_incomplete_checkpoint_is_a_config_error(arch_case, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    path, _, _ = arch_case("GPTJForCausalLM")
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["transformer.h.1.mlp.fc_in.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="lacks 1 weights.*fc_in"):
        _llm(broken)


@pytest.mark.parametrize("arch", sorted(registry.refused_architectures()))
def test_refused_architectures_say_why(arch):
    import transformers

    config = getattr(transformers, arch).config_class()
    config.architectures = [arch]
    with pytest.raises(ConfigError) as err:
        registry.get_model_class(config)
    assert arch in str(err.value) and registry.refused_architectures()[arch] in str(err.value)


def test_backend_refuses_unflagged_attention_and_unknown_models():
    import transformers
    from transformers import PretrainedConfig

    config = transformers.GPTNeoConfig(architectures=["GPTNeoForCausalLM"])
    with pytest.raises(ConfigError, match="GPTNeoForCausalLM.*AttentionInterface"):
        registry.get_model_class(config)
    with pytest.raises(ConfigError, match="NoSuchForCausalLM is not supported.*Supported architectures"):
        registry.get_model_class(PretrainedConfig(architectures=["NoSuchForCausalLM"]))


def test_model_impl_choices():
    gptj = tiny_arch_config("GPTJForCausalLM")
    with pytest.raises(ConfigError, match="no native implementation.*--model-impl auto or transformers"):
        registry.get_model_class(gptj, model_impl="native")
    assert registry.get_model_class(gptj).__name__ == "TransformersForCausalLM"
    llama = tiny_arch_config("LlamaForCausalLM")
    assert registry.get_model_class(llama).__name__ == "LlamaForCausalLM"
    assert registry.get_model_class(llama, model_impl="transformers").__name__ == "TransformersForCausalLM"
    with pytest.raises(ConfigError, match="--model-impl must be one of auto, native, transformers"):
        ModelConfig(model="m", model_impl="hf")


def test_tensor_parallel_is_refused_for_the_backend(monkeypatch):
    from kubeinfer.engine.models import transformers as backend

    monkeypatch.setattr(backend, "tp_size", lambda: 2)
    with pytest.raises(ConfigError, match="transformers backend.*--tensor-parallel-size 1"):
        backend.TransformersForCausalLM(tiny_arch_config("GPTJForCausalLM"))


def test_attention_sinks_are_refused_not_ignored():
    from kubeinfer.engine.layers.attention import Attention
    from kubeinfer.engine.layers.transformers_attention import kubeinfer_attention_forward

    module = torch.nn.Module()
    module.kubeinfer_attn = Attention(2, 8, 8**-0.5, 2)
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="sinks"):
        kubeinfer_attention_forward(module, q, q, q, None, s_aux=torch.zeros(2))


def test_help_and_readme_list_the_registry():
    from pathlib import Path

    from kubeinfer.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for arch, impl in registry.architecture_table():
        assert f"{arch:28s} {impl}" in text
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert registry.architectures_markdown() in readme, (
        "README's architecture table is stale: run `python -m kubeinfer.engine.models.registry`")


BACKEND_ARCHS = [a for a, impl in registry.architecture_table() if impl == "transformers"]


@pytest.mark.parametrize("arch", BACKEND_ARCHS)
def test_logits_match_hf(arch_case, arch):
    """Greedy ids cannot see a positive logit scale (Cohere's logit_scale, Granite's logits_scaling);
    the logits themselves, which sampling and logprobs use, must match too."""
    from transformers import AutoModelForCausalLM

    from kubeinfer.engine.loader.model import load_model

    path, prompts, _ = arch_case(arch)
    model, _ = load_model(ModelConfig(model=str(path), dtype="float32"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts[3])
    with torch.no_grad():
        ours = model.compute_logits(model(ids, torch.arange(len(ids))))
        theirs = hf(ids[None]).logits[0].float()
    # float32 sums in another order (DBRX differs as much between HF's own sdpa and eager); a wrong
    # scale is off by far more
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max()))


def test_tensor_parallel_refused_before_workers_start(arch_case):
    path, _, _ = arch_case("GPTJForCausalLM")
    with pytest.raises(ConfigError, match="GPTJForCausalLM runs on the transformers backend.*"
                                          "--tensor-parallel-size 1"):
        _llm(path, tensor_parallel_size=2, device="cpu")
    assert not multiprocessing.active_children()
