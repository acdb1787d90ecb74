"""prompt_logprobs over HTTP, in vLLM's shapes: per choice on /v1/completions, top level on
/v1/chat/completions, and inside the legacy logprobs of an echoed prompt; values against HF."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.server.conftest import MODEL_NAME

PROMPT = "The quick brown fox jumps over the lazy dog"
MESSAGES = [{"role": "user", "content": "Count from one to ten."}]
TOL = 1e-4


@pytest.fixture(scope="module")
def hf(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def hf_logprobs(hf, ids) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def prompt_ids(http, **body) -> list[int]:
    return http.post("/tokenize", json={"model": MODEL_NAME, **body}).json()["tokens"]


def check(prompt_logprobs, ids, ref, k):
    """vLLM's JSON: None, then {"token_id": {logprob, rank, decoded_token}} per prompt token."""
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for p in range(1, len(ids)):
        entry, row = prompt_logprobs[p], ref[p - 1]
        assert next(iter(entry)) == str(ids[p])
        for key, value in entry.items():
            assert set(value) == {"logprob", "rank", "decoded_token"}
            assert value["logprob"] == pytest.approx(row[int(key)].item(), abs=TOL)
            assert isinstance(value["decoded_token"], str)
        top = sorted((v["rank"], int(t)) for t, v in entry.items() if v["rank"] <= k)
        assert [t for _, t in top] == row.topk(k).indices.tolist()
        target = row[ids[p]].item()
        assert int((row > target + TOL).sum()) < entry[str(ids[p])]["rank"] \
            <= int((row >= target - TOL).sum())


def post(http, path, **body):
    body.setdefault("model", MODEL_NAME)
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_completions_per_choice_match_hf(http, hf):
    ids = prompt_ids(http, prompt=PROMPT)
    ref = hf_logprobs(hf, ids)
    for _ in range(2):  # the second time the prompt is in the prefix cache, and must not be used
        body = post(http, "/v1/completions", prompt=PROMPT, max_tokens=3, n=2, prompt_logprobs=3)
        first, second = body["choices"]
        check(first["prompt_logprobs"], ids, ref, 3)
        assert second["prompt_logprobs"] == first["prompt_logprobs"]
        assert first["logprobs"] is None  # prompt logprobs alone add no legacy logprobs
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_completions_batch_and_zero(http, hf):
    prompts = ["one two three", "four five six seven"]
    body = post(http, "/v1/completions", prompt=prompts, max_tokens=2, prompt_logprobs=0)
    for prompt, choice in zip(prompts, body["choices"]):
        ids = prompt_ids(http, prompt=prompt)
        check(choice["prompt_logprobs"], ids, hf_logprobs(hf, ids), 0)
        # 0: the prompt token alone
        assert all(len(entry) == 1 for entry in choice["prompt_logprobs"][1:])


def test_not_asked_is_null(http):
    body = post(http, "/v1/completions", prompt=PROMPT, max_tokens=2)
    assert body["choices"][0]["prompt_logprobs"] is None
    assert post(http, "/v1/chat/completions", messages=MESSAGES,
                max_tokens=2)["prompt_logprobs"] is None


def test_through_the_openai_client(client, http, hf):
    ids = prompt_ids(http, prompt=PROMPT)
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                  extra_body={"prompt_logprobs": 2})
    check(r.choices[0].model_extra["prompt_logprobs"], ids, hf_logprobs(hf, ids), 2)


def test_echo_with_logprobs_has_the_prompt_tokens_logprobs(http):
    ids = prompt_ids(http, prompt=PROMPT)
    body = post(http, "/v1/completions", prompt=PROMPT, max_tokens=2, echo=True, logprobs=2,
                temperature=0)
    choice = body["choices"][0]
    lp, plp = choice["logprobs"], choice["prompt_logprobs"]
    assert len(lp["tokens"]) == len(ids) + 2
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for p in range(1, len(ids)):
        assert lp["token_logprobs"][p] == pytest.approx(plp[p][str(ids[p])]["logprob"], abs=1e-6)
        top = lp["top_logprobs"][p]
        assert 2 <= len(top) <= 3  # the 2 most likely, plus the prompt token if not among them
        assert max(top.values()) == pytest.approx(
            max(v["logprob"] for v in plp[p].values()), abs=1e-6)
    assert all(v is not None for v in lp["token_logprobs"][len(ids):])


def test_echo_with_logprobs_streamed(http):
    ids = prompt_ids(http, prompt=PROMPT)
    whole = post(http, "/v1/completions", prompt=PROMPT, max_tokens=3, echo=True, logprobs=1,
                 temperature=0)["choices"][0]["logprobs"]
    with http.stream("POST", "/v1/completions", json={
            "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 1,
            "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    token_logprobs = [v for c in chunks for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert len(token_logprobs) == len(ids) + 3
    assert token_logprobs[0] is None and whole["token_logprobs"][0] is None
    assert token_logprobs[1:] == pytest.approx(whole["token_logprobs"][1:], abs=1e-6)


def test_chat_top_level_match_hf(http, hf):
    ids = prompt_ids(http, messages=MESSAGES)
    body = post(http, "/v1/chat/completions", messages=MESSAGES, max_tokens=2, n=2,
                prompt_logprobs=2)
    assert body["usage"]["prompt_tokens"] == len(ids)
    check(body["prompt_logprobs"], ids, hf_logprobs(hf, ids), 2)
    assert all("prompt_logprobs" not in c for c in body["choices"])


def test_zero_with_stream_is_accepted(http):
    for path, extra in (("/v1/completions", {"prompt": PROMPT}),
                        ("/v1/chat/completions", {"messages": MESSAGES})):
        with http.stream("POST", path, json={"model": MODEL_NAME, "max_tokens": 2, "stream": True,
                                             "prompt_logprobs": 0, **extra}) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert not any('"error"' in e for e in events)
