"""More pooling models against transformers on tiny random float32 models: RoBERTa and XLM-RoBERTa
encoders (positions from padding_idx + 1, the sentence-transformers pooler), decoders as embedders
(--runner pooling on a *ForCausalLM, and bare *Model checkpoints), BERT/RoBERTa/decoder sequence
classifiers; and the errors of asking a model for what it does not do."""
from __future__ import annotations

import pytest
import torch

from kubeinfer.engine.errors import ConfigError, RequestError
from kubeinfer.engine.llm import LLM
from kubeinfer.engine.pooling_params import PoolingParams
from tests.fixtures.tiny_natives import build_native_model
from tests.fixtures.tiny_pooling import (TEXTS, build_tiny_decoder, build_tiny_encoder,
                                         class_probs, decoder_last_token, encoder_embeddings)

# long enough for several 16-token cache blocks and past qwen2's sliding window of 8
LONG = "the quick brown fox jumps over the lazy dog and the cat is in the world of kubernetes"


def vectors(outs) -> torch.Tensor:
    return torch.tensor([o.embedding for o in outs])


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(kind, arch, **kw) -> a tiny model folder, built once per module. kind: "encoder"
    (arch an HF class name), "classify" or "model" (a decoder classifier or bare decoder; arch a
    tests/fixtures/tiny_models.py name), "native" (a tiny_natives.py causal LM)."""
    built = {}

    def make(kind: str, arch: str, **kw):
        key = (kind, arch, tuple(sorted(kw.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"{kind}-{arch}")
            if kind == "encoder":
                built[key] = build_tiny_encoder(out, arch, **kw)
            elif kind == "native":
                built[key] = build_native_model(arch, out)
            else:
                built[key] = build_tiny_decoder(out, arch, kind, **kw)
        return built[key]

    return make


@pytest.fixture(scope="module")
def xlmr(build):
    path = build("encoder", "XLMRobertaModel")
    return path, LLM(str(path), device="cpu")


@pytest.mark.parametrize("arch", ["RobertaModel", "XLMRobertaModel"])
def test_roberta_encoders_match_transformers(build, arch):
    path = build("encoder", arch)
    llm = LLM(str(path), device="cpu")
    assert llm.runner_type == "pooling" and llm.engine.task == "embed"
    pooler = llm.engine.pooler
    # from the sentence-transformers files
    assert (pooler.pooling_type, pooler.normalize) == ("MEAN", True)
    texts = [*TEXTS, LONG]
    torch.testing.assert_close(vectors(llm.embed(texts)), encoder_embeddings(path, texts),
                               atol=1e-5, rtol=0)


def test_roberta_context_excludes_the_reserved_positions(xlmr, build):
    path, llm = xlmr
    # 66 position embeddings, of which pad id + 1 = 2 lie below the first token
    assert llm.engine.max_model_len == 64
    ids = [0, *range(5, 67), 2]
    assert len(llm.embed([ids])[0].embedding) == 64  # 64 tokens fit
    with pytest.raises(RequestError, match="maximum context length is 64 tokens"):
        llm.embed([[*ids, 5]])
    with pytest.raises(ConfigError, match=r"maximum context length \(64.*reserved"):
        LLM(str(path), device="cpu", max_model_len=65)


def test_roberta_cls_pooling_by_override(build):
    path = build("encoder", "XLMRobertaModel")
    llm = LLM(str(path), device="cpu", pooler_config={"pooling_type": "CLS"})
    torch.testing.assert_close(vectors(llm.embed(TEXTS)), encoder_embeddings(path, TEXTS, "CLS"),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_decoder_as_embedder_is_the_normalized_last_hidden_state(tiny_model_dir, build, arch):
    # gemma2: soft-capped attention and sliding windows through the same scratch-cache path
    path = build("native", arch) if arch == "gemma2" else tiny_model_dir(arch)
    llm = LLM(str(path), device="cpu", runner="pooling")
    assert llm.runner_type == "pooling"
    assert (llm.engine.pooler.pooling_type, llm.engine.pooler.normalize) == ("LAST", True)
    tok = llm.get_tokenizer()
    ids = [tok.encode(t) for t in [*TEXTS, LONG, LONG + " " + LONG]]
    assert max(map(len, ids)) > 32
    ours = vectors(llm.embed(ids))  # one batch of mixed lengths
    torch.testing.assert_close(ours, decoder_last_token(path, ids), atol=1e-5, rtol=0)
    alone = vectors(llm.embed([ids[2]]))
    torch.testing.assert_close(alone[0], ours[2], atol=1e-6, rtol=0)


def test_bare_decoder_checkpoint_is_an_embedder_by_default(build):
    path = build("model", "qwen2")  # Qwen2Model, names without the model. prefix
    llm = LLM(str(path), device="cpu")
    assert llm.runner_type == "pooling" and llm.engine.task == "embed"
    ids = [llm.get_tokenizer().encode(t) for t in [*TEXTS, LONG]]
    torch.testing.assert_close(vectors(llm.embed(ids)), decoder_last_token(path, ids),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,arch,num_labels", [
    ("encoder", "BertForSequenceClassification", 3),
    ("encoder", "RobertaForSequenceClassification", 2),
    ("encoder", "XLMRobertaForSequenceClassification", 3),
    ("classify", "qwen2", 3),
    ("classify", "llama", 1),  # a reward model: one logit, a sigmoid
])
def test_classifiers_match_transformers(build, kind, arch, num_labels):
    path = build(kind, arch, num_labels=num_labels)
    llm = LLM(str(path), device="cpu")
    assert llm.runner_type == "pooling" and llm.engine.task == "classify"
    tok = llm.get_tokenizer()
    ids = [tok.encode(t) for t in [*TEXTS, LONG]]
    outs = llm.classify(ids)
    ours = torch.tensor([o.probs for o in outs])
    ref = class_probs(path, ids)
    assert ours.shape == (len(ids), num_labels)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert [o.label for o in outs] == [f"class_{int(i)}" for i in ref.argmax(-1)]
    # text and token ids agree
    assert torch.allclose(torch.tensor(llm.classify(TEXTS[1])[0].probs), ours[1], atol=1e-6)


def test_a_model_serves_only_its_own_task(xlmr, build):
    _, embedder = xlmr
    with pytest.raises(RequestError, match="not a classifier: use /v1/embeddings"):
        embedder.classify("hello world")
    classifier = LLM(str(build("encoder", "XLMRobertaForSequenceClassification", num_labels=3)),
                     device="cpu")
    with pytest.raises(RequestError, match="sequence classifier and has no embeddings"):
        classifier.embed("hello world")
    with pytest.raises(ValueError, match="task must be one of"):
        PoolingParams(task="rerank")
    # the engine goes on after refusing
    assert len(classifier.classify("hello world")[0].probs) == 3


def test_runner_errors_name_the_way_out(build, tiny_model_dir):
    with pytest.raises(ConfigError, match="--runner pooling"):
        LLM(str(build("encoder", "XLMRobertaModel")), device="cpu", runner="generate")
    with pytest.raises(ConfigError, match="/classify"):
        LLM(str(build("encoder", "XLMRobertaForSequenceClassification", num_labels=3)),
            device="cpu", runner="generate")
    # a decoder stays a generator unless asked
    assert LLM(str(tiny_model_dir("qwen2")), device="cpu").runner_type == "generate"


def test_a_decoder_cache_that_does_not_fit_is_a_start_up_error(tiny_model_dir, monkeypatch):
    from kubeinfer.engine.models import decoder_pooling

    def out_of_memory(self, num_blocks, device):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(decoder_pooling._DecoderEmbedder, "_ensure_cache", out_of_memory)
    with pytest.raises(ConfigError, match="does not fit.*Lower --max-model-len"):
        LLM(str(tiny_model_dir("llama")), device="cpu", runner="pooling")
