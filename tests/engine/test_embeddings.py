"""The pooling runner against transformers: the native BERT encoder, poolers, batching,
truncation and runner selection."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from kubeinfer.engine.config import EngineConfig, ModelConfig, SchedulerConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.embedding_engine import EmbeddingEngine
from kubeinfer.engine.llm import LLM
from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.models.registry import resolve_runner
from kubeinfer.engine.pooling import PoolerConfig, load_pooler_config
from kubeinfer.engine.pooling_params import PoolingParams
from tests.fixtures.tiny_bert import SENTENCES, reference

def vectors(outs) -> torch.Tensor:
    return torch.tensor([o.embedding for o in outs])


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return LLM(str(minilm_dir), device="cpu")


def test_minilm_matches_transformers(minilm, minilm_dir):
    assert minilm.runner_type == "pooling"
    ours = vectors(minilm.embed(SENTENCES))
    ref = reference(minilm_dir, SENTENCES)
    assert ours.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)


def test_minilm_token_ids_equal_text(minilm):
    tok = minilm.get_tokenizer()
    ids = [tok.encode(s) for s in SENTENCES]
    torch.testing.assert_close(vectors(minilm.embed(ids)), vectors(minilm.embed(SENTENCES)),
                               atol=1e-6, rtol=0)


def test_minilm_reads_the_sentence_transformers_config(minilm_dir):
    config = load_pooler_config(minilm_dir)
    assert (config.pooling_type, config.normalize) == ("MEAN", True)


def test_max_model_len_is_the_sentence_transformers_max_seq_length(minilm, minilm_dir):
    # as vLLM: sentence_bert_config.json's max_seq_length (256) caps the 512 positions ...
    assert minilm.engine.max_model_len == 256
    # ... unless --max-model-len asks for more, up to the position table
    assert LLM(str(minilm_dir), device="cpu", max_model_len=512).engine.max_model_len == 512
    with pytest.raises(ConfigError, match="--max-model-len"):
        LLM(str(minilm_dir), device="cpu", max_model_len=513)


def test_too_long_input_names_the_limit_and_truncation(minilm):
    long_text = "word " * 300
    with pytest.raises(RequestError) as e:
        minilm.embed(long_text)
    assert "maximum context length is 256 tokens" in str(e.value)
    assert "302 tokens" in str(e.value) and "truncate_prompt_tokens" in str(e.value)


def test_truncate_prompt_tokens(minilm, minilm_dir):
    long_text = "the quick brown fox " * 100
    ours = vectors(minilm.embed(long_text, truncate_prompt_tokens=-1))
    ref = reference(minilm_dir, [long_text], truncation=True, max_length=256)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    short = vectors(minilm.embed(long_text, truncate_prompt_tokens=10))
    torch.testing.assert_close(short, reference(minilm_dir, [long_text], truncation=True,
                                                max_length=10), atol=1e-5, rtol=0)
    # token ids keep the last k, as vLLM
    ids = list(range(1000, 1300))
    torch.testing.assert_close(vectors(minilm.embed([ids], truncate_prompt_tokens=5)),
                               vectors(minilm.embed([ids[-5:]])), atol=1e-6, rtol=0)
    for bad in (0, -2, 257):
        with pytest.raises(RequestError, match="truncate_prompt_tokens"):
            minilm.embed("hi", truncate_prompt_tokens=bad)


def test_bad_inputs_are_request_errors(minilm):
    with pytest.raises(RequestError, match="empty string"):
        minilm.embed("")
    with pytest.raises(RequestError, match="empty"):
        minilm.embed([[]])
    with pytest.raises(RequestError, match="out of range: the vocabulary has 30522"):
        minilm.embed([[101, 30522, 102]])
    with pytest.raises(RequestError, match="matryoshka"):
        minilm.embed("hi", PoolingParams(dimensions=128))
    assert len(minilm.embed("hi", PoolingParams(dimensions=384))[0].embedding) == 384


def test_generate_on_an_embedding_model_is_refused(minilm):
    with pytest.raises(ValueError, match="embedding model"):
        minilm.generate("hi")


@pytest.mark.parametrize("pooling,normalize", [(None, None), ("MEAN", False), ("LAST", True),
                                               ("CLS", False)])
def test_tiny_bert_matches_transformers(tiny_bert_dir, pooling, normalize):
    # without sentence-transformers files the pooler is vLLM's encoder default: CLS, normalized
    overrides = {k: v for k, v in (("pooling_type", pooling), ("normalize", normalize))
                 if v is not None}
    llm = LLM(str(tiny_bert_dir), device="cpu", pooler_config=overrides)
    texts = ["hello world", "the quick brown fox jumps over the lazy dog", "cat"]
    ref = reference(tiny_bert_dir, texts, pooling or "CLS", True if normalize is None else normalize)
    torch.testing.assert_close(vectors(llm.embed(texts)), ref, atol=1e-5, rtol=0)


def test_checkpoint_with_bert_prefix_and_heads_loads(tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "prefixed"
    shutil.copytree(tiny_bert_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    prefixed = {f"bert.{k}": v for k, v in state.items()}
    prefixed["cls.predictions.bias"] = torch.zeros(8)  # a task head an embedding model skips
    save_file(prefixed, str(folder / "model.safetensors"))
    texts = ["hello world", "fox"]
    a = vectors(LLM(str(tiny_bert_dir), device="cpu").embed(texts))
    b = vectors(LLM(str(folder), device="cpu").embed(texts))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_batches_respect_the_step_limits(tiny_bert_dir):
    config = EngineConfig(model=ModelConfig(model=str(tiny_bert_dir)),
                          scheduler=SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=20))
    engine = EmbeddingEngine(config)
    lengths = [4, 4, 4, 4, 9, 2, 30]
    for i, n in enumerate(lengths):
        engine.add_request(str(i), list(range(5, 5 + n)))
    batches = []
    while engine.has_unfinished_requests():
        batches.append([o.request_id for o in engine.step()])
    # 3 rows at most; rows x longest row <= 20 tokens, except a lone row that is longer
    assert batches == [["0", "1", "2"], ["3", "4"], ["5"], ["6"]]
    one = engine.embed([list(range(5, 5 + n)) for n in lengths])
    engine.add_request("x", list(range(5, 9)))
    assert torch.allclose(one[0], torch.tensor(engine.step()[0].embedding), atol=1e-6)


def test_abort_removes_a_waiting_request(tiny_bert_dir):
    engine = EmbeddingEngine(EngineConfig(model=ModelConfig(model=str(tiny_bert_dir))))
    engine.add_request("a", [5, 6])
    engine.add_request("b", [7])
    engine.abort_request("a")
    assert [o.request_id for o in engine.step()] == ["b"]
    assert not engine.has_unfinished_requests()


def test_runner_selection(tiny_bert_dir, tiny_model_dir):
    from transformers import AutoConfig

    bert = AutoConfig.from_pretrained(str(tiny_bert_dir))
    llama = AutoConfig.from_pretrained(str(tiny_model_dir("llama")))
    assert resolve_runner("auto", bert) == "pooling"
    assert resolve_runner("auto", llama) == "generate"
    with pytest.raises(ConfigError, match="--runner pooling"):
        resolve_runner("generate", bert)
    # a decoder under --runner pooling is an embedder (tests/engine/test_pooling_models.py)
    assert resolve_runner("pooling", llama) == "pooling"
    llama.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ConfigError, match="--runner pooling supports"):
        resolve_runner("pooling", llama)
    with pytest.raises(ConfigError, match="--runner must be one of"):
        ModelConfig(model="x", runner="embed")
    with pytest.raises(ConfigError, match="cannot generate text"):
        LLM(str(tiny_bert_dir), device="cpu", runner="generate")


def test_pooler_config_validation(tmp_path, tiny_bert_dir):
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelConfig(model="x", pooler_config=(("pooling", "MEAN"),))
    with pytest.raises(ConfigError, match="MEAN, CLS, LAST"):
        ModelConfig(model="x", pooler_config=(("pooling_type", "MAX"),))
    folder = tmp_path / "st"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert load_pooler_config(folder) == PoolerConfig("CLS", normalize=False,
                                                      source="sentence-transformers config")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ConfigError, match="exactly one of mean, cls and lasttoken"):
        load_pooler_config(folder)
    chosen = load_pooler_config(folder, {"pooling_type": "mean"})
    assert (chosen.pooling_type, chosen.normalize) == ("MEAN", False)
