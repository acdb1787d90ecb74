"""Compiled grammars driven by random sampling from their masks, with SmolLM2's real tokenizer.

Each walk samples at temperature 1 from random logits restricted to the matcher's bitmask until the
grammar terminates (it accepts EOS), and checks the text against the constraint with an independent
checker (jsonschema, re, ...). Structural tokens (quotes, brackets, commas, digits, EOS) get a
logit bonus, as a model's preference would, so walks end in a few dozen tokens instead of wandering
inside a string for thousands.
"""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import torch

from kubeinfer.engine.reasoning.registry import get_reasoning_parser
from kubeinfer.engine.structured_output.bitmask import allocate_bitmask
from kubeinfer.engine.structured_output.matcher import StructuredOutputMatcher
from kubeinfer.engine.structured_output.params import StructuredOutputsParams

MAX_STEPS = 400
_STRUCTURAL = set('"{}[],:0123456789') | {"true", "false", "null", "-"}


def allowed_tokens(bitmask, vocab_size: int) -> np.ndarray:
    """Row 0 of a packed bitmask as bools (numpy: the torch unpack is slow on a busy 2-core box)."""
    return np.unpackbits(bitmask[0].numpy().view(np.uint8), bitorder="little")[:vocab_size] == 1


@pytest.fixture(scope="module")
def bonus(smollm2_tokenizer) -> np.ndarray:
    tok = smollm2_tokenizer
    b = np.zeros(len(tok))
    for tid in range(len(tok)):
        if tok.decode([tid]) in _STRUCTURAL:
            b[tid] = 12.0
    b[tok.eos_token_id] = 12.0
    return b


def walk(compiler, tokenizer, bonus, params, seed=0):
    """Sample until the grammar terminates; returns (text, token ids without EOS).

    Temperature-1 sampling from softmax(random normal logits + bonus) over the allowed tokens, by
    the Gumbel-max trick."""
    rng = np.random.default_rng(seed)
    matcher = StructuredOutputMatcher(compiler.compile(params))
    vocab = len(tokenizer)
    bitmask = allocate_bitmask(1, vocab)
    ids: list[int] = []
    for _ in range(MAX_STEPS):
        matcher.fill_bitmask_row(bitmask, 0)
        allowed = allowed_tokens(bitmask, vocab)
        assert allowed.any(), "the grammar allows no token"
        scores = rng.standard_normal(vocab) + bonus + rng.gumbel(size=vocab)
        scores[~allowed] = -np.inf
        token = int(np.argmax(scores))
        assert matcher.accept_tokens([token])
        if matcher.is_terminated():
            assert token == tokenizer.eos_token_id
            return tokenizer.decode(ids), ids
        ids.append(token)
    pytest.fail(f"no termination after {MAX_STEPS} tokens: {tokenizer.decode(ids)!r}")


SCHEMAS = {
    "required": {"type": "object", "properties": {"name": {"type": "string"},
                                                  "age": {"type": "integer"}},
                 "required": ["name", "age"]},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
             "required": ["color"]},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["id", "tags"]}}, "required": ["user"]},
    "array_bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "number_range": {"type": "object", "properties": {
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "n": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["score", "n"]},
    "pattern": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"]},
    "any_of": {"anyOf": [{"type": "integer"}, {"type": "object", "properties": {
        "x": {"type": "boolean"}}, "required": ["x"]}]},
    "no_additional": {"type": "object", "properties": {"a": {"type": "boolean"},
                                                       "b": {"type": "null"}},
                      "additionalProperties": False},
    "string_length": {"type": "string", "minLength": 2, "maxLength": 5},
    "const": {"type": "object", "properties": {"v": {"const": "x"}, "k": {"type": "integer",
                                                                           "enum": [1, 2, 3]}},
              "required": ["v", "k"]},
    "refs": {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}},
                              "required": ["x"]}},
             "type": "array", "items": {"$ref": "#/$defs/pt"}, "minItems": 1, "maxItems": 3},
    "array_of_enums": {"type": "object", "properties": {"days": {
        "type": "array", "items": {"enum": ["mon", "tue"]}, "maxItems": 2}}, "required": ["days"]},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_walks_validate(name, compiler, smollm2_tokenizer, bonus):
    schema = SCHEMAS[name]
    for seed in range(2):
        text, _ = walk(compiler, smollm2_tokenizer, bonus, StructuredOutputsParams(json=schema),
                       seed=seed)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_is_an_object(compiler, smollm2_tokenizer, bonus):
    for seed in range(3):
        text, _ = walk(compiler, smollm2_tokenizer, bonus, StructuredOutputsParams(json_object=True),
                       seed=seed)
        assert isinstance(json.loads(text), dict)


