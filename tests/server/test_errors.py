"""Bad requests: each gets the right status and an OpenAI-shaped error that says what was wrong."""
from __future__ import annotations

import openai
import pytest

from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME

USER = [{"role": "user", "content": "hi"}]


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status
    return err


def post_chat(http, **body):
    body.setdefault("model", MODEL_NAME)
    body.setdefault("messages", USER)
    return http.post("/v1/chat/completions", json=body)


def test_negative_max_tokens(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=-5)
    assert "max_tokens" in e.value.message and "-5" in e.value.message
    assert e.value.body["param"] == "max_tokens"


def test_negative_max_tokens_completions(http):
    err = error_of(http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x",
                                                      "max_tokens": -1}), 400)
    assert err["param"] == "max_tokens"


@pytest.mark.parametrize("top_p", [0, 1.5])
def test_top_p_out_of_range(http, top_p):
    err = error_of(post_chat(http, top_p=top_p), 400)
    assert err["param"] == "top_p"
    assert "(0, 1]" in err["message"]


def test_temperature_of_wrong_type(http):
    err = error_of(post_chat(http, temperature="hot"), 400)
    assert err["param"] == "temperature"
    assert "temperature" in err["message"] and "number" in err["message"]
    assert err["type"] == "BadRequestError"


def test_negative_temperature(http):
    assert error_of(post_chat(http, temperature=-1), 400)["param"] == "temperature"


def test_empty_messages(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[])
    assert "messages" in e.value.message


def test_image_part_for_a_text_only_model(http):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]
    err = error_of(post_chat(http, messages=messages), 400)
    assert "text-only" in err["message"]
    assert err["param"] == "messages.0.content.1.image_url.url"


def test_unknown_content_part_type(http):
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}]
    err = error_of(post_chat(http, messages=messages), 400)
    assert "video_url" in err["message"]


def test_unknown_role(http):
    err = error_of(post_chat(http, messages=[{"role": "wizard", "content": "hi"}]), 400)
    assert "role" in err["message"]


def test_prompt_too_long_names_both_numbers(client):
    long_text = "hello " * (MAX_MODEL_LEN + 20)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=16,
                                       messages=[{"role": "user", "content": long_text}])
    msg = e.value.message
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in msg
    assert "16 in the completion" in msg and "in the messages" in msg


def test_prompt_plus_max_tokens_too_long(client, http):
    num_prompt = len(http.post("/tokenize", json={"prompt": "a b c"}).json()["tokens"])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="a b c", max_tokens=MAX_MODEL_LEN)
    msg = e.value.message
    assert str(MAX_MODEL_LEN) in msg and str(num_prompt + MAX_MODEL_LEN) in msg


def test_prompt_alone_too_long_without_max_tokens(http):
    err = error_of(post_chat(http, messages=[{"role": "user", "content": "hi " * MAX_MODEL_LEN}]),
                   400)
    assert f"maximum context length is {MAX_MODEL_LEN}" in err["message"]


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=USER)
    assert e.value.body["message"] == "The model `gpt-17` does not exist."
    assert e.value.body["type"] == "NotFoundError" and e.value.body["code"] == 404


def test_malformed_json(http):
    r = http.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                  headers={"content-type": "application/json"})
    assert "JSON" in error_of(r, 400)["message"]


def test_body_not_an_object(http):
    error_of(http.post("/v1/completions", json=["prompt"]), 400)


def test_missing_required_field(http):
    err = error_of(http.post("/v1/completions", json={"model": MODEL_NAME}), 400)
    assert err["param"] == "prompt"


def test_logprobs_above_limit(http):
    err = error_of(http.post("/v1/completions", json={"prompt": "x", "logprobs": 50}), 400)
    assert err["param"] == "logprobs"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("bad,says", [(-1, "between 0 and 20"), (21, "between 0 and 20"),
                                      (1.5, "valid integer"), ("2", "valid integer"),
                                      (True, "valid integer"), ([1], "valid integer")])
