"""The engine isolates failures: a request whose inputs cannot be prepared fails alone (the others'
tokens are unchanged, the engine goes on); anything else raised by a step is fatal, and AsyncLLM
then fails every open stream and calls its exit hook instead of living on broken. Also the stats
that must follow the scheduler's state: gauges after aborts, and prompt tokens counted as vLLM."""
from __future__ import annotations

import asyncio

import pytest

from kubeinfer import LLM, SamplingParams
from kubeinfer.engine.async_engine import AsyncLLM
from kubeinfer.engine.errors import EngineDeadError, RequestFailedError
from kubeinfer.engine.input_batch import InputBatch
from kubeinfer.engine.model_runner import ModelRunner

KW = dict(dtype="float32", max_model_len=128, num_gpu_blocks_override=16, max_num_batched_tokens=32)
PROMPTS = {"a": [5, 6, 7, 8, 9], "bad": [11, 12, 13], "c": list(range(20, 41))}
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SECRET = "injected failure 7f3a"  # must reach the log, never a client


def fail_adding(monkeypatch, bad_id="bad"):
    add = InputBatch.add_request

    def add_request(self, new):
        if new.req_id == bad_id:
            raise ValueError(SECRET)
        return add(self, new)
    monkeypatch.setattr(InputBatch, "add_request", add_request)


def run(engine, prompts):
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, GREEDY)
    tokens, reasons = {rid: [] for rid in prompts}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return tokens, reasons


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    return {mode: LLM(path, async_scheduling=mode == "async", **KW).engine for mode in ("sync", "async")}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_request_that_cannot_be_prepared_fails_alone(engines, mode, monkeypatch, caplog):
    engine = engines[mode]
    expected, _ = run(engine, {k: v for k, v in PROMPTS.items() if k != "bad"})
    fail_adding(monkeypatch)
    tokens, reasons = run(engine, {f"{k}2": v for k, v in PROMPTS.items()} | {"bad": PROMPTS["bad"]})
    assert reasons["bad"] == "error" and tokens["bad"] == []
    assert {k: tokens[k + "2"] for k in expected} == expected  # the others are unaffected
    assert reasons["a2"] == reasons["c2"] == "length"
    assert engine.kv.num_free_blocks == engine.num_blocks
    assert SECRET in caplog.text and "request bad" in caplog.text
    monkeypatch.undo()
    assert run(engine, {"again": PROMPTS["a"]})[0]["again"] == expected["a"]  # still serving


def test_an_error_outside_any_request_propagates_from_step(engines, monkeypatch):
    engine = engines["sync"]
    monkeypatch.setattr(ModelRunner, "_forward", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError(SECRET)))
    engine.add_request("x", PROMPTS["a"], GREEDY)
    with pytest.raises(RuntimeError, match=SECRET):
        engine.step()


class Recorder:
    def __init__(self):
        self.records = []

    def record(self, sched, it):
        self.records.append((sched, it))


@pytest.fixture
def async_llm(tiny_model_dir):
    from kubeinfer.engine.llm_engine import LLMEngine

    llm = LLM(str(tiny_model_dir("llama")), **KW)  # for its config
    return AsyncLLM(LLMEngine(llm.engine.config))


async def collect(llm, rid, ids, params=GREEDY):
    return [t async for out in llm.generate(ids, params, rid) for t in out.new_token_ids]


def test_async_llm_fails_one_stream_and_serves_the_rest(async_llm, monkeypatch, caplog):
    fatal = []
    async_llm.on_fatal = fatal.append
    fail_adding(monkeypatch)

    async def main():
        async_llm.start()
        results = await asyncio.gather(collect(async_llm, "a", PROMPTS["a"]),
                                       collect(async_llm, "bad", PROMPTS["bad"]),
                                       return_exceptions=True)
        await async_llm.shutdown()
        return results

    good, bad = asyncio.run(main())
    assert isinstance(bad, RequestFailedError) and SECRET not in str(bad)
    assert "request bad" in str(bad) and len(good) == GREEDY.max_tokens
    assert fatal == [] and SECRET in caplog.text


def test_async_llm_an_unattributable_error_fails_every_stream_and_calls_the_exit_hook(
        async_llm, monkeypatch):
    fatal = []
    async_llm.on_fatal = fatal.append
    monkeypatch.setattr(ModelRunner, "_forward", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError(SECRET)))

    async def main():
        async_llm.start()
        results = await asyncio.gather(collect(async_llm, "a", PROMPTS["a"]),
                                       collect(async_llm, "c", PROMPTS["c"]),
                                       return_exceptions=True)
        with pytest.raises(EngineDeadError):  # later requests are refused at once
            await collect(async_llm, "late", PROMPTS["a"])
        await asyncio.to_thread(async_llm._thread.join, 30)  # the thread ends with the hook
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, EngineDeadError) and SECRET not in str(r) for r in results)
    assert len(fatal) == 1 and SECRET in str(fatal[0]) and not async_llm.is_alive()


def test_gauges_return_to_zero_after_the_last_abort(tiny_model_dir):
    from kubeinfer.engine.llm_engine import LLMEngine

    recorder = Recorder()
    config = LLM(str(tiny_model_dir("llama")), async_scheduling=True, **KW).engine.config
    engine = LLMEngine(config, [recorder])
    for i in range(6):  # 6 x 3 blocks, more than the 16 there are: some wait
        engine.add_request(str(i), list(range(3 + 40 * i, 40 + 40 * i)),
                           SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    sched = recorder.records[-1][0]
    assert sched.num_running_reqs > 0 and sched.num_waiting_reqs > 0 and sched.kv_cache_usage > 0
    for i in range(6):
        engine.abort_request(str(i))
    sched = recorder.records[-1][0]
    assert (sched.num_running_reqs, sched.num_waiting_reqs, sched.kv_cache_usage) == (0, 0, 0.0)


def test_prompt_tokens_count_whole_prompts_and_hits_are_reported_apart(tiny_model_dir):
    from kubeinfer.engine.llm_engine import LLMEngine

    recorder = Recorder()
    engine = LLMEngine(LLM(str(tiny_model_dir("llama")), **KW).engine.config, [recorder])
    prompt = list(range(3, 60))  # 57 tokens: three full blocks of 16 can be hits the second time
    for rid in ("first", "second"):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=2))
        while engine.has_unfinished_requests():
            engine.step()
    assert sum(it.num_prompt_tokens for _, it in recorder.records) == 2 * len(prompt)
    assert sum(s.prefix_cache_hits for s, _ in recorder.records) == 48
