"""POST /classify and /v1/classify on a real server (a tiny XLM-RoBERTa classifier against
transformers), /v1/embeddings from a decoder served with --runner pooling, and the 400s for bad
input and for asking a model for what it does not do."""
from __future__ import annotations

import pytest
import torch

from kubeinfer.engine.config import DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from tests.fixtures.tiny_pooling import (TEXTS, build_tiny_encoder, class_probs,
                                         decoder_last_token)
from tests.server.conftest import MODEL_NAME, start_server
from tests.server.test_errors import error_of

CLF_NAME = "tiny-clf"
EMB_NAME = "tiny-qwen2-embed"


def pooling_config(path, name: str, **model_kw) -> EngineConfig:
    return EngineConfig(model=ModelConfig(model=str(path), served_model_name=(name,), **model_kw),
                        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048),
                        device=DeviceConfig(device="cpu"))


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    return build_tiny_encoder(tmp_path_factory.mktemp("xlmr-clf"),
                              "XLMRobertaForSequenceClassification", num_labels=3)


@pytest.fixture(scope="module")
def clf_server(clf_dir):
    running = start_server(ModelLifecycle(pooling_config(clf_dir, CLF_NAME), log_requests=False))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def chttp(clf_server):
    with clf_server.http() as c:
        yield c


@pytest.fixture(scope="module")
def emb_server(tiny_model_dir):
    config = pooling_config(tiny_model_dir("qwen2"), EMB_NAME, runner="pooling")
    running = start_server(ModelLifecycle(config, log_requests=False))
    yield running
    running.stop()


def classify(http, path: str = "/classify", **body):
    body.setdefault("model", CLF_NAME)
    return http.post(path, json=body)


def test_classify_matches_transformers(chttp, clf_server, clf_dir):
    r = classify(chttp, input=TEXTS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == CLF_NAME
    assert body["id"].startswith("classify-")
    tok = clf_server.engine.tokenizer
    ids = [tok.encode(t) for t in TEXTS]
    ref = class_probs(clf_dir, ids)
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    assert all(d["num_classes"] == 3 for d in body["data"])
    torch.testing.assert_close(torch.tensor([d["probs"] for d in body["data"]]), ref,
                               atol=1e-5, rtol=0)
    assert [d["label"] for d in body["data"]] == [f"class_{int(i)}" for i in ref.argmax(-1)]
    num_tokens = sum(map(len, ids))
    assert body["usage"] == {"prompt_tokens": num_tokens, "total_tokens": num_tokens,
                             "completion_tokens": 0, "prompt_tokens_details": None}


def test_v1_classify_takes_token_ids(chttp, clf_server):
    ids = clf_server.engine.tokenizer.encode(TEXTS[1])
    by_ids = classify(chttp, "/v1/classify", input=ids).json()["data"]
    by_text = classify(chttp, input=TEXTS[1]).json()["data"]
    assert len(by_ids) == 1
    assert by_ids[0]["probs"] == pytest.approx(by_text[0]["probs"], abs=1e-6)


@pytest.mark.parametrize("body,phrase", [
    ({"input": []}, "input is empty"),
    ({"input": ""}, "empty string"),
    ({"input": True}, "must be a string"),
    ({"input": [[0, 1], ["a"]]}, "must be a string"),
    ({"input": [[0, 5000, 2]]}, "out of range"),
    ({"input": [[]]}, "is empty"),
    ({"input": "hello", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"input": ["cat", "cat " * 80]}, "maximum context length is 64 tokens"),
])
def test_bad_input_is_a_clear_400(chttp, body, phrase):
    err = error_of(classify(chttp, **body), 400)
    assert phrase in err["message"], err["message"]
    assert err["type"] == "BadRequestError"
    assert "Traceback" not in err["message"]


def test_truncation_makes_a_long_input_fit(chttp):
    r = classify(chttp, input="cat " * 80, truncate_prompt_tokens=-1)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 64


def test_unknown_model_is_404(chttp):
    error_of(classify(chttp, input="hi", model="nope"), 404)


def test_embeddings_on_a_classifier_points_to_classify(chttp):
    err = error_of(chttp.post("/v1/embeddings", json={"model": CLF_NAME, "input": "hi"}), 400)
    assert "sequence classifier" in err["message"] and "/classify" in err["message"]
    assert err["param"] == "model"


def test_decoder_embedder_over_http_matches_transformers(emb_server, tiny_model_dir):
    texts = [*TEXTS, "the capital of France is Paris and the capital of Italy is Rome"]
    resp = emb_server.client().embeddings.create(model=EMB_NAME, input=texts)
    ours = torch.tensor([d.embedding for d in resp.data])
    tok = emb_server.engine.tokenizer
    ref = decoder_last_token(tiny_model_dir("qwen2"), [tok.encode(t) for t in texts])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_classify_on_an_embedder_is_refused(emb_server):
    with emb_server.http() as h:
        err = error_of(h.post("/classify", json={"model": EMB_NAME, "input": "hi"}), 400)
    assert "not a classifier" in err["message"] and "/v1/embeddings" in err["message"]


def test_classify_on_a_generative_model_is_refused(http):
    err = error_of(http.post("/classify", json={"model": MODEL_NAME, "input": "hi"}), 400)
    assert "text generation model" in err["message"] and "/v1/completions" in err["message"]