def test_prompt_logprobs_out_of_range_or_not_an_integer(http, path, bad, says):
    body = {"model": MODEL_NAME, "prompt_logprobs": bad, "max_tokens": 2,
            **({"prompt": "x"} if path == "/v1/completions" else {"messages": USER})}
    err = error_of(http.post(path, json=body), 400)
    assert err["param"] == "prompt_logprobs"
    assert "prompt_logprobs" in err["message"] and says in err["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_with_stream(http, path):
    body = {"model": MODEL_NAME, "prompt_logprobs": 1, "stream": True,
            **({"prompt": "x"} if path == "/v1/completions" else {"messages": USER})}
    err = error_of(http.post(path, json=body), 400)
    assert err["param"] == "prompt_logprobs" and "stream" in err["message"]


def test_top_logprobs_needs_logprobs(http):
    assert error_of(post_chat(http, top_logprobs=2), 400)["param"] == "top_logprobs"


def test_stream_options_need_stream(http):
    err = error_of(post_chat(http, stream_options={"include_usage": True}), 400)
    assert err["param"] == "stream_options"


def test_token_ids_out_of_vocabulary(http):
    err = error_of(http.post("/v1/completions", json={"prompt": [1, 10**9]}), 400)
    assert "out of range" in err["message"]


def test_unknown_route_is_json_404(http):
    error_of(http.get("/v1/nope"), 404)


def test_form_encoded_json_is_still_read(http):
    # curl -d '{...}' sends a JSON body labelled as a form
    r = http.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 1}',
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("bias,says", [({"abc": 1}, "token ids"), ({"-4": 1}, "token ids"),
                                       ({"5": 300}, "[-100, 100]"), ({"5": "high"}, "logit_bias"),
                                       ({str(10**9): 1}, "outside the vocabulary")])
def test_logit_bias_bad_keys_and_values(http, path, bias, says):
    body = {"model": MODEL_NAME, "logit_bias": bias, "max_tokens": 2,
            **({"prompt": "x"} if path == "/v1/completions" else {"messages": USER})}
    err = error_of(http.post(path, json=body), 400)
    assert "logit_bias" in (err["param"] or "") and says in err["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("field,value", [
    ("response_format", {"type": "json_object"}),
    ("guided_regex", "a+"), ("structured_outputs", {"choice": ["a"]})])
def test_structured_outputs_are_served(http, path, field, value):
    body = {"model": MODEL_NAME, field: value, "max_tokens": 2,
            **({"prompt": "x"} if path == "/v1/completions" else {"messages": USER})}
    assert http.post(path, json=body).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_bad_schema_is_a_400_naming_the_field(http, path):
    body = {"model": MODEL_NAME, "guided_json": {"type": "nope"}, "max_tokens": 2,
            **({"prompt": "x"} if path == "/v1/completions" else {"messages": USER})}
    err = error_of(http.post(path, json=body), 400)
    assert err["param"] == "guided_json" and "not a valid JSON schema" in err["message"]


def test_text_response_format_is_fine(http):
    assert post_chat(http, response_format={"type": "text"}, max_tokens=2).status_code == 200


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}}}}]


@pytest.mark.parametrize("choice", [None, "auto"])
def test_auto_tool_choice_needs_the_flag(http, choice):
    body = {"tools": TOOLS, "max_tokens": 2, **({} if choice is None else {"tool_choice": choice})}
    err = error_of(post_chat(http, **body), 400)
    assert err["param"] == "tool_choice" and "--enable-auto-tool-choice" in err["message"]


def test_tools_with_tool_choice_none_reach_the_template_and_answer_in_text(http):
    r = post_chat(http, tools=TOOLS, tool_choice="none", max_tokens=2)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_tool_choice_without_tools(http):
    assert error_of(post_chat(http, tool_choice="required"), 400)["param"] == "tool_choice"


@pytest.mark.parametrize("body", [{"functions": TOOLS[:1]}, {"function_call": "auto"},
                                  {"function_call": {"name": "get_weather"}}])
def test_legacy_function_calling_is_refused(http, body):
    err = error_of(post_chat(http, max_tokens=2, **body), 400)
    assert err["param"] == "functions" and "not supported" in err["message"]
    assert "tools" in err["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("value,says", [(1, "--scheduling-policy priority"), ("high", "integer")])
def test_priority_without_the_priority_policy_or_not_an_integer(http, path, value, says):
    body = {"model": MODEL_NAME, "priority": value, "max_tokens": 2,
            **({"prompt": "x"} if path == "/v1/completions" else {"messages": USER})}
    err = error_of(http.post(path, json=body), 400)
    assert err["param"] == "priority" and says in err["message"]


def test_priority_is_taken_by_a_priority_server(server_factory):
    with server_factory(scheduling_policy="priority").http() as http:
        r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2,
                                               "priority": -5})
        assert r.status_code == 200, r.text
