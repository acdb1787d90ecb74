"""Adversarial requests (issue 14): each is a 400 that names the field, and the engine lives on."""
from __future__ import annotations

import json

import pytest

from tests.server.conftest import MODEL_NAME

USER = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"


def raw_post(http, path: str, text: str):
    """POST a body written by hand (NaN literals, lone surrogate escapes)."""
    return http.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["code"] == status
    return err


def assert_serves(http) -> None:
    """The engine is alive and answers a normal request, after whatever came before."""
    r = http.post(CHAT, json={"model": MODEL_NAME, "messages": USER, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert http.get("/health").status_code == 200


# The requests that each killed the engine thread, and their relatives.
@pytest.mark.parametrize("path, body, param", [
    (CHAT, {"seed": 2**64, "temperature": 1.0}, "seed"),
    (CHAT, {"seed": -2**70, "temperature": 1.0}, "seed"),
    (CHAT, {"top_k": 10**400, "temperature": 1.0}, "top_k"),
    (CHAT, {"top_k": 513, "temperature": 1.0}, "top_k"),  # the tiny vocabulary has 512
    (CHAT, {"stop_token_ids": [2**63], "min_tokens": 2}, "stop_token_ids.0"),
    (CHAT, {"stop_token_ids": [512], "min_tokens": 2}, "stop_token_ids"),
    (CHAT, {"n": 100000}, "n"),
    (CHAT, {"n": 129}, "n"),
    (CHAT, {"max_tokens": 2**63}, "max_tokens"),
    (CHAT, {"min_tokens": 2**63}, "min_tokens"),
    (CHAT, {"priority": 2**70}, "priority"),
    (CHAT, {"logit_bias": {"1" * 30: 1.0}}, "logit_bias"),
    (CHAT, {"logit_bias": {"600": 1.0}}, "logit_bias"),
    (CHAT, {"top_logprobs": 2**64, "logprobs": True}, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2**64}, "logprobs"),
    ("/v1/completions", {"prompt": [2**70]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 10**6}, "n"),
])
def test_numbers_out_of_range_are_a_400_naming_the_field(http, path, body, param):
    if path == CHAT:
        body = {"model": MODEL_NAME, "messages": USER, **body}
    err = error_of(http.post(path, json={"max_tokens": 4, **body}
                             if "max_tokens" not in body and "min_tokens" not in body else body))
    assert err["param"] == param, err
    assert param.split(".")[0] in err["message"]
    assert_serves(http)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty"])
def test_non_finite_floats_are_refused(http, literal, field):
    text = f'{{"model": "{MODEL_NAME}", "messages": {json.dumps(USER)}, "{field}": {literal}}}'
    err = error_of(raw_post(http, CHAT, text))
    assert err["param"] == field and "finite" in err["message"]


def test_non_finite_logit_bias_is_refused(http):
    text = f'{{"model": "{MODEL_NAME}", "prompt": "hi", "logit_bias": {{"5": NaN}}}}'
    err = error_of(raw_post(http, "/v1/completions", text))
    assert err["param"] == "logit_bias.5"


@pytest.mark.parametrize("path, body, param", [
    (CHAT, {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": "a\ud800b"}], "stream": True},
     "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages.0.content.0.text"),
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "a\ud800b"]}, "prompt.1"),
    ("/tokenize", {"prompt": "a\ud800b"}, "prompt"),
    (CHAT, {"model": "\ud800", "messages": USER}, "model"),
    (CHAT, {"messages": USER, "stop": ["\ud800"]}, "stop.0"),
])
def test_lone_surrogates_are_a_400_and_keep_the_connection(http, path, body, param):
    body = {"model": MODEL_NAME, **body}
    r = raw_post(http, path, json.dumps(body))  # json.dumps writes the surrogate as \ud800
    err = error_of(r)
    assert err["param"] == param and "Unicode" in err["message"]
    assert r.headers.get("connection", "").lower() != "close"
    assert_serves(http)


