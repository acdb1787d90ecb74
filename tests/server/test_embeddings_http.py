"""POST /v1/embeddings on a real server: all-MiniLM-L6-v2 against transformers, the openai client,
base64, batching of concurrent requests, errors, auth, metrics, and the runner mismatch errors."""
from __future__ import annotations

import asyncio
import base64

import numpy as np
import openai
import pytest
import torch

from kubeinfer.engine.config import (DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig)
from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from tests.fixtures.tiny_bert import SENTENCES, reference
from tests.server.conftest import API_KEY, MODEL_NAME, start_server
from tests.server.test_errors import error_of
from tests.server.test_openapi import response_schema, validate

EMBED_NAME = "minilm"


def minilm_config(path, **model_kw) -> EngineConfig:
    return EngineConfig(model=ModelConfig(model=str(path), served_model_name=(EMBED_NAME,),
                                          **model_kw),
                        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048),
                        device=DeviceConfig(device="cpu"))


@pytest.fixture(scope="module")
def embed_server(minilm_dir):
    running = start_server(ModelLifecycle(minilm_config(minilm_dir), log_requests=False))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def ehttp(embed_server):
    with embed_server.http() as c:
        yield c


@pytest.fixture(scope="module")
def ref(minilm_dir) -> torch.Tensor:
    return reference(minilm_dir, SENTENCES)


def post(http, **body):
    body.setdefault("model", EMBED_NAME)
    return http.post("/v1/embeddings", json=body)


def test_openai_client_matches_transformers(embed_server, ref):
    client = embed_server.client()
    resp = client.embeddings.create(model=EMBED_NAME, input=SENTENCES)  # base64 on the wire
    assert resp.object == "list" and resp.model == EMBED_NAME
    assert [d.index for d in resp.data] == list(range(len(SENTENCES)))
    ours = torch.tensor([d.embedding for d in resp.data])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    tok_counts = [len(embed_server.engine.tokenizer.encode(s)) for s in SENTENCES]
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(tok_counts)


def test_float_response_shape_and_values(ehttp, ref):
    r = post(ehttp, input=SENTENCES[1])
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"object", "data", "model", "usage"} and body["object"] == "list"
    (item,) = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 384
    torch.testing.assert_close(torch.tensor(item["embedding"]), ref[1], atol=1e-5, rtol=0)


def test_base64_decodes_to_the_same_floats(ehttp):
    floats = post(ehttp, input=SENTENCES[:2]).json()["data"]
    b64 = post(ehttp, input=SENTENCES[:2], encoding_format="base64").json()["data"]
    for f, b in zip(floats, b64):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.tolist() == np.asarray(f["embedding"], dtype=np.float32).tolist()


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_responses_match_the_openapi_document(ehttp, encoding_format):
    doc = ehttp.get("/openapi.json").json()
    r = post(ehttp, input=SENTENCES[:2], encoding_format=encoding_format)
    validate(doc, response_schema(doc, "post", "/v1/embeddings", 200), r.json())
    r = post(ehttp, input="")
    validate(doc, response_schema(doc, "post", "/v1/embeddings", r.status_code), r.json())


def test_token_ids_equal_strings(embed_server, ehttp):
    ids = [embed_server.engine.tokenizer.encode(s) for s in SENTENCES]
    by_text = [d["embedding"] for d in post(ehttp, input=SENTENCES).json()["data"]]
    by_ids = [d["embedding"] for d in post(ehttp, input=ids).json()["data"]]
    torch.testing.assert_close(torch.tensor(by_ids), torch.tensor(by_text), atol=1e-6, rtol=0)
    one = post(ehttp, input=ids[0]).json()  # a single list of token ids is one input
    assert len(one["data"]) == 1 and one["usage"]["prompt_tokens"] == len(ids[0])
    torch.testing.assert_close(torch.tensor(one["data"][0]["embedding"]),
                               torch.tensor(by_text[0]), atol=1e-6, rtol=0)


def test_concurrent_requests_are_batched_and_correct(embed_server, ref):
    async def run():
        client = embed_server.async_client()
        return await asyncio.gather(*[
            client.embeddings.create(model=EMBED_NAME, input=SENTENCES[i % len(SENTENCES)])
            for i in range(24)])

    for i, resp in enumerate(asyncio.run(run())):
        torch.testing.assert_close(torch.tensor(resp.data[0].embedding), ref[i % len(SENTENCES)],
                                   atol=1e-5, rtol=0)


def test_dimensions_equal_to_the_model_size_and_user_are_accepted(ehttp):
    r = post(ehttp, input="hi", dimensions=384, user="someone")
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384


def test_truncate_prompt_tokens(ehttp, minilm_dir):
    long_text = "the quick brown fox " * 100
    r = post(ehttp, input=long_text, truncate_prompt_tokens=-1)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 256
    expected = reference(minilm_dir, [long_text], truncation=True, max_length=256)[0]
    torch.testing.assert_close(torch.tensor(r.json()["data"][0]["embedding"]), expected,
                               atol=1e-5, rtol=0)