def test_eos_only_where_the_grammar_may_end(compiler, smollm2_tokenizer):
    eos = smollm2_tokenizer.eos_token_id
    matcher = StructuredOutputMatcher(compiler.compile(StructuredOutputsParams(
        json={"type": "array", "items": {"type": "integer"}})))
    bitmask = allocate_bitmask(1, len(smollm2_tokenizer))

    def eos_allowed() -> bool:
        matcher.fill_bitmask_row(bitmask, 0)
        return bool(allowed_tokens(bitmask, len(smollm2_tokenizer))[eos])

    assert not eos_allowed()
    assert matcher.accept_tokens(smollm2_tokenizer.encode("[1"))
    assert not eos_allowed()
    assert matcher.accept_tokens(smollm2_tokenizer.encode("]"))
    assert eos_allowed()
    assert not matcher.accept_tokens(smollm2_tokenizer.encode("x"))  # nothing may follow


def _whitespace_runs_outside_strings(text: str) -> list[int]:
    return [len(m) for m in re.findall(r"\s+", re.sub(r'"(?:[^"\\]|\\.)*"', '""', text))]


def test_whitespace_is_bounded_and_can_be_disabled(compiler, smollm2_tokenizer):
    tok = smollm2_tokenizer
    # A model that loves whitespace: every token made only of whitespace gets a large bonus.
    ws_bonus = np.array([8.0 if (s := tok.decode([t])) and not s.strip() else 0.0
                         for t in range(len(tok))])
    ws_bonus[tok.eos_token_id] = 2.0
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
              "minItems": 3, "maxItems": 3}
    text, _ = walk(compiler, tok, ws_bonus, StructuredOutputsParams(json=schema, max_whitespace_run=2))
    runs = _whitespace_runs_outside_strings(text)
    assert runs and max(runs) <= 2, text
    jsonschema.validate(json.loads(text), schema)
    # vLLM's disable_any_whitespace: xgrammar's fixed separators, ", " and ": ", nothing else.
    text, _ = walk(compiler, tok, ws_bonus, StructuredOutputsParams(json=schema,
                                                                    disable_any_whitespace=True))
    assert text == json.dumps(json.loads(text)), text
    jsonschema.validate(json.loads(text), schema)


def test_regex_and_choice(compiler, smollm2_tokenizer, bonus):
    pattern = r"[0-9]{3}-[a-z]{2,4}(\.[0-9])?"
    choices = ("Paris", "New York", "São Paulo", 'say "hi"')
    for seed in range(3):
        text, _ = walk(compiler, smollm2_tokenizer, bonus, StructuredOutputsParams(regex=pattern),
                       seed=seed)
        assert re.fullmatch(pattern, text), text
        text, _ = walk(compiler, smollm2_tokenizer, bonus, StructuredOutputsParams(choice=choices),
                       seed=seed)
        assert text in choices


GBNF = r'''
root ::= "(" expr ")"
expr ::= term (("+" | "*") term)*
term ::= [1-9] [0-9]? | "(" expr ")"
'''
LARK = r'''
start: "ok" | "no" NUMBER
NUMBER: /[1-9][0-9]?/
'''


def test_gbnf_and_lark_grammars(compiler, smollm2_tokenizer, bonus):
    for seed in range(3):
        text, _ = walk(compiler, smollm2_tokenizer, bonus, StructuredOutputsParams(grammar=GBNF),
                       seed=seed)
        # Python's own parser reads the same arithmetic; the result must be an int.
        assert text.startswith("(") and isinstance(eval(text, {}, {}), int), text  # noqa: S307
        text, _ = walk(compiler, smollm2_tokenizer, bonus, StructuredOutputsParams(grammar=LARK),
                       seed=seed)
        assert re.fullmatch(r"ok|no[1-9][0-9]?", text), text


def test_structural_tag_vllm_shape(compiler, smollm2_tokenizer):
    tag = {"type": "structural_tag", "triggers": ["<fn="],
           "structures": [{"begin": "<fn=add>", "schema": {"type": "object", "properties": {
               "a": {"type": "integer"}}, "required": ["a"]}, "end": "</fn>"}]}
    matcher = StructuredOutputMatcher(compiler.compile(StructuredOutputsParams(
        structural_tag=json.dumps(tag))))
    assert matcher.accept_tokens(smollm2_tokenizer.encode('free text <fn=add>{"a": 1}</fn>'))
    fresh = StructuredOutputMatcher(compiler.compile(StructuredOutputsParams(
        structural_tag=json.dumps(tag))))
    assert not fresh.accept_tokens(smollm2_tokenizer.encode('<fn=add>{"b": 1}'))


