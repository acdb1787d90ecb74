"""Gemma 3 and PaliGemma (1 and 2) end to end through `LLM`: greedy token ids equal HF
transformers' `generate` (its bidirectional masks: Gemma 3's images, PaliGemma's prefix; positions
from 1), for one image, two images and text only; prefix caching with two different images;
chunked prefill with a small budget (a span is never split); and a span longer than the step
budget refused with a message naming the flag.

The tiny models (tests/fixtures/tiny_gemma_vlm.py) are random float32 with a large std, so an
engine that ran them causally would give other tokens: `test_causal_attention_would_differ`
checks that.
"""
from __future__ import annotations

import pytest
import torch

from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.llm import LLM
from kubeinfer.engine.sampling_params import SamplingParams
from tests.engine.multimodal.conftest import cached_llms
from tests.fixtures.tiny_gemma_vlm import build_tiny_gemma_vlm, save_tiny_gemma_vlm_weights
from tests.fixtures.tiny_vlm import make_image

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


def images(n: int, seed: int = 0):
    sizes = [(37, 53), (61, 19), (23, 23)]
    return [make_image(*sizes[i % len(sizes)], seed + i) for i in range(n)]


def conversation(imgs, text: str = "Describe", pil: bool = True):
    parts = [{"type": "text", "text": text}]
    for i, img in enumerate(imgs):
        parts += [{"type": "image_pil", "image_pil": img} if pil else {"type": "image"},
                  {"type": "text", "text": f" picture {i} please"}]
    return [{"role": "user", "content": parts}]


def paligemma_prompt(n_images: int, text: str = "caption en") -> str:
    return "<image>" * n_images + text


@pytest.fixture(scope="module")
def vlm(smollm2_tokenizer_dir, tmp_path_factory):
    """family -> (folder, HF model, HF processor), built once per module."""
    import transformers

    built = {}

    def make(family: str):
        if family not in built:
            folder = build_tiny_gemma_vlm(family, smollm2_tokenizer_dir, tmp_path_factory.mktemp(family))
            model = save_tiny_gemma_vlm_weights(folder, family)
            proc = transformers.AutoProcessor.from_pretrained(str(folder), backend="pil")
            built[family] = (folder, model, proc)
        return built[family]

    return make


@pytest.fixture(scope="module")
def llms(vlm):
    with cached_llms(lambda family: vlm(family)[0], max_model_len=256,
                     kv_cache_memory=4 << 20) as make:
        yield make


def hf_inputs(family, proc, imgs, text="Describe"):
    if family == "gemma3":
        prompt = proc.apply_chat_template(conversation(imgs, text, pil=False), tokenize=False,
                                          add_generation_prompt=True)
        return proc(text=[prompt], images=[imgs] if imgs else None, add_special_tokens=False,
                    return_tensors="pt")
    return proc(text=[paligemma_prompt(len(imgs), text)], images=[imgs], return_tensors="pt")


def hf_greedy(model, inputs) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def ours(family, llm, imgs, text="Describe"):
    if family == "gemma3":
        return llm.chat(conversation(imgs, text), GREEDY)[0]
    data = {"image": imgs if len(imgs) > 1 else imgs[0]}
    return llm.generate({"prompt": paligemma_prompt(len(imgs), text), "multi_modal_data": data},
                        GREEDY)[0]


@pytest.mark.parametrize("family,n_images", [("gemma3", 1), ("gemma3", 2), ("gemma3", 0),
                                             ("paligemma", 1),
                                             ("paligemma2", 1)])
def test_greedy_ids_equal_hf(family, n_images, vlm, llms):
    _, model, proc = vlm(family)
    imgs = images(n_images)
    want = hf_greedy(model, hf_inputs(family, proc, imgs))
    assert ours(family, llms(family), imgs).outputs[0].token_ids == want


def test_paligemma_text_only_is_one_prefix(vlm, llms):
    # No image: the prompt is still PaliGemma's bidirectional prefix (HF: token_type_ids 0).
    folder, model, proc = vlm("paligemma")
    ids = proc.tokenizer("<bos>caption en\n", add_special_tokens=False)["input_ids"]
    inputs = {"input_ids": torch.tensor([ids]), "token_type_ids": torch.zeros(1, len(ids),
                                                                              dtype=torch.long)}
    want = hf_greedy(model, inputs)
    out = llms("paligemma").generate({"prompt_token_ids": ids}, GREEDY)
    assert out[0].outputs[0].token_ids == want


@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_causal_attention_would_differ(family, vlm, llms, monkeypatch):
    """The same engine with the model's spans taken away (every token causal) gives other
    tokens than HF: the tests above do see the bidirectional masks."""
    _, model, proc = vlm(family)
    imgs = images(1)
    want = hf_greedy(model, hf_inputs(family, proc, imgs))
    llm = llms(family)
    monkeypatch.setattr(llm.engine.model, "bidirectional_spans", lambda n, features: [],
                        raising=False)
    assert ours(family, llm, imgs).outputs[0].token_ids != want


