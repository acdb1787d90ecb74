"""prompt_logprobs against HF transformers: every prompt token's raw logprob, rank and the top-k of
its position, through chunked prefill, prefix caching, preemption, async scheduling and n > 1."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from kubeinfer import LLM, SamplingParams
from kubeinfer.engine.outputs import Logprob
from kubeinfer.engine.sampling_params import SamplingParamsError
from tests.engine.test_consistency import VARIANTS  # the same engine settings as the token checks

TOL = 1e-4
KW = dict(dtype="float32", block_size=16)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    path = tiny_model_dir("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return str(path), hf


def hf_logprobs(hf, prompt) -> torch.Tensor:
    """[len(prompt), vocab] float32: row p is log_softmax of the logits at position p."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)


def make_prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 500, (37,), generator=g).tolist()  # over two blocks: cacheable
    prompts = [shared + torch.randint(3, 500, (n,), generator=g).tolist() for n in (1, 11)]
    prompts += [torch.randint(3, 500, (n,), generator=g).tolist() for n in (2, 9, 30)]
    return prompts


def check(prompt_logprobs, prompt, ref, k):
    """Each entry against HF: the prompt token's logprob and rank, the top-k ids and logprobs."""
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for p in range(1, len(prompt)):
        entry, row, token = prompt_logprobs[p], ref[p - 1], prompt[p]
        assert all(isinstance(v, Logprob) for v in entry.values())
        assert next(iter(entry)) == token  # the prompt token comes first
        target = row[token].item()
        assert entry[token].logprob == pytest.approx(target, abs=TOL)
        # its true rank; logprobs within TOL of it may fall either way
        lo = int((row > target + TOL).sum()) + 1
        hi = int((row >= target - TOL).sum())
        assert lo <= entry[token].rank <= hi
        top = sorted((lp.rank, t) for t, lp in entry.items() if lp.rank <= k)
        assert [t for _, t in top] == row.topk(k).indices.tolist()
        assert set(entry) == {token} | {t for _, t in top}
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(row[t].item(), abs=TOL)
            assert lp.decoded_token is not None




@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prompt_logprobs_match_hf(model, variant):
    path, hf = model
    prompts = make_prompts()
    refs = [hf_logprobs(hf, p) for p in prompts]
    llm = LLM(path, **KW, **VARIANTS[variant])
    ks = [3, 0, 5, 1, 20]
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=k)
              for k in ks]
    # twice: the second round finds every prompt in the prefix cache, and must not use it
    for _ in range(2):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        for out, prompt, ref, k in zip(outs, prompts, refs, ks):
            check(out.prompt_logprobs, prompt, ref, k)
            assert out.num_cached_tokens == 0
    engine = llm.engine
    assert engine.kv.num_free_blocks == engine.num_blocks


def test_single_token_prompt(model):
    path, _ = model
    out = LLM(path, **KW).generate({"prompt_token_ids": [42]},
                                   SamplingParams(max_tokens=2, prompt_logprobs=2))[0]
    assert out.prompt_logprobs == [None]


def test_requests_without_them_are_unchanged_and_keep_the_prefix_cache(model):
    path, hf = model
    prompts = make_prompts(1)
    plain = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True, logprobs=2)
    asking = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)

    def summary(outs):
        return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].logprobs) for o in outs]

    alone = summary(LLM(path, **KW).generate([{"prompt_token_ids": p} for p in prompts], plain))
    llm = LLM(path, **KW)
    for _ in range(2):
        # every other request asks for prompt logprobs; the rest must not notice
        params = [asking if i % 2 else plain for i in range(len(prompts))]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        assert summary(outs[0::2]) == alone[0::2]
        assert all(o.prompt_logprobs is None for o in outs[0::2])
        for i in range(1, len(prompts), 2):
            check(outs[i].prompt_logprobs, prompts[i], hf_logprobs(hf, prompts[i]), 2)
    assert outs[0].num_cached_tokens >= 32  # the plain request still hits the cache