def test_a_surrogate_in_a_field_name_is_a_400(http):
    text = f'{{"model": "{MODEL_NAME}", "prompt": "hi", "\\ud800": 1}}'
    err = error_of(raw_post(http, "/v1/completions", text))
    assert "Unicode" in err["message"]


def test_a_valid_surrogate_pair_is_text(http):
    body = {"model": MODEL_NAME, "prompt": "smile \U0001F600", "max_tokens": 2}
    assert raw_post(http, "/v1/completions", json.dumps(body)).status_code == 200


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": [[False]]}, "prompt"),
    ("/v1/completions", {"prompt": [True, 5]}, "prompt"),
    ("/detokenize", {"tokens": [True]}, "tokens.0"),
    (CHAT, {"messages": USER, "stop_token_ids": [True]}, "stop_token_ids.0"),
    (CHAT, {"messages": USER, "seed": True}, "seed"),
    (CHAT, {"messages": USER, "n": True}, "n"),
    (CHAT, {"messages": USER, "max_tokens": 2.0}, "max_tokens"),
])
def test_booleans_and_floats_are_not_integers(http, path, body, param):
    err = error_of(http.post(path, json={"model": MODEL_NAME, **body}))
    assert err["param"] == param, err


def test_bad_json_is_a_400(http):
    err = error_of(raw_post(http, CHAT, '{"model": '))
    assert "not valid JSON" in err["message"]
    err = error_of(raw_post(http, CHAT, "[" * 100_000 + "]" * 100_000))
    assert err["code"] == 400


def test_a_request_chat_template_is_refused_unless_trusted(http):
    err = error_of(http.post(CHAT, json={"model": MODEL_NAME, "messages": USER,
                                         "chat_template": "{{ messages[0].content }}"}))
    assert err["param"] == "chat_template" and "--trust-request-chat-template" in err["message"]
    err = error_of(http.post("/tokenize", json={"model": MODEL_NAME, "messages": USER,
                                                "chat_template": "{{ messages[0].content }}"}))
    assert err["param"] == "chat_template"


@pytest.fixture(scope="module")
def trusting(server_factory):
    running = server_factory(trust_request_chat_template=True)
    with running.http() as http:
        yield running, http


def test_a_trusted_request_chat_template_is_what_renders(trusting):
    server, http = trusting
    template = "{% for m in messages %}<<{{ m.content | upper }}>>{% endfor %}"
    r = http.post(CHAT, json={"model": MODEL_NAME, "messages": USER, "max_tokens": 2,
                              "chat_template": template, "return_token_ids": True})
    assert r.status_code == 200, r.text
    expected = server.engine.tokenizer.encode("<<HI>>", add_special_tokens=False)
    assert r.json()["prompt_token_ids"] == expected
    r = http.post("/tokenize", json={"model": MODEL_NAME, "messages": USER,
                                     "chat_template": template})
    assert r.json()["tokens"] == expected


@pytest.mark.parametrize("template, words", [
    ("{% for m in messages %}", "TemplateSyntaxError"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    ("{{ raise_exception('no system role') }}", "no system role"),
])
def test_a_request_template_that_fails_is_a_400_naming_it(trusting, template, words):
    _, http = trusting
    err = error_of(http.post(CHAT, json={"model": MODEL_NAME, "messages": USER,
                                         "chat_template": template}))
    assert err["param"] == "chat_template" and words in err["message"], err


@pytest.mark.parametrize("kwargs", [{"tokenize": True}, {"return_dict": True},
                                    {"chat_template": "x"}])
def test_template_kwargs_cannot_steer_the_renderer(http, kwargs):
    err = error_of(http.post(CHAT, json={"model": MODEL_NAME, "messages": USER,
                                         "chat_template_kwargs": kwargs}))
    assert err["param"] == "chat_template_kwargs" and list(kwargs)[0] in err["message"]
