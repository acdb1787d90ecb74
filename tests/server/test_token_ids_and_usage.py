"""vLLM's `return_token_ids` and `continuous_usage_stats`, and a server started with
--skip-tokenizer-init: token ids in and out, and a clear 400 (never a 500) for everything that
needs the tokenizer."""
from __future__ import annotations

import json

import pytest

from tests.server.conftest import MODEL_NAME

USER = [{"role": "user", "content": "Tell me a story"}]


def sse(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


def test_completions_return_token_ids_whole_and_streamed(http):
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    prompt_ids = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    assert choice["prompt_token_ids"] == prompt_ids and len(choice["token_ids"]) == 6
    chunks = sse(http, "/v1/completions", {**body, "stream": True})
    assert chunks[0]["choices"][0]["prompt_token_ids"] == prompt_ids
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == choice["token_ids"]
    plain = http.post("/v1/completions", json={**body, "return_token_ids": False}).json()
    assert "token_ids" not in plain["choices"][0]  # only when asked, as vLLM


def test_chat_returns_token_ids_whole_and_streamed(http):
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    reply = http.post("/v1/chat/completions", json=body).json()
    assert reply["prompt_token_ids"] == http.post("/tokenize", json={"messages": USER}).json()["tokens"]
    assert len(reply["choices"][0]["token_ids"]) == 5
    chunks = sse(http, "/v1/chat/completions", {**body, "stream": True})
    assert chunks[0]["prompt_token_ids"] == reply["prompt_token_ids"]
    streamed = [t for c in chunks[1:] for ch in c["choices"] for t in ch.get("token_ids", [])]
    assert streamed == reply["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def no_tokenizer(server_factory):
    with server_factory(skip_tokenizer_init=True).http() as http:
        yield http


def test_without_a_tokenizer_token_ids_go_in_and_come_out(no_tokenizer):
    body = {"model": MODEL_NAME, "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "logprobs": 1}
    r = no_tokenizer.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert len(choice["token_ids"]) == 4 and choice["text"] == ""
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    chunks = sse(no_tokenizer, "/v1/completions", {**body, "stream": True})
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == choice["token_ids"]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "some text"}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/chat/completions", {"messages": USER}, "messages"),
    ("/tokenize", {"prompt": "x"}, None),
    ("/detokenize", {"tokens": [5, 6]}, None)])
def test_without_a_tokenizer_text_is_a_clear_400(no_tokenizer, path, body, param):
    r = no_tokenizer.post(path, json={"model": MODEL_NAME, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "--skip-tokenizer-init" in err["message"] and err["param"] == param


@pytest.mark.parametrize("path,extra", [("/v1/completions", {"prompt": "Once upon a time"}),
                                        ("/v1/chat/completions", {"messages": USER})])
def test_continuous_usage_stats_count_up_on_every_chunk(http, path, extra):
    body = {"model": MODEL_NAME, "max_tokens": 6, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}, **extra}
    chunks = sse(http, path, body)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all("usage" in c for c in chunks) and counts == sorted(counts)
    assert counts[-1] == 6 and chunks[-1]["choices"] == []  # the closing usage chunk
    prompt = {c["usage"]["prompt_tokens"] for c in chunks}
    assert len(prompt) == 1 and prompt.pop() > 0
    plain = sse(http, path, {**body, "stream_options": {"include_usage": True}})
    assert all("usage" not in c for c in plain[:-1])  # only the last one, as before


@pytest.mark.parametrize("path,extra", [("/v1/completions", {"prompt": "hi"}),
                                        ("/v1/chat/completions", {"messages": USER})])
def test_unknown_fields_are_named_in_the_log(http, caplog, path, extra):
    with caplog.at_level("WARNING", logger="kubeinfer.server"):
        r = http.post(path, json={"model": MODEL_NAME, "max_tokens": 2, "frobnicate": 1,
                                  "best_guess": True, **extra})
    assert r.status_code == 200
    assert "present in the request but ignored: ['best_guess', 'frobnicate']" in caplog.text
