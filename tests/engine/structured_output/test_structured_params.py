"""Request fields -> StructuredOutputsParams, tool_choice schemas, and the errors a user can cause."""
from __future__ import annotations

import pytest

from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.structured_output.params import StructuredOutputsParams
from kubeinfer.engine.structured_output.request_fields import coerce, from_request
from kubeinfer.engine.structured_output.tool_choice import tool_choice_params

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("body, kind", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA,
                                                                 "strict": True}}}, "json"),
    ({"response_format": {"type": "json_object"}}, "json_object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_object"),
    ({"structured_outputs": {"json": SCHEMA}}, "json"),
    ({"structured_outputs": {"regex": "a+"}}, "regex"),
    ({"structured_outputs": {"choice": ["a", "b"]}}, "choice"),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar"),
    ({"structured_outputs": {"structural_tag": '{"type": "structural_tag", "format": {}}'}},
     "structural_tag"),
    ({"guided_json": SCHEMA}, "json"),
    ({"guided_json": '{"type": "string"}'}, "json"),
    ({"guided_regex": "[0-9]+"}, "regex"),
    ({"guided_choice": ["yes", "no"]}, "choice"),
    ({"guided_grammar": 'root ::= "a"'}, "grammar"),
    ({"response_format": {"type": "structural_tag", "structures": [], "triggers": []}},
     "structural_tag"),
])
def test_request_shapes(body, kind):
    params = from_request(body)
    assert params is not None and params.kind == kind


def test_no_constraint():
    assert from_request({}) is None
    assert from_request({"response_format": {"type": "text"}}) is None
    assert from_request({"guided_json": None, "structured_outputs": None}) is None


def test_equal_schemas_share_a_key():
    a = StructuredOutputsParams(json={"type": "object", "required": ["a"], "properties": {}})
    b = StructuredOutputsParams(json='{"properties": {}, "required": ["a"], "type": "object"}')
    assert a.key() == b.key()
    assert a.key() != StructuredOutputsParams(json=a.json, disable_any_whitespace=True).key()


@pytest.mark.parametrize("body, param, words", [
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs", "json, regex"),
    ({"structured_outputs": {"jsn": SCHEMA}}, "structured_outputs", "unknown field(s) jsn"),
    ({"structured_outputs": "json"}, "structured_outputs", "must be an object"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty list"),
    ({"structured_outputs": {"choice": "a"}}, "structured_outputs", "non-empty list"),
    ({"structured_outputs": {"choice": ["a", 3]}}, "structured_outputs", "strings only"),
    ({"structured_outputs": {"regex": ""}}, "structured_outputs", "non-empty string"),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": "yes"}},
     "structured_outputs", "true or false"),
    ({"structured_outputs": {"json": SCHEMA, "max_whitespace_run": 0}}, "structured_outputs",
     "positive integer"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": [1, 2]}, "guided_json", "schema object"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format",
     "set only one of guided_regex, response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "one of text"),
    ({"response_format": "json"}, "response_format", "must be an object"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", '"json_schema"'),
    ({"structured_outputs": {"structural_tag": "{oops"}}, "structured_outputs", "not valid JSON"),
])
def test_bad_request_fields_name_the_field(body, param, words):
    with pytest.raises(RequestError) as e:
        from_request(body)
    assert e.value.param == param
    assert words in str(e.value)


def test_coerce_passes_params_through():
    params = StructuredOutputsParams(regex="a")
    assert coerce(params) is params
    assert coerce({"json": SCHEMA, "disable_fallback": True}).kind == "json"


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now"}}]


def test_tool_choice_schemas():
    import json

    import jsonschema

    assert tool_choice_params(TOOLS, "auto") is None and tool_choice_params(TOOLS, "none") is None
    named = tool_choice_params(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(named.json) == TOOLS[0]["function"]["parameters"]
    required = json.loads(tool_choice_params(TOOLS, "required").json)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo"}},
                         {"name": "now", "parameters": {}}], required)
    for bad in ([], [{"name": "get_weather", "parameters": {}}],
                [{"name": "other", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, required)


@pytest.mark.parametrize("tools, choice, words", [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not in tools"),
    (TOOLS, {"type": "function"}, "needs"),
    ([], "required", "at least one tool"),
    (TOOLS, "sometimes", "must be"),
    ([{"type": "function"}], "required", "tools[0]"),
])
def test_bad_tool_choice(tools, choice, words):
    with pytest.raises(RequestError, match=words.replace("[", r"\[").replace("]", r"\]")):
        tool_choice_params(tools, choice)


@pytest.mark.parametrize("params, words", [
    (StructuredOutputsParams(json={"type": "objectx"}), "not a valid JSON schema"),
    (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"minimum": "3"}}}),
     "properties/a/minimum"),
    (StructuredOutputsParams(regex="a(b"), "parenthesis is not closed"),
    (StructuredOutputsParams(grammar='root ::= foo'), 'Rule "foo" is not defined'),
    (StructuredOutputsParams(grammar='root ::= "a" | '), "EBNF parser error"),
    (StructuredOutputsParams(structural_tag='{"type": "structural_tag", "format": 3}'),
     "structural tag"),
], ids=["schema_type", "schema_keyword", "regex", "grammar_rule", "grammar_syntax", "tag"])
def test_compile_errors_are_request_errors(compiler, params, words):
    first = compiler.submit(params)
    with pytest.raises(RequestError) as e:
        first.result(timeout=30)
    assert words in str(e.value)
    assert e.value.param == params.param
    assert "/project/cpp" not in str(e.value)
    # A failure is not cached: the next submit of the same constraint compiles (and fails) again.
    again = compiler.submit(params)
    assert again is not first
    with pytest.raises(RequestError):
        again.result(timeout=30)


def test_compiled_grammars_are_cached(compiler):
    params = StructuredOutputsParams(regex="[a-c]{3}")
    first = compiler.submit(params)
    assert compiler.submit(StructuredOutputsParams(regex="[a-c]{3}")) is first
    assert first.result(timeout=30) is compiler.compile(params)