def test_models_lists_the_embedding_model(ehttp):
    (model,) = ehttp.get("/v1/models").json()["data"]
    assert model["id"] == EMBED_NAME and model["max_model_len"] == 256


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("body,phrase", [
    ({"input": ""}, "input is an empty string"),
    ({"input": []}, "input is empty"),
    ({"input": [""]}, "input is an empty string"),
    ({"input": ["ok", ""]}, "input[1] is an empty string"),
    ({"input": [[]]}, "input is empty"),
    ({"input": [[101, 102], []]}, "input[1] is empty"),
    ({"input": 5}, "input: must be a string, a list of strings"),
    ({"input": [1.5, 2]}, "input: must be a string, a list of strings"),
    ({"input": [True, 5]}, "input: must be a string, a list of strings"),
    ({"input": ["a", 1]}, "input: must be a string, a list of strings"),
    ({"input": {"text": "a"}}, "input: must be a string, a list of strings"),
    ({"input": None}, "input: must be a string, a list of strings"),
    ({"input": [[101, 102], "a"]}, "must be a string, a list of strings"),
    ({}, "input: Field required"),
    ({"input": [101, 30522, 102]}, "token id 30522 in input is out of range"),
    ({"input": [[101, 102], [-1]]}, "token id -1 in input[1] is out of range"),
    ({"input": "hi", "encoding_format": "binary"}, "encoding_format"),
    ({"input": "hi", "dimensions": 128}, "dimensions=128 is not supported"),
    ({"input": "hi", "dimensions": 0}, "Leave `dimensions` out or set it to 384"),
    ({"input": "hi", "dimensions": "384"}, "dimensions: Input should be a valid integer"),
    ({"input": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be -1"),
    ({"input": "hi", "truncate_prompt_tokens": 1000}, "greater than the model's maximum"),
])
def test_bad_input_is_a_clear_400(ehttp, body, phrase):
    err = error_of(post(ehttp, **body), 400)
    assert phrase in err["message"], err["message"]
    assert err["type"] == "BadRequestError"
    assert "Traceback" not in err["message"]


def test_too_long_input_says_the_limit_and_how_to_truncate(ehttp):
    err = error_of(post(ehttp, input=["short", "word " * 300]), 400)
    assert "maximum context length is 256 tokens" in err["message"]
    assert "input[1] has 302 tokens" in err["message"]
    assert "truncate_prompt_tokens" in err["message"]
    assert err["param"] == "input"


def test_unknown_model_is_404(ehttp):
    error_of(post(ehttp, input="hi", model="nope"), 404)


def test_openai_client_error(embed_server):
    with pytest.raises(openai.BadRequestError) as e:
        embed_server.client().embeddings.create(model=EMBED_NAME, input="hi", dimensions=64)
    assert "matryoshka" in e.value.message


def test_completions_and_chat_on_an_embedding_model_point_to_embeddings(ehttp):
    err = error_of(ehttp.post("/v1/completions", json={"model": EMBED_NAME, "prompt": "hi"}), 400)
    assert "is an embedding model" in err["message"] and "/v1/embeddings" in err["message"]
    err = error_of(ehttp.post("/v1/chat/completions", json={
        "model": EMBED_NAME, "messages": [{"role": "user", "content": "hi"}]}), 400)
    assert "is an embedding model" in err["message"] and "/v1/embeddings" in err["message"]


def test_embeddings_on_a_generative_model_is_refused(http):
    err = error_of(http.post("/v1/embeddings", json={"model": MODEL_NAME, "input": "hi"}), 400)
    assert "text generation model" in err["message"]
    assert "/v1/completions" in err["message"]


def test_metrics_count_embedding_requests_and_tokens(embed_server, ehttp):
    def sample(name: str) -> float:
        for line in ehttp.get("/metrics").text.splitlines():
            if line.startswith(name + "{") and f'model_name="{EMBED_NAME}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    tokens = sample("vllm:prompt_tokens_total")
    done = sample("vllm:request_success_total")
    r = post(ehttp, input=["hello world", "a b c"])
    assert r.status_code == 200
    assert sample("vllm:prompt_tokens_total") - tokens == r.json()["usage"]["prompt_tokens"]
    assert sample("vllm:request_success_total") - done == 2


def test_api_key_applies_to_embeddings(minilm_dir):
    running = start_server(ModelLifecycle(minilm_config(minilm_dir), api_key=API_KEY,
                                       log_requests=False))
    try:
        with running.http() as h:
            assert post(h, input="hi").status_code == 401
            ok = h.post("/v1/embeddings", json={"model": EMBED_NAME, "input": "hi"},
                        headers={"Authorization": f"Bearer {API_KEY}"})
            assert ok.status_code == 200
        vec = running.client(api_key=API_KEY).embeddings.create(model=EMBED_NAME, input="hi")
        assert len(vec.data[0].embedding) == 384
    finally:
        running.stop()
