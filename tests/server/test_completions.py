"""POST /v1/completions: string, batch and token-id prompts, echo, legacy logprobs, streaming."""
from __future__ import annotations

import openai
import pytest

from tests.server.conftest import MODEL_NAME

PROMPT = "The quick brown fox jumps over"
LONG = {"ignore_eos": True}


def complete(client, **kw):
    kw.setdefault("model", MODEL_NAME)
    kw.setdefault("prompt", PROMPT)
    return client.completions.create(**kw)


def test_string_prompt(client, http):
    r = complete(client, max_tokens=7, temperature=0, extra_body=LONG)
    assert r.id.startswith("cmpl-")
    assert r.object == "text_completion"
    assert r.model == MODEL_NAME
    [choice] = r.choices
    assert choice.finish_reason == "length" and choice.text
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 7


def test_default_max_tokens_is_16(client):
    assert complete(client, extra_body=LONG).usage.completion_tokens == 16


def test_token_id_prompt_equals_string_prompt(client, http):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    a = complete(client, prompt=ids, max_tokens=8, temperature=0, extra_body=LONG)
    b = complete(client, max_tokens=8, temperature=0, extra_body=LONG)
    assert a.choices[0].text == b.choices[0].text


def test_batch_of_prompts_with_n(client):
    r = complete(client, prompt=["one two", "three four five"], n=2, max_tokens=3,
                 temperature=1.0, seed=1, extra_body=LONG)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 12
    single = [complete(client, prompt=p, max_tokens=1) for p in ("one two", "three four five")]
    assert r.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single)


def test_echo_prepends_the_prompt(client):
    r = complete(client, max_tokens=4, temperature=0, echo=True, extra_body=LONG)
    plain = complete(client, max_tokens=4, temperature=0, extra_body=LONG)
    assert r.choices[0].text == PROMPT + plain.choices[0].text


def test_legacy_logprobs_format(client):
    r = complete(client, max_tokens=5, temperature=0, logprobs=2, extra_body=LONG)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        assert 1 <= len(top) <= 3  # the 2 most likely, plus the sampled token if not among them
        assert top[token] == pytest.approx(logprob, abs=1e-4)
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy


def test_echo_with_logprobs_reports_only_the_first_prompt_token_as_null(client, http):
    num_prompt = len(http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"])
    r = complete(client, max_tokens=2, echo=True, logprobs=1, extra_body=LONG)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == num_prompt + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts it
    assert all(v is not None for v in lp.token_logprobs[1:])


def test_stream_with_usage(client):
    whole = complete(client, max_tokens=10, temperature=0, extra_body=LONG)
    chunks = list(complete(client, max_tokens=10, temperature=0, stream=True,
                           stream_options={"include_usage": True}, extra_body=LONG))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def _greedy_ids(client, n: int) -> list[int]:
    r = complete(client, max_tokens=n, temperature=0, logprobs=0,
                 extra_body={**LONG, "return_tokens_as_token_ids": True})
    return [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]


def test_stop_token_ids(client):
    ids = _greedy_ids(client, 8)
    k = next(i for i in range(1, 8) if ids[i] not in ids[:i])
    r = complete(client, max_tokens=8, temperature=0, extra_body={**LONG, "stop_token_ids": [ids[k]]})
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == k + 1  # the stop token is generated, not shown


def test_min_tokens_holds_back_stop_tokens(client):
    ids = _greedy_ids(client, 8)
    k = next(i for i in range(1, 8) if ids[i] not in ids[:i])
    r = complete(client, max_tokens=12, temperature=0,
                 extra_body={"stop_token_ids": [ids[k]], "min_tokens": k + 3})
    assert r.usage.completion_tokens >= k + 3


def test_best_of_other_than_n_is_rejected(client):
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, max_tokens=2, n=1, best_of=3)
    assert "best_of" in e.value.message
    assert complete(client, max_tokens=2, n=2, best_of=2).usage.completion_tokens >= 2


def test_batch_streamed(client):
    chunks = list(complete(client, prompt=["one two", "three four five"], max_tokens=4,
                           stream=True, stream_options={"include_usage": True}, extra_body=LONG))
    finished = {c.choices[0].index: c.choices[0].finish_reason
                for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 8


def test_logit_bias_forces_a_token(http):
    body = {"model": MODEL_NAME, "prompt": "Once upon", "max_tokens": 4, "temperature": 0.8,
            "logit_bias": {"42": 100}, "logprobs": 0, "return_tokens_as_token_ids": True}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["logprobs"]["tokens"] == ["token_id:42"] * 4
