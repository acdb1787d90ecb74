"""Strict consistency, as vLLM defines it: greedy token ids equal HF transformers' for the same model.

Tiny random-weight models are saved in HF layout and loaded through our real loader; prompts of
different lengths run batched, with prefix caching on and off, with chunked prefill forced by a small
token budget, and with preemption forced by a small KV cache.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from kubeinfer import LLM, SamplingParams

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
NUM_OUT = 12


def hf_greedy(model_dir, prompts, num_out=NUM_OUT):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gc = GenerationConfig(do_sample=False, max_new_tokens=num_out, min_new_tokens=num_out,
                          pad_token_id=0)
    gc.eos_token_id = None
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
            outs.append(out[0, len(p):].tolist())
    return outs


def make_prompts(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, vocab, (37,), generator=g).tolist()  # a shared prefix over 2 blocks
    prompts = [shared + torch.randint(3, vocab, (n,), generator=g).tolist() for n in (1, 9, 23)]
    prompts += [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 17, 50)]
    return prompts


VARIANTS = {
    "default": dict(),
    "no_prefix_caching": dict(enable_prefix_caching=False),
    "chunked_prefill": dict(max_num_batched_tokens=7),
    "preemption": dict(max_model_len=80, num_gpu_blocks_override=8, max_num_seqs=6),
    "async": dict(async_scheduling=True),
    "async_chunked_preempt": dict(async_scheduling=True, max_num_batched_tokens=7,
                                  max_model_len=80, num_gpu_blocks_override=8, max_num_seqs=6),
}


@pytest.fixture(scope="module")
def cases(tiny_model_dir):
    out = {}
    for arch in ARCHS:
        path = tiny_model_dir(arch)
        vocab = AutoModelForCausalLM.from_pretrained(path).config.vocab_size
        prompts = make_prompts(vocab)
        out[arch] = (path, prompts, hf_greedy(path, prompts))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf(cases, arch, variant):
    path, prompts, expected = cases[arch]
    llm = LLM(str(path), dtype="float32", block_size=16, **VARIANTS[variant])
    # the same prompts twice: the second round hits the prefix cache built by the first
    # min_tokens masks EOS exactly as HF's min_new_tokens does
    params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
    for _ in range(2):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        assert [o.outputs[0].token_ids for o in outs] == expected
    engine = llm.engine
    assert engine.kv.num_free_blocks == engine.num_blocks
    if variant == "default":
        assert outs[1].num_cached_tokens >= 32


def test_preemption_really_happens(cases):
    path, prompts, expected = cases["llama"]
    llm = LLM(str(path), dtype="float32", **VARIANTS["preemption"])
    params = SamplingParams(temperature=0.0, max_tokens=NUM_OUT, min_tokens=NUM_OUT)
    preempted = []
    for i, p in enumerate(prompts):
        llm.engine.add_request(str(i), p, params)
    tokens = {str(i): [] for i in range(len(prompts))}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            tokens[out.request_id] += out.new_token_ids
        preempted.append(llm.engine.scheduler._num_preemptions)
    assert any(preempted), "the small cache should have forced a preemption"
    assert [tokens[str(i)] for i in range(len(prompts))] == expected
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
