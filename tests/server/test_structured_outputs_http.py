"""Structured outputs and tool calls over HTTP, on the tiny random model (fast, and its random
weights go wherever the mask lets them, a harder test of the mask than a model that knows JSON):
every constrained reply that finished with "stop" parses and validates; with "length" the user
sees why; every bad constraint is a 400 naming the field. tests/server/test_smollm2.py runs a
schema on the default model."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from tests.server.conftest import MODEL_NAME as DEFAULT_MODEL
from tests.server.conftest import start_server, tiny_config

ASK = [{"role": "user", "content": "Describe a person as JSON."}]

SCHEMAS = {
    # strings are bounded by patterns, not maxLength: xgrammar's maxLength rule lets raw control
    # characters into a string, which JSON forbids (see the compiler's docstring)
    "required": {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
                                                  "age": {"type": "integer"}},
                 "required": ["name", "age"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
             "required": ["color"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"address": {
        "type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
        "required": ["city"], "additionalProperties": False}},
        "required": ["address"], "additionalProperties": False},
    "array_bounds": {"type": "object", "properties": {"tags": {
        "type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1,
        "maxItems": 3}}, "required": ["tags"], "additionalProperties": False},
    "number_range": {"type": "object", "properties": {"score": {
        "type": "integer", "minimum": 1, "maximum": 9}}, "required": ["score"],
        "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"code": {
        "type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}}, "required": ["code"],
        "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer"},
                                                               {"type": "boolean"}]}},
               "required": ["v"], "additionalProperties": False},
    "bool_and_null": {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                       "none": {"type": "null"}},
                      "required": ["ok", "none"], "additionalProperties": False},
    "top_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                  "minItems": 2, "maxItems": 4},
    "const": {"type": "object", "properties": {"kind": {"const": "person"}},
              "required": ["kind"], "additionalProperties": False},
    "string_enum_top": {"enum": ["yes", "no"]},
    "optional": {"type": "object", "properties": {"a": {"type": "integer", "maximum": 5},
                                                  "b": {"type": "string", "pattern": "^[xy]{1,3}$"}},
                 "required": ["a"], "additionalProperties": False},
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
        "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tiny_model):
    running = start_server(ModelLifecycle(tiny_config(tiny_model), log_requests=False,
                                          tool_call_parser="hermes",
                                          enable_auto_tool_choice=True))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _chat(client, **kw):
    kw.setdefault("max_tokens", 60)
    return client.chat.completions.create(model=DEFAULT_MODEL, messages=kw.pop("messages", ASK),
                                          **kw)


def _check_json(choice, schema):
    if choice.finish_reason == "length":
        return  # cut off: the client sees "length" and knows why it may not parse
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_a_dozen_schemas_validate_greedy_and_sampled(client):
    stopped = 0
    for name, schema in SCHEMAS.items():
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
        greedy = _chat(client, response_format=fmt, temperature=0)
        sampled = _chat(client, response_format=fmt, temperature=1.0, seed=7, n=2)
        for choice in [greedy.choices[0], *sampled.choices]:
            _check_json(choice, schema)
            stopped += choice.finish_reason == "stop"
    assert stopped >= len(SCHEMAS)  # most finish well inside 60 tokens: the checks ran


def test_json_object_regex_choice_and_grammar(client):
    r = _chat(client, response_format={"type": "json_object"}, temperature=0)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = _chat(client, extra_body={"structured_outputs": {"regex": r"[a-z]{3}-\d{2}"}},
              temperature=1.0, seed=3)
    assert re.fullmatch(r"[a-z]{3}-\d{2}", r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop"
    r = _chat(client, extra_body={"guided_choice": ["Paris", "London", "Rome"]}, temperature=1.0,
              n=3, seed=1)
    assert all(c.message.content in ("Paris", "London", "Rome") for c in r.choices)
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    r = _chat(client, extra_body={"guided_grammar": grammar}, temperature=1.0, seed=2,
              max_tokens=40)
    if r.choices[0].finish_reason == "stop":
        assert re.fullmatch(r"\(\d{1,2}(\+\d{1,2})*\)", r.choices[0].message.content)


def test_completions_and_stream_with_a_schema(client):
    schema = SCHEMAS["required"]
    r = client.completions.create(model=DEFAULT_MODEL, prompt="A person:", max_tokens=60,
                                  temperature=0, extra_body={"guided_json": schema})
    if r.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(r.choices[0].text), schema)
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    whole = _chat(client, response_format=fmt, temperature=0, logprobs=True, top_logprobs=2)
    chunks = list(_chat(client, response_format=fmt, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert whole.choices[0].logprobs.content  # logprobs ride along with the constraint


def test_length_is_reported_not_hidden(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS["required"]}}
    r = _chat(client, response_format=fmt, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length"


def test_tool_choice_required_and_named(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = _chat(client, messages=messages, tools=[WEATHER, TIME], tool_choice="required",
              temperature=0, max_tokens=80)
    choice = r.choices[0]
    if choice.finish_reason != "length":
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments),
                                tool["function"]["parameters"])
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = _chat(client, messages=messages, tools=[WEATHER, TIME], tool_choice=named, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    if r.choices[0].finish_reason != "length":
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # streamed: the argument fragments add up to the whole call
    chunks = list(_chat(client, messages=messages, tools=[WEATHER, TIME], tool_choice=named,
                        temperature=0, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    streamed = list(_chat(client, messages=messages, tools=[WEATHER, TIME],
                          tool_choice="required", temperature=0, max_tokens=80, stream=True))
    calls = [tc for c in streamed if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    last = [c.choices[0].finish_reason for c in streamed if c.choices][-1]
    if last != "length":
        assert calls and last == "tool_calls"
        for d in calls:
            json.loads(d.function.arguments)


def test_auto_tool_choice_reads_hermes_calls(client):
    # the output is forced into hermes' format through a regex, so the parser has a call to find
    messages = [{"role": "user", "content": "weather?"}]
    regex = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "Rome", "unit": "c"\}\}</tool_call>'
    r = _chat(client, messages=messages, tools=[WEATHER], extra_body={"guided_regex": regex},
              temperature=0, max_tokens=150)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Rome",
                                                                           "unit": "c"}


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"bogus": 1}}, "structured_outputs"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_constraints_are_400s(server, body, param):
    r = server.http().post("/v1/chat/completions", json={
        "model": DEFAULT_MODEL, "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert param in (error.get("param") or "") + error["message"]


def test_auto_without_the_flag_is_a_400(server):
    lifecycle = server.state
    lifecycle.enable_auto_tool_choice = False
    try:
        with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
            _chat(server.client(), tools=[WEATHER], max_tokens=4)
    finally:
        lifecycle.enable_auto_tool_choice = True