def test_n_samples_all_get_them_computed_once(model):
    path, hf = model
    prompt = make_prompts(2)[4]
    engine = LLM(path, **KW, max_num_batched_tokens=7).engine
    engine.add_request("r", prompt, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=3,
                                                   ignore_eos=True, prompt_logprobs=4))
    computing = [r for r in engine.scheduler.waiting if r.prompt_logprobs is not None]
    assert [r.req_id for r in computing] == ["r#0"]  # only the first sample computes them
    firsts = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.index not in firsts:
                firsts[out.index] = out
            else:
                assert out.prompt_logprobs is None  # only with each sample's first output
    assert sorted(firsts) == [0, 1, 2]
    ref = hf_logprobs(hf, prompt)
    for out in firsts.values():
        check(out.prompt_logprobs, prompt, ref, 4)
    # the other samples read the prompt from the prefix cache instead of computing it again
    assert firsts[1].num_cached_tokens > 0 and firsts[2].num_cached_tokens > 0


@pytest.mark.parametrize("chunked", [False, True])
def test_async_scheduling_gives_the_sync_outputs(model, chunked):
    path, _ = model
    kw = dict(KW, max_num_batched_tokens=7 if chunked else 8192)
    prompts = make_prompts(3)
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=5, n=1 + i % 2, ignore_eos=True,
                             logprobs=1, prompt_logprobs=None if i == 2 else i)
              for i in range(len(prompts))]

    def run(llm):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return [(o.prompt_logprobs, [(c.token_ids, c.logprobs) for c in o.outputs]) for o in outs]

    sync = run(LLM(path, **kw))
    assert sync[0][0] is not None and sync[2][0] is None
    assert run(LLM(path, async_scheduling=True, **kw)) == sync


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True, "3"])
def test_bad_values_are_refused(bad):
    with pytest.raises(SamplingParamsError, match="prompt_logprobs must be an integer between 0 "
                                                  "and 20") as e:
        SamplingParams(prompt_logprobs=bad)
    assert e.value.param == "prompt_logprobs"


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preempted_in_the_middle_of_its_prompt(model, async_scheduling):
    """A request preempted while collecting its prompt logprobs resumes from the prefix cache only
    up to what it has collected, and computes the rest."""
    path, hf = model
    g = torch.Generator().manual_seed(4)
    first, second = (torch.randint(3, 500, (n,), generator=g).tolist() for n in (30, 70))
    engine = LLM(path, **KW, max_model_len=80, num_gpu_blocks_override=7,
                 max_num_batched_tokens=7, async_scheduling=async_scheduling).engine
    engine.add_request("a", first, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.add_request("b", second, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                   prompt_logprobs=3))
    req = engine.scheduler.requests["b"]
    preempted_mid_prompt = False
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
        if req.num_preemptions and req.prompt_logits_start is not None:
            preempted_mid_prompt = True
    assert preempted_mid_prompt
    check(outs["b"][0].prompt_logprobs, second, hf_logprobs(hf, second), 3)
    assert engine.kv.num_free_blocks == engine.num_blocks


def test_prefix_cache_hits_stop_where_the_collected_logprobs_end():
    """No model: the KV manager serves a prompt_logprobs request no cached block whose positions'
    logits it still needs, and a position that arrives twice is kept once."""
    from kubeinfer.engine.kv_cache.manager import KVCacheManager
    from kubeinfer.engine.request import Request

    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(10, 30))
    warm = Request("warm", prompt, SamplingParams(max_tokens=1))
    assert kv.allocate_slots(warm, len(prompt))  # registers the prompt's 5 full blocks
    assert kv.get_computed_blocks(Request("plain", prompt, SamplingParams()))[1] == 16

    req = Request("r", prompt, SamplingParams(prompt_logprobs=1))
    assert req.prompt_logits_start == 0 and kv.get_computed_blocks(req) == ([], 0)
    row = (-1.0, 1, [(5, -1.0)])
    req.add_prompt_logprobs(0, [row] * 9)  # logits of positions 0..8 collected
    assert req.prompt_logits_start == 9 and kv.get_computed_blocks(req)[1] == 8
    req.add_prompt_logprobs(6, [row] * 5)  # 6..8 again, then 9 and 10
    assert len(req.prompt_logprobs) == 11
    with pytest.raises(RuntimeError, match="arrived before"):
        req.add_prompt_logprobs(13, [row])
    req.add_prompt_logprobs(11, [row] * 8)  # through position 18: the last one samples
    assert req.prompt_logits_start is None and kv.get_computed_blocks(req)[1] == 16