def test_rollback_restores_masks(compiler, smollm2_tokenizer, bonus):
    params = StructuredOutputsParams(json=SCHEMAS["nested"])
    _, ids = walk(compiler, smollm2_tokenizer, bonus, params, seed=5)
    matcher = StructuredOutputMatcher(compiler.compile(params))
    vocab = len(smollm2_tokenizer)
    masks = []
    for token in ids:
        bm = allocate_bitmask(1, vocab)
        matcher.fill_bitmask_row(bm, 0)
        masks.append(bm.clone())
        assert matcher.accept_tokens([token])
    k = min(7, len(ids) - 1)
    matcher.rollback(k)
    assert matcher.num_accepted_tokens == len(ids) - k
    bm = allocate_bitmask(1, vocab)
    matcher.fill_bitmask_row(bm, 0)
    assert torch.equal(bm, masks[len(ids) - k])
    assert matcher.accept_tokens(ids[len(ids) - k:])  # the same tokens are taken again
    matcher.reset()
    matcher.fill_bitmask_row(bm, 0)
    assert torch.equal(bm, masks[0])
    with pytest.raises(ValueError, match="cannot roll back"):
        matcher.rollback(1)


class _Vocab:
    """The part of a tokenizer a reasoning parser reads: two unused special ids stand for the tags."""

    def get_vocab(self):
        return {"<think>": 7, "</think>": 8}


def test_constraint_starts_after_reasoning(compiler, smollm2_tokenizer):
    tok = smollm2_tokenizer
    params = StructuredOutputsParams(choice=("yes", "no"))
    reasoning = get_reasoning_parser("qwen3")(_Vocab())
    END = reasoning.end_token_id
    matcher = StructuredOutputMatcher(compiler.compile(params), reasoning, prompt_token_ids=[5, 7])
    bitmask = allocate_bitmask(1, len(tok))
    thought = tok.encode("hmm, maybe 42")
    assert matcher.accept_tokens(thought)  # anything goes while reasoning
    matcher.fill_bitmask_row(bitmask, 0)
    assert bool((bitmask == -1).all())
    assert matcher.accept_tokens([END])
    assert not matcher.accept_tokens(tok.encode("maybe"))
    assert matcher.accept_tokens(tok.encode("yes") + [tok.eos_token_id])
    assert matcher.is_terminated()
    # Rolling back past the end marker turns the constraint off again.
    matcher.rollback(len(tok.encode("yes")) + 2)
    assert not matcher.is_reasoning_ended and not matcher.is_terminated()
    assert matcher.accept_tokens(tok.encode("more thought") + [END] + tok.encode("no"))
    # A prompt that already closed the reasoning constrains from the first token.
    closed = StructuredOutputMatcher(compiler.compile(params), reasoning, prompt_token_ids=[7, 9, 8])
    assert closed.is_reasoning_ended and not closed.accept_tokens(tok.encode("maybe"))


def test_a_batched_step_as_the_runner_runs_it(compiler, smollm2_tokenizer, bonus):
    """Three constrained requests in logits rows 3, 0 and 1 of four (row 2 is free): each step
    fills the bitmask, applies it, samples every row and advances each matcher; all end valid."""
    import torch

    from kubeinfer.engine.structured_output.bitmask import apply_bitmask, fill_bitmask

    tok, vocab = smollm2_tokenizer, len(smollm2_tokenizer)
    schema = SCHEMAS["required"]
    constraints = [StructuredOutputsParams(json=schema), StructuredOutputsParams(regex="[a-f]{2,6}"),
                   StructuredOutputsParams(choice=("left", "right"))]
    futures = [compiler.submit(p) for p in constraints]  # compiled on the pool, side by side
    matchers = [StructuredOutputMatcher(f.result(timeout=60)) for f in futures]
    rows = [3, 0, 1]
    outputs: list[list[int]] = [[] for _ in matchers]
    bitmask = allocate_bitmask(len(matchers), vocab)
    gen = torch.Generator().manual_seed(0)
    bonus_t = torch.from_numpy(bonus).float()
    for _ in range(MAX_STEPS):
        live = [i for i, m in enumerate(matchers) if not m.is_terminated()]
        if not live:
            break
        logits = torch.randn(4, vocab, generator=gen) + bonus_t
        free_row = logits[2].clone()
        fill_bitmask([matchers[i] for i in live], bitmask)
        apply_bitmask(logits, bitmask[:len(live)], [rows[i] for i in live])
        assert torch.equal(logits[2], free_row)
        sampled = logits.argmax(-1)  # greedy over fresh random logits: a random walk
        for i in live:
            token = int(sampled[rows[i]])
            assert matchers[i].accept_tokens([token])
            if token != tok.eos_token_id:
                outputs[i].append(token)
    assert all(m.is_terminated() for m in matchers)
    texts = [tok.decode(ids) for ids in outputs]
    jsonschema.validate(json.loads(texts[0]), schema)
    assert re.fullmatch("[a-f]{2,6}", texts[1]) and texts[2] in ("left", "right")
