"""/openapi.json describes the server: real responses validate against it, errors as sent."""
from __future__ import annotations

import json

import jsonschema
import pytest

from tests.server.conftest import MODEL_NAME

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def doc(http) -> dict:
    r = http.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def response_schema(doc: dict, method: str, path: str, status: int,
                    media_type: str = "application/json") -> dict:
    return doc["paths"][path][method]["responses"][str(status)]["content"][media_type]["schema"]


def validate(doc: dict, schema: dict, instance) -> None:
    """Validate with the document's components in scope, so `#/components/...` refs resolve."""
    jsonschema.validate(instance, {**schema, "components": doc["components"]},
                        cls=jsonschema.Draft202012Validator)


def check(doc: dict, response, method: str, path: str) -> None:
    schema = response_schema(doc, method, path, response.status_code)
    validate(doc, schema, response.json())


def sse_events(response) -> list:
    lines = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_no_422_and_no_empty_schema(doc):
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
            for status, resp in op["responses"].items():
                for media in resp.get("content", {}).values():
                    assert media["schema"] != {}, (method, path, status)
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_media_types(doc):
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        ok = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}
    for name in ("ChatCompletionChunk", "CompletionChunk", "ErrorResponse"):
        assert name in doc["components"]["schemas"]


@pytest.mark.parametrize("extra", [{}, {"logprobs": True, "top_logprobs": 2, "n": 2,
                                        "return_token_ids": True, "prompt_logprobs": 1}])
def test_chat_completion(http, doc, extra):
    r = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": USER,
                                                "max_tokens": 3, **extra})
    assert r.status_code == 200
    check(doc, r, "post", "/v1/chat/completions")


def test_chat_stream_chunks(http, doc):
    r = http.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": USER, "max_tokens": 3, "stream": True, "logprobs": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "return_token_ids": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    chunk = {"$ref": "#/components/schemas/ChatCompletionChunk"}
    events = sse_events(r)
    assert len(events) >= 3
    for event in events:
        validate(doc, chunk, event)


@pytest.mark.parametrize("extra", [{}, {"echo": True, "logprobs": 2, "return_token_ids": True,
                                        "prompt": ["a b", "c"], "n": 2}])
def test_completion(http, doc, extra):
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hello",
                                           "max_tokens": 3, **extra})
    assert r.status_code == 200
    check(doc, r, "post", "/v1/completions")


def test_completion_stream_chunks(http, doc):
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hello", "max_tokens": 3,
                                           "stream": True, "logprobs": 1,
                                           "stream_options": {"include_usage": True}})
    for event in sse_events(r):
        validate(doc, {"$ref": "#/components/schemas/CompletionChunk"}, event)


def test_models_tokenize_health_version(http, doc):
    for path in ("/v1/models", f"/v1/models/{MODEL_NAME}", "/health", "/version"):
        r = http.get(path)
        assert r.status_code == 200
        schema_path = "/v1/models/{model_id}" if path.startswith("/v1/models/") else path
        check(doc, r, "get", schema_path)
    for body in ({"prompt": "hi", "return_token_strs": True}, {"messages": USER}):
        r = http.post("/tokenize", json={"model": MODEL_NAME, **body})
        check(doc, r, "post", "/tokenize")
    check(doc, http.post("/detokenize", json={"tokens": [1, 2]}), "post", "/detokenize")
    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")


def test_errors_are_documented_as_sent(http, doc):
    cases = [
        ("post", "/v1/chat/completions", {"model": MODEL_NAME, "messages": USER, "n": 0}, 400),
        ("post", "/v1/chat/completions", {"model": "nope", "messages": USER}, 404),
        ("post", "/v1/completions", {"prompt": 5}, 400),
        ("post", "/v1/embeddings", {"input": "x"}, 400),  # a generation model
        ("post", "/tokenize", {}, 400),
        ("get", "/v1/models/nope", None, 404),
    ]
    for method, path, body, status in cases:
        r = http.request(method.upper(), path, json=body)
        assert r.status_code == status, (path, r.text)
        schema_path = "/v1/models/{model_id}" if path.startswith("/v1/models/") else path
        check(doc, r, method, schema_path)
