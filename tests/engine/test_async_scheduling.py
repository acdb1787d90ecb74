"""Async scheduling (step N+1 launched before step N's tokens are read) gives exactly the outputs of
the synchronous engine: stops seen one step late never leak a token, and the pool ends whole."""
import pytest
import torch

from kubeinfer import LLM, SamplingParams

KW = dict(dtype="float32", max_model_len=128, num_gpu_blocks_override=12, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def llms(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    return LLM(path, **KW), LLM(path, async_scheduling=True, **KW)


def run(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    engine = llm.engine
    assert engine.kv.num_free_blocks == engine.num_blocks and not engine._in_flight
    return [[(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in r.outputs] for r in outs]


def prompts(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (int(torch.randint(4, 40, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def test_same_outputs_for_sampling_seeds_n_and_logprobs(llms):
    sync, async_ = llms
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, n=2, seed=5,
                            ignore_eos=True, logprobs=2)
    assert run(sync, prompts(), params) == run(async_, prompts(), params)


def test_stop_token_and_stop_string_seen_a_step_late_leak_nothing(llms):
    sync, async_ = llms
    ps = prompts(1)
    free = run(sync, ps, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    stop_ids = sorted({r[0][0][5] for r in free})[:3]
    stops = [r[0][1][3:6] for r in free if len(r[0][1]) > 8][:2]
    for params in (SamplingParams(temperature=0, max_tokens=16, stop_token_ids=stop_ids),
                   SamplingParams(temperature=0, max_tokens=16, stop=stops)):
        assert run(sync, ps, params) == run(async_, ps, params)


def test_penalties_fall_back_to_known_tokens(llms):
    sync, async_ = llms
    params = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3,
                            presence_penalty=0.5, frequency_penalty=0.3, ignore_eos=True)
    assert run(sync, prompts(2), params) == run(async_, prompts(2), params)


def test_aborts_and_preemption_keep_the_pool_whole(llms):
    _, async_ = llms
    engine = async_.engine
    for i, p in enumerate(prompts(3, 10)):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.7, max_tokens=30, ignore_eos=True))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if steps == 1:
            assert engine._in_flight  # a step is in flight while the host goes on
        if steps in (2, 5):
            engine.abort_request(f"r{steps}")
    assert engine.scheduler._num_preemptions > 0
    assert engine.kv.num_free_blocks == engine.num_blocks
    assert not engine.output_processor.parent_to_children


def test_default_is_on_for_cuda_off_for_cpu_and_the_flag_overrides_it(llms):
    import argparse

    from kubeinfer.engine.args import EngineArgs

    sync, async_ = llms
    assert sync.engine.config.scheduler.async_scheduling is False  # default on a CPU engine
    assert async_.engine.config.scheduler.async_scheduling is True
    p = argparse.ArgumentParser()
    EngineArgs.add_cli_args(p)
    for argv, want in (([], None), (["--async-scheduling"], True), (["--no-async-scheduling"], False)):
        cfg = EngineArgs.from_cli_args(p.parse_args(["m", *argv])).create_engine_config()
        assert cfg.scheduler.async_scheduling is want
