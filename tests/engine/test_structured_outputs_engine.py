"""Structured outputs in the engine, on the tiny random model: the mask holds at temperature 0 and
1, with n > 1, under async scheduling (same outputs as synchronous) and preemption; a constraint
that does not compile fails its request alone; a slow compile does not hold up the queue."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from kubeinfer import LLM, SamplingParams

KW = dict(dtype="float32", max_model_len=256, max_num_batched_tokens=64)
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "tag": {"enum": ["a", "bb", "ccc"]}},
          "required": ["n", "tag"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llms(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    # 24 blocks of 16 tokens: eight requests of ~100 tokens cannot all fit, so some are preempted
    return (LLM(path, num_gpu_blocks_override=64, **KW),
            LLM(path, num_gpu_blocks_override=24, async_scheduling=True, **KW))


def _prompts(n=8):
    return [{"prompt_token_ids": [5 + i, 17, 40 + 3 * i, 9] * (2 + i % 3)} for i in range(n)]


def _texts(llm, params, n=8):
    outs = llm.generate(_prompts(n), params)
    engine = llm.engine
    assert engine.kv.num_free_blocks == engine.num_blocks and not engine.structured_output.matchers
    return [[(o.text, o.finish_reason) for o in r.outputs] for r in outs]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_schema_holds_sync_async_and_preempted(llms, temperature):
    sync, async_ = llms
    params = SamplingParams(temperature=temperature, seed=3, n=2, max_tokens=100,
                            structured_outputs={"json": SCHEMA, "disable_any_whitespace": True})
    got = _texts(sync, params)
    assert _texts(async_, params) == got
    assert async_.engine.scheduler._num_preemptions > 0  # (no stat logger resets the count)
    finished = [t for r in got for t, reason in r if reason == "stop"]
    assert len(finished) >= 8
    for text in finished:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_and_choice_with_stop_strings_and_logprobs(llms):
    sync, _ = llms
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=40, logprobs=2,
                            structured_outputs={"regex": r"[ab]{2,4}-\d{1,3}"})
    for r in sync.generate(_prompts(4), params):
        assert re.fullmatch(r"[ab]{2,4}-\d{1,3}", r.outputs[0].text)
        assert len(r.outputs[0].logprobs) == len(r.outputs[0].token_ids)
    params = SamplingParams(temperature=1.0, seed=2, max_tokens=40, stop=["-"],
                            structured_outputs={"choice": ["ab-cd", "ef"]})
    for r in sync.generate(_prompts(4), params):
        assert r.outputs[0].text in ("ab", "ef")


def test_a_bad_constraint_fails_alone(llms):
    sync, _ = llms
    good = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    bad = SamplingParams(temperature=0, max_tokens=8, structured_outputs={"regex": "(unclosed"})
    outs = sync.generate(_prompts(3), [good, bad, good])
    assert [r.outputs[0].finish_reason for r in outs] == ["length", "error", "length"]
    assert outs[0].outputs[0].token_ids == sync.generate(_prompts(1), good)[0].outputs[0].token_ids


def test_a_compiling_request_does_not_hold_the_queue(llms):
    sync, _ = llms
    engine = sync.engine
    from concurrent.futures import Future

    blocked: Future = Future()  # a compile that has not finished
    schema = {"type": "object", "properties": {"never": {"type": "integer"}}}
    params = SamplingParams(temperature=0, max_tokens=4, structured_outputs={"json": schema})
    key = params.structured_outputs.key()
    compiler = engine.structured_output.compiler
    with compiler._lock:
        compiler._cache[key] = blocked
    try:
        engine.add_request("slow", [5, 6, 7], params)
        engine.add_request("fast", [5, 6, 7], SamplingParams(temperature=0, max_tokens=4))
        done = set()
        for _ in range(20):
            done |= {o.request_id for o in engine.step() if o.finished}
            if "fast" in done:
                break
        assert done == {"fast"} and engine.scheduler.compiling
        engine.abort_request("slow")
        assert not engine.scheduler.compiling and not engine.has_unfinished_requests()
    finally:
        with compiler._lock:
            compiler._cache.pop(key, None)
