"""POST /v1/chat/completions through the official openai client."""
from __future__ import annotations

import time

import pytest

from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Count from one to ten."}]
LONG = {"ignore_eos": True}  # random weights may sample EOS at any step; these tests want lengths


def chat(client, **kw):
    kw.setdefault("model", MODEL_NAME)
    kw.setdefault("messages", MESSAGES)
    return client.chat.completions.create(**kw)


def test_response_shape_and_usage(client, http):
    before = int(time.time())
    r = chat(client, max_tokens=8, temperature=0, extra_body=LONG)
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == MODEL_NAME
    assert before - 1 <= r.created <= time.time() + 1
    [choice] = r.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    num_prompt = http.post("/tokenize", json={"model": MODEL_NAME, "messages": MESSAGES}).json()["count"]
    assert r.usage.prompt_tokens == num_prompt
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == num_prompt + 8
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_stream_matches_non_stream_and_ends_with_usage(client, http):
    whole = chat(client, max_tokens=12, temperature=0, extra_body=LONG)
    chunks = list(chat(client, max_tokens=12, temperature=0, stream=True,
                       stream_options={"include_usage": True}, extra_body=LONG))
    first, *middle, last = chunks
    assert first.choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == first.id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert last.choices == []
    assert last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # the raw stream ends with the [DONE] sentinel
    with http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_n_samples_in_one_request(client):
    r = chat(client, max_tokens=6, n=3, temperature=1.0, seed=7, extra_body=LONG)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 18


def test_n_samples_streamed(client):
    chunks = list(chat(client, max_tokens=5, n=2, temperature=1.0, seed=3, stream=True,
                       stream_options={"include_usage": True}, extra_body=LONG))
    texts, finished = {0: "", 1: ""}, {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished[ch.index] = ch.finish_reason
    assert finished == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_string_ends_the_text(client):
    base = chat(client, max_tokens=24, temperature=0, extra_body=LONG).choices[0].message.content
    # a stop string from the middle of what greedy decoding produces anyway
    # (none of the byte-fallback "\ufffd" that random weights produce, which the detokenizer holds)
    stop = next(base[i:i + 3] for i in range(4, len(base) - 3)
                if base[i:i + 3].strip() and "\ufffd" not in base[i:i + 3])
    r = chat(client, max_tokens=24, temperature=0, stop=[stop], extra_body=LONG)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == base[:base.index(stop)]
    kept = chat(client, max_tokens=24, temperature=0, stop=[stop],
                extra_body={**LONG, "include_stop_str_in_output": True})
    assert kept.choices[0].message.content == base[:base.index(stop) + len(stop)]


def test_logprobs_chat_format(client):
    r = chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, extra_body=LONG)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # greedy: the sampled token is the most likely one
        assert entry.logprob == pytest.approx(tops[0], abs=1e-4)
    assert "".join(e.token for e in content) == r.choices[0].message.content
    plain = chat(client, max_tokens=2, extra_body=LONG)
    assert plain.choices[0].logprobs is None


def test_logprobs_streamed(client):
    chunks = list(chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=1,
                       stream=True, extra_body=LONG))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content]
    assert len(entries) == 4
    assert all(len(e.top_logprobs) == 1 for e in entries)


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        return chat(client, max_tokens=16, temperature=1.0, seed=seed,
                    extra_body=LONG).choices[0].message.content

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_content_parts_equal_joined_text(client):
    parts = [{"type": "text", "text": "Count from one"}, {"type": "text", "text": "to ten."}]
    a = chat(client, max_tokens=1, messages=[{"role": "user", "content": parts}])
    b = chat(client, max_tokens=1, messages=[{"role": "user", "content": "Count from one\nto ten."}])
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_max_completion_tokens(client):
    r = chat(client, max_completion_tokens=3, extra_body=LONG)
    assert r.usage.completion_tokens == 3


def test_default_max_tokens_is_rest_of_context(client):
    long_prompt = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 12}]
    r = chat(client, messages=long_prompt, extra_body=LONG)
    assert r.usage.prompt_tokens > MAX_MODEL_LEN // 3  # keeps the generation short
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == MAX_MODEL_LEN


def test_multi_turn_with_assistant_and_tool_roles(client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "tool", "content": "42", "tool_call_id": "call_1"},
                {"role": "user", "content": "And 3+3?"}]
    r = chat(client, messages=messages, max_tokens=2, extra_body=LONG)
    assert r.usage.completion_tokens == 2


def test_repeated_prompt_reports_cached_tokens(client):
    messages = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 4}]
    first = chat(client, messages=messages, max_tokens=1)
    second = chat(client, messages=messages, max_tokens=1)
    assert first.usage.prompt_tokens > 32
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 and cached % 16 == 0  # whole blocks of the shared prefix
