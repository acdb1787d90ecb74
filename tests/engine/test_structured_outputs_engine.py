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


def test_the_mask_thread_gives_the_same_outputs(llms):
    """With the manager's mask thread on, the runner samples a constrained step only when the
    next one starts (or the step is read): the outputs are those of the synchronous engine."""
    sync, async_ = llms
    params = SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=60,
                            structured_outputs={"json": SCHEMA, "disable_any_whitespace": True})
    manager = async_.engine.structured_output
    manager.mask_thread = True
    try:
        got = _texts(async_, params)
    finally:
        manager.mask_thread = False
    assert manager._thread is not None  # it did run there
    assert got == _texts(sync, params)


def test_the_grammar_worker_process_gives_the_same_outputs(llms):
    """With the matchers in a worker process (the default on a GPU), constrained steps sample
    when the next one starts and the resolve does not wait for the worker: the outputs are
    those of the synchronous engine."""
    sync, async_ = llms
    params = SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=24,
                            structured_outputs={"json": SCHEMA, "disable_any_whitespace": True})
    manager = async_.engine.structured_output
    manager.compiler  # noqa: B018 - made (the worker takes its tokenizer table)
    manager.start_worker()
    try:
        got = _texts(async_, params)
        assert manager.num_fills > 0 and not manager.matchers  # the rows came from the worker
    finally:
        manager.remote.worker.close()
        manager.remote = None
    assert got == _texts(sync, params)


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


def _count_early_accepts(engine):
    """Wrap the manager's accept so the test sees how many resolved tokens the runner had already
    fed to their matcher (to fill the next step's mask) before the scheduler got to them."""
    manager = engine.structured_output
    seen = {"early": 0, "late": 0}
    original = manager.accept_resolved

    def accept_resolved(resolved, ending=None):
        manager._sync()  # the mask thread's accept of the step in flight has landed
        for req_id, index, _ in resolved:
            matcher = manager.matchers.get(req_id)
            if matcher is not None:
                seen["early" if matcher.num_accepted_tokens > index else "late"] += 1
        return original(resolved, ending)
    manager.accept_resolved = accept_resolved
    return seen, lambda: setattr(manager, "accept_resolved", original)


def test_async_masks_follow_the_step_in_flight(llms):
    """Constrained requests keep async scheduling on: the next step is launched before the last
    one is resolved, and its masks take that step's tokens from the runner, once each."""
    sync, async_ = llms
    params = SamplingParams(temperature=0, max_tokens=24, structured_outputs={"json": SCHEMA})
    counts = {}
    for name, llm in (("sync", sync), ("async", async_)):
        engine = llm.engine
        seen, restore = _count_early_accepts(engine)
        try:
            in_flight = 0
            for _ in range(2):  # the same ids again: the runner's last step still holds them
                for i, p in enumerate(_prompts(4)):
                    engine.add_request(str(i), p["prompt_token_ids"], params)
                while engine.has_unfinished_requests():
                    engine.step()
                    in_flight += bool(engine._in_flight) and bool(engine.scheduler.running)
        finally:
            restore()
        counts[name] = (seen["early"], seen["late"], in_flight)
    assert counts["sync"][0] == 0 and counts["sync"][1] > 0 and counts["sync"][2] == 0
    early, late, in_flight = counts["async"]
    assert in_flight > 0 and early > late  # most tokens reached their matcher a step early


def test_mixed_batch_n_stop_strings_and_logprobs_same_sync_and_async(llms):
    sync, async_ = llms
    schema = SamplingParams(temperature=1.0, seed=7, max_tokens=40, n=2, logprobs=2,
                            structured_outputs={"json": SCHEMA})
    free = SamplingParams(temperature=0.8, seed=8, max_tokens=30, logprobs=1)
    regex = SamplingParams(temperature=1.0, seed=9, max_tokens=30, stop=["-"],
                           structured_outputs={"regex": r"[ab]{2,4}-\d{1,3}"})
    choice = SamplingParams(temperature=0, max_tokens=10, structured_outputs={"choice": ["yes", "no"]})
    params = [schema, free, regex, choice, free, schema]

    def run(llm):
        outs = llm.generate(_prompts(6), params)
        assert all(len(o.logprobs) == len(o.token_ids) for r in outs for o in r.outputs
                   if o.logprobs is not None)
        return [[(o.token_ids, o.text, o.finish_reason, o.logprobs) for o in r.outputs]
                for r in outs]
    got, got_async = run(sync), run(async_)
    # the same tokens; logprobs to float noise (the batches differ by a finished request's row)
    assert [[o[:3] for o in r] for r in got_async] == [[o[:3] for o in r] for r in got]
    for r_sync, r_async in zip(got, got_async):
        for o_sync, o_async in zip(r_sync, r_async):
            for (lp, top), (lp2, top2) in zip(o_sync[3] or (), o_async[3] or ()):
                assert [t for t, _ in top] == [t for t, _ in top2]
                assert lp == pytest.approx(lp2, abs=1e-4)
    assert all(o[1] in ("yes", "no") for o in got[3])
    assert all(o[2] == "stop" and re.fullmatch(r"[ab]{2,4}", o[1]) for o in got[2])


def test_a_preempted_constrained_request_keeps_its_grammar_state(llms):
    """Preemption recomputes a request's KV cache but keeps its outputs, so its matcher keeps
    every token it took (nothing to roll back) and the output is the unpreempted one."""
    sync, async_ = llms
    params = SamplingParams(temperature=0, max_tokens=100, structured_outputs={"json": SCHEMA})
    want = [r.outputs[0].token_ids for r in sync.generate(_prompts(), params)]
    assert sync.engine.scheduler._num_preemptions == 0
    engine = async_.engine
    for i, p in enumerate(_prompts()):
        engine.add_request(str(i), p["prompt_token_ids"], params)
    got, preempted = {}, set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(int(out.request_id), []).extend(out.new_token_ids)
        for req in engine.scheduler.waiting:
            if req.num_preemptions and req.num_output_tokens:
                matcher = engine.structured_output.matchers[req.req_id]
                assert matcher.num_accepted_tokens == req.num_output_tokens - req.num_pending_tokens
                preempted.add(req.req_id)
    assert preempted  # a request was preempted with output its grammar had taken
    assert [got[i] for i in range(len(want))] == want
    assert engine.kv.num_free_blocks == engine.num_blocks and not engine.structured_output.matchers
