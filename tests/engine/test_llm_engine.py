"""The engine end to end on CPU: n > 1, seeds, stop strings, logprobs, aborts, and a whole pool after."""
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from kubeinfer import LLM, SamplingParams
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.errors import RequestError


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), dtype="float32", max_model_len=128,
               num_gpu_blocks_override=12, max_num_batched_tokens=32)


def test_mix_of_finished_aborted_preempted_leaves_pool_whole(llm):
    engine = llm.engine
    g = torch.Generator().manual_seed(1)
    for i in range(10):
        ids = torch.randint(3, 500, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g)
        engine.add_request(str(i), ids.tolist(),
                           SamplingParams(temperature=0.7, max_tokens=30, ignore_eos=True, n=1 + i % 2))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if steps == 3:
            engine.abort_request("3")
            engine.abort_request("4")  # n=2: both samples go
        if steps == 6:
            engine.abort_request("9")
    assert engine.scheduler._num_preemptions > 0
    assert engine.kv.num_free_blocks == engine.num_blocks
    assert not engine.output_processor.parent_to_children


def test_n_samples_and_seeds(llm):
    p = SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=7, ignore_eos=True)
    a = llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, p)[0]
    b = llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, p)[0]
    assert len(a.outputs) == 3 and [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1  # distinct seeds, distinct samples


def test_logprobs_match_greedy_choice(llm):
    out = llm.generate({"prompt_token_ids": [9, 10, 11]},
                       SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 4
    for token, (lp, top) in zip(out.outputs[0].token_ids, lps):
        assert top[0][0] == token and abs(top[0][1] - lp) < 1e-5 and len(top) == 3
        assert top[0][1] >= top[1][1] >= top[2][1]


def test_stop_string_is_cut_and_request_freed(llm):
    tok = llm.get_tokenizer()
    free_out = llm.generate({"prompt_token_ids": [20, 21]},
                            SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    text = free_out.outputs[0].text
    assert len(text) > 4
    stop = text[2:4]
    out = llm.generate({"prompt_token_ids": [20, 21]},
                       SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0]
    assert out.outputs[0].text == text[:text.index(stop)]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
    assert tok is not None


def test_prompt_too_long_names_both_numbers(llm):
    with pytest.raises(RequestError, match=r"maximum context length is 128 tokens.*requested 140"):
        llm.engine.validate_request(list(range(3, 103)), SamplingParams(max_tokens=40))
    with pytest.raises(RequestError, match="empty"):
        llm.engine.validate_request([], SamplingParams())
    with pytest.raises(RequestError, match="out of vocabulary"):
        llm.engine.validate_request([10**7], SamplingParams())


def test_max_model_len_larger_than_cache_fails_at_start(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"max seq len \(128\) is larger than .* KV cache \(32\)"):
        LLM(str(tiny_model_dir("llama")), dtype="float32", max_model_len=128,
            num_gpu_blocks_override=2)


def test_smollm2_matches_hf_first_32_tokens(smollm2_dir):
    """The real default model: our greedy ids equal HF transformers' on the same converted weights."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
    llm = LLM(str(smollm2_dir), dtype="float32")
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in prompts]
    ours = llm.generate([{"prompt_token_ids": i} for i in ids],
                        # min_tokens masks EOS as HF's min_new_tokens does, so both run 32 tokens
                        SamplingParams(temperature=0, max_tokens=32, min_tokens=32))
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    gc = GenerationConfig(do_sample=False, max_new_tokens=32, min_new_tokens=32, pad_token_id=0)
    gc.eos_token_id = None
    for i, out in zip(ids, ours):
        x = torch.tensor([i])
        with torch.no_grad():
            ref = hf.generate(x, attention_mask=torch.ones_like(x), generation_config=gc)[0, len(i):]
        assert out.outputs[0].token_ids == ref.tolist()


def test_default_model_chat_names_paris():
    llm = LLM(dtype="float32")
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=30))[0]
    assert "Paris" in out.outputs[0].text


def test_kernel_warm_up_leaves_results_alone(tiny_model_dir):
    """The GPU start-up warm-up writes into free blocks; outputs must not change (run here on CPU)."""
    llm = LLM(str(tiny_model_dir("qwen3")), dtype="float32", max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = llm.generate({"prompt_token_ids": list(range(3, 40))}, params)[0].outputs[0].token_ids
    llm.engine.kv.pool.reset_prefix_cache()
    llm.engine.runner._warm_up_kernels(llm.engine.num_blocks)
    after = llm.generate({"prompt_token_ids": list(range(3, 40))}, params)[0].outputs[0].token_ids
    assert before == after and llm.engine.kv.num_free_blocks == llm.engine.num_blocks


def test_generation_config_defaults_and_overrides(tiny_model_dir):
    path = tiny_model_dir("llama")
    llm = LLM(str(path), dtype="float32", max_model_len=128,
              override_generation_config={"temperature": 0.0, "max_new_tokens": 5})
    params = llm.engine.default_sampling_params()
    assert params.temperature == 0.0 and params.max_tokens == 5
    out = llm.generate({"prompt_token_ids": [7, 8, 9]})[0].outputs[0]
    greedy = llm.generate({"prompt_token_ids": [7, 8, 9]},
                          SamplingParams(temperature=0, max_tokens=5))[0].outputs[0]
    assert out.token_ids == greedy.token_ids
    with pytest.raises(ConfigError, match=r"unknown keys \['temprature'\]"):
        LLM(str(path), override_generation_config={"temprature": 0.5})


def test_default_model_uses_its_model_card_sampling():
    from kubeinfer.engine.config import DEFAULT_MODEL_SAMPLING

    llm = LLM(dtype="float32", max_model_len=256)
    assert llm.engine.default_sampling == DEFAULT_MODEL_SAMPLING


@pytest.mark.parametrize("async_sched", [False, True], ids=["sync", "async"])
def test_priority_scheduling_with_preemption_gives_the_same_tokens(tiny_model_dir, async_sched):
    """Who waits and who is preempted changes with priority; what each request generates must not."""
    path = str(tiny_model_dir("llama"))
    kw = dict(dtype="float32", max_model_len=80, num_gpu_blocks_override=8, max_num_seqs=6,
              async_scheduling=async_sched)
    prompts = [{"prompt_token_ids": [5 + i] * (9 + 3 * i)} for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    fcfs = LLM(path, **kw).generate(prompts, params)
    llm = LLM(path, scheduling_policy="priority", **kw)
    ranked = llm.generate(prompts, params, priority=[3, -1, 0, 2, -1, 1])
    assert [o.outputs[0].token_ids for o in ranked] == [o.outputs[0].token_ids for o in fcfs]
    assert llm.engine.scheduler._num_preemptions > 0  # the small cache forced some
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks


def test_priority_needs_the_priority_policy(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", max_model_len=64)
    with pytest.raises(RequestError, match="--scheduling-policy priority") as e:
        llm.generate([{"prompt_token_ids": [5, 6]}], SamplingParams(max_tokens=2), priority=[1])
    assert e.value.param == "priority"


def _run(engine, requests, kind):
    """requests: id -> (prompt ids, params); every output of the run, by (request id, index)."""
    from dataclasses import replace

    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, replace(params, output_kind=kind))
    outs: dict[tuple[str, int], list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs.setdefault((out.request_id, out.index), []).append(out)
    return outs


def test_final_only_outputs_are_the_deltas_joined(llm):
    """RequestOutputKind.FINAL_ONLY: one output per sample, at the end, with the tokens, text
    (decoded once, or streamed where stop strings need it), logprobs and finish reason the
    deltas give together; n > 1 and seeded sampling included."""
    from kubeinfer import RequestOutputKind

    engine = llm.engine
    free = _run(engine, {"s": ([20, 21], SamplingParams(temperature=0, max_tokens=20,
                                                         ignore_eos=True))},
                RequestOutputKind.DELTA)
    text = "".join(o.new_text for o in free[("s", 0)])
    requests = {
        "plain": ([5, 6, 7], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)),
        "stop": ([20, 21], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                           stop=[text[2:4]])),
        "n": ([9, 10], SamplingParams(temperature=1.0, max_tokens=9, n=2, seed=3, logprobs=2,
                                      ignore_eos=True)),
        "eos": ([30, 31, 32], SamplingParams(temperature=0, max_tokens=10)),
    }
    deltas = _run(engine, requests, RequestOutputKind.DELTA)
    finals = _run(engine, requests, RequestOutputKind.FINAL_ONLY)
    assert set(finals) == set(deltas) == {("plain", 0), ("stop", 0), ("n", 0), ("n", 1),
                                          ("eos", 0)}
    for key, outs in deltas.items():
        [final] = finals[key]
        assert final.finished and outs[-1].finished
        assert final.new_token_ids == [t for o in outs for t in o.new_token_ids]
        assert final.new_text == "".join(o.new_text for o in outs)
        assert final.finish_reason == outs[-1].finish_reason
        assert final.stop_reason == outs[-1].stop_reason
        assert final.num_output_tokens == outs[-1].num_output_tokens
        if key[0] == "n":
            assert final.new_logprobs == [lp for o in outs for lp in o.new_logprobs]
            assert len(final.new_logprobs) == 9
        else:
            assert final.new_logprobs is None
    assert finals[("stop", 0)][0].finish_reason == "stop"
    assert finals[("stop", 0)][0].new_text == text[:text.index(text[2:4])]
    assert engine.kv.num_free_blocks == engine.num_blocks


def test_an_aborted_final_only_request_returns_what_it_had(llm):
    """An abort ends a final-only request with the tokens and text it had (a delta's last output
    is empty: its earlier ones carried them)."""
    from kubeinfer import RequestOutputKind

    engine = llm.engine
    engine.add_request("a", [5, 6, 7], SamplingParams(
        temperature=0, max_tokens=50, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY))
    seen = []
    while len(engine.scheduler.requests["a"].output_token_ids) < 5:
        seen += engine.step()
    assert not seen  # nothing before the end
    [out] = engine.abort_request("a")
    assert out.finished and out.finish_reason == "abort"
    n = len(out.new_token_ids)
    assert n >= 3 and all(t >= 0 for t in out.new_token_ids)  # no placeholder of a step in flight
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.num_free_blocks == engine.num_blocks
    same = _run(engine, {"b": ([5, 6, 7], SamplingParams(temperature=0, max_tokens=n,
                                                        ignore_eos=True))},
                RequestOutputKind.DELTA)[("b", 0)]
    assert [t for o in same for t in o.new_token_ids] == out.new_token_ids
    assert "".join(o.new_text for o in same) == out.new_text


def test_output_kind_is_checked():
    with pytest.raises(RequestError, match="output_kind must be RequestOutputKind"):
        SamplingParams(output_kind=0)
