"""Strings with minLength/maxLength: xgrammar (0.2.8) admits raw control characters in them, which
JSON forbids; the compiler rewrites the bounds as a pattern that does not (compiler.py). The first
test pins xgrammar's own behaviour, so a future xgrammar that fixes it shows up here."""
from __future__ import annotations

import json

import pytest

from kubeinfer.engine.structured_output.compiler import bounded_strings_as_patterns
from kubeinfer.engine.structured_output.matcher import StructuredOutputMatcher
from kubeinfer.engine.structured_output.params import StructuredOutputsParams

BOUNDED = {"type": "object", "properties": {"a": {"type": "string", "minLength": 1, "maxLength": 4}},
           "required": ["a"], "additionalProperties": False}


def _accepts(compiled, tokenizer, text: str) -> bool:
    """Whether the grammar takes the whole of `text` and may end there."""
    matcher = StructuredOutputMatcher(compiled)
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return matcher.accept_tokens(ids) and matcher.is_terminated()


def test_xgrammar_alone_lets_control_characters_into_bounded_strings(compiler, smollm2_tokenizer):
    raw = compiler._xgr.compile_json_schema(json.dumps(BOUNDED), any_whitespace=True,
                                            strict_mode=True)
    assert _accepts(raw, smollm2_tokenizer, '{"a": "x\x01y"}')  # not JSON
    with pytest.raises(json.JSONDecodeError):
        json.loads('{"a": "x\x01y"}')


@pytest.mark.parametrize("text, ok", [
    ('{"a": "x\x01y"}', False), ('{"a": "x\ty"}', False), ('{"a": "x\x1fy"}', False),
    ('{"a": "x"}', True), ('{"a": "wxyz"}', True), ('{"a": "é ü"}', True),
    ('{"a": ""}', False), ('{"a": "vwxyz"}', False),
])
def test_our_compile_keeps_the_bounds_and_refuses_control_characters(compiler, smollm2_tokenizer,
                                                                     text, ok):
    compiled = compiler.compile(StructuredOutputsParams(json=BOUNDED))
    assert _accepts(compiled, smollm2_tokenizer, text) is ok
    if ok:
        assert len(json.loads(text)["a"]) in range(1, 5)


def test_the_rewrite_leaves_data_and_other_strings_alone():
    schema = {"type": "object", "properties": {
        "p": {"type": "string", "minLength": 2, "pattern": "^a+$"},  # its own pattern wins
        "f": {"type": "string", "maxLength": 30, "format": "email"},
        "e": {"enum": [{"type": "string", "minLength": 1}]},  # data, not a subschema
        "n": {"type": "array", "items": {"type": "string", "minLength": 3}}}}
    out = bounded_strings_as_patterns(schema)
    props = out["properties"]
    assert props["p"] == schema["properties"]["p"] and props["f"] == schema["properties"]["f"]
    assert props["e"] == schema["properties"]["e"]
    assert props["n"]["items"] == {"type": "string", "pattern": '^[^\\x00-\\x1f"\\\\]{3,}$'}
    assert schema["properties"]["n"]["items"]["minLength"] == 3  # the caller's schema is untouched