@pytest.mark.parametrize("family", ["gemma3", "paligemma2"])
def test_the_other_window_rule_would_differ(family, vlm, llms, monkeypatch):
    """Gemma 3 ANDs its sliding window over the image spans, PaliGemma 2 ORs its prefix over the
    window: the other way round gives other tokens, so the tests above see the difference. (A
    picture and text of its own: the blocks this run caches are keyed by them, so no other test
    reuses them.)"""
    from kubeinfer.engine.layers.attention import get_attention_layers

    _, model, proc = vlm(family)
    imgs = images(1, seed=77)
    text = "Describe the colours, the shapes and the mood of this picture in a few words"
    want = hf_greedy(model, hf_inputs(family, proc, imgs, text))
    llm = llms(family)
    for layer in get_attention_layers(llm.engine.model):
        monkeypatch.setattr(layer, "span_over_window", not layer.span_over_window)
    assert ours(family, llm, imgs, text).outputs[0].token_ids != want


@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_prefix_cache_keeps_two_images_apart(family, vlm, llms):
    _, model, proc = vlm(family)
    text = "Look closely at every detail of the following picture and then answer " * 2
    llm = llms(family)
    for seed in (11, 12):
        imgs = images(1, seed=seed)
        want = hf_greedy(model, hf_inputs(family, proc, imgs, text))
        out = ours(family, llm, imgs, text)
        assert out.outputs[0].token_ids == want
    if family == "gemma3":  # the shared text before the image came from the cache
        assert 0 < out.num_cached_tokens <= out.prompt_token_ids.index(
            llm.mm_preprocessor.processor.image_token_id)
    else:  # PaliGemma's prefix is one span: never half-cached
        assert out.num_cached_tokens == 0


def test_chunked_prefill_never_splits_an_image(vlm, llms):
    """Gemma 3 with a 7-token budget: the prompt needs several steps and budget-sized chunks
    would cut its 4-token images; chunks stop before them, so the tokens are still HF's."""
    _, model, proc = vlm("gemma3")
    imgs = images(2, seed=3)
    inputs = hf_inputs("gemma3", proc, imgs)
    llm = llms("gemma3", max_num_batched_tokens=7, max_num_seqs=2, enable_prefix_caching=False)
    out = ours("gemma3", llm, imgs)
    assert out.outputs[0].token_ids == hf_greedy(model, inputs)
    ranges = [(f.placeholder.offset, f.placeholder.end)
              for f in llm.mm_preprocessor.chat(conversation(imgs)).features]
    assert any(s < k < e for s, e in ranges for k in range(7, len(out.prompt_token_ids), 7))


def test_a_prefix_waits_for_room_rather_than_split(vlm, llms):
    """PaliGemma, two prompts at once under a 16-token budget that holds only one of them: the
    second waits for a step with room for its whole prefix; both are HF's."""
    _, model, proc = vlm("paligemma")
    llm = llms("paligemma", max_num_batched_tokens=16, max_num_seqs=2,
               enable_prefix_caching=False)
    cases = [images(2, seed=5), images(2, seed=8)]
    prompts = [{"prompt": paligemma_prompt(2, "cap"), "multi_modal_data": {"image": imgs}}
               for imgs in cases]
    outs = llm.generate(prompts, GREEDY)
    assert 2 * len(outs[0].prompt_token_ids) > 16
    for imgs, out in zip(cases, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, hf_inputs("paligemma", proc, imgs,
                                                                      "cap"))


def test_span_longer_than_the_budget_is_refused(vlm, llms):
    llm = llms("paligemma", max_num_batched_tokens=16, max_num_seqs=2,
               enable_prefix_caching=False)
    with pytest.raises(RequestError, match="--max-num-batched-tokens"):
        llm.generate({"prompt": paligemma_prompt(1, "a long prompt " * 6),
                      "multi_modal_data": {"image": images(1)[0]}}, GREEDY)
    # the engine goes on
    assert ours("paligemma", llm, images(1), "cap").outputs[0].token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family,n_images,budget", [("gemma3", 2, 7), ("gemma3", 1, 512),
                                                    ("paligemma2", 1, 512)])
def test_gpu_greedy_ids_equal_hf(family, n_images, budget, vlm):
    """The Triton kernel's span path (Gemma 3's window over images, PaliGemma 2's prefix over its
    window) in the engine, CUDA graphs for the decodes; HF runs on the CPU."""
    folder, model, proc = vlm(family)
    imgs = images(n_images, seed=30)
    want = hf_greedy(model, hf_inputs(family, proc, imgs))
    llm = LLM(str(folder), dtype="float32", device="cuda", max_model_len=256, block_size=16,
              max_num_batched_tokens=budget)
    try:
        assert ours(family, llm, imgs).outputs[0].token_ids == want
    finally:
        llm.shutdown()
