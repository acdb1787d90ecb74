"""LLaVA 1.5 and LLaVA-NeXT end to end through `LLM`: greedy token ids equal HF transformers'
`generate` on the processor's output (one image, two images, text only), prefix caching with two
different images after the same text, chunked prefill that cuts an image's placeholder, and the
refusals (an image for a text-only model, too many images)."""
from __future__ import annotations

import pytest
import torch

from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.llm import LLM
from kubeinfer.engine.sampling_params import SamplingParams
from tests.engine.multimodal.conftest import cached_llms
from tests.fixtures.tiny_vlm import make_image, save_tiny_vlm_weights

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


def conversation(n_images: int, text: str = "Describe", image_part=lambda i: {"type": "image"}):
    parts = [{"type": "text", "text": text}]
    for i in range(n_images):
        parts += [image_part(i), {"type": "text", "text": f" picture {i} please"}]
    return [{"role": "user", "content": parts}]


def images(n: int, seed: int = 0):
    sizes = [(37, 53), (61, 19), (23, 23)]
    return [make_image(*sizes[i % len(sizes)], seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def vlm(tiny_vlm_dir):
    """family -> (folder with random weights, the HF model, the HF processor)."""
    import transformers

    built = {}

    def make(family: str):
        if family not in built:
            folder = tiny_vlm_dir(family)
            model = save_tiny_vlm_weights(folder, family)
            proc = transformers.AutoProcessor.from_pretrained(str(folder), backend="pil")
            built[family] = (folder, model, proc)
        return built[family]

    return make


def hf_greedy(model, proc, n_images: int, imgs, text: str = "Describe") -> list[int]:
    prompt = proc.apply_chat_template(conversation(n_images, text), tokenize=False,
                                      add_generation_prompt=True)
    inputs = proc(text=[prompt], images=[imgs] if imgs else None, add_special_tokens=False,
                  return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def pil_part(imgs):
    return lambda i: {"type": "image_pil", "image_pil": imgs[i]}


@pytest.fixture(scope="module")
def llms(vlm):
    with cached_llms(lambda family: vlm(family)[0], max_model_len=512,
                     kv_cache_memory=8 << 20) as make:
        yield make


@pytest.mark.parametrize("family", ["llava", "llava_next", "idefics3"])
@pytest.mark.parametrize("n_images", [1, 2, 0])
def test_greedy_ids_equal_hf(family, n_images, vlm, llms):
    _, model, proc = vlm(family)
    imgs = images(n_images)
    want = hf_greedy(model, proc, n_images, imgs)
    out = llms(family).chat(conversation(n_images, image_part=pil_part(imgs)), GREEDY)
    assert out[0].outputs[0].token_ids == want


def test_generate_with_multi_modal_data(vlm, llms):
    _, model, proc = vlm("llava")
    imgs = images(1, seed=7)
    prompt = proc.apply_chat_template(conversation(1), tokenize=False, add_generation_prompt=True)
    want = hf_greedy(model, proc, 1, imgs)
    # the rendered template holds its special tokens; the processor adds none (BOS: none here)
    out = llms("llava").generate({"prompt": prompt, "multi_modal_data": {"image": imgs[0]}}, GREEDY)
    assert out[0].outputs[0].token_ids == want


@pytest.mark.parametrize("family", ["llava", "llava_next", "idefics3"])
def test_prefix_cache_keeps_two_images_apart(family, vlm, llms):
    """The same long text, then a different image: the second request may reuse the text's
    blocks but never the first image's, so its tokens are HF's for its own image."""
    _, model, proc = vlm(family)
    text = "Look closely at every detail of the following picture and then answer " * 3
    llm = llms(family)
    for seed in (11, 12):
        imgs = images(1, seed=seed)
        want = hf_greedy(model, proc, 1, imgs, text)
        out = llm.chat(conversation(1, text, pil_part(imgs)), GREEDY)
        assert out[0].outputs[0].token_ids == want
    # the shared text was served from the cache, the image's blocks were not
    assert out[0].num_cached_tokens > 0
    image_start = out[0].prompt_token_ids.index(llm.mm_preprocessor.processor.image_token_id)
    assert out[0].num_cached_tokens <= image_start


@pytest.mark.parametrize("family", ["llava", "llava_next", "idefics3"])
def test_chunked_prefill_splits_an_image(family, vlm, llms):
    """A step budget smaller than the prompt cuts the image's placeholder across steps; the
    encoder output is kept until the image's last position is computed."""
    _, model, proc = vlm(family)
    imgs = images(2, seed=3)
    want = hf_greedy(model, proc, 2, imgs)
    budget = {"llava": 6, "llava_next": 30, "idefics3": 24}[family]
    llm = llms(family, max_num_batched_tokens=budget, max_num_seqs=2, enable_prefix_caching=False)
    conv = conversation(2, image_part=pil_part(imgs))
    out = llm.chat(conv, GREEDY)
    assert out[0].outputs[0].token_ids == want
    # alone in the engine, the prompt runs in chunks of `budget`: a boundary falls in an image
    ranges = [f.placeholder for f in llm.mm_preprocessor.chat(conv).features]
    boundaries = range(budget, len(out[0].prompt_token_ids), budget)
    assert any(r.offset < k < r.end for r in ranges for k in boundaries)
    assert llm.engine.scheduler.encoder_cache.num_free == budget  # every output freed


def test_batched_requests_share_one_image(vlm, llms):
    """Two requests with the same image in one batch: one encoder output, both exact."""
    _, model, proc = vlm("llava")
    imgs = images(1, seed=21)
    want = hf_greedy(model, proc, 1, imgs)
    conv = conversation(1, image_part=pil_part(imgs))
    outs = llms("llava", enable_prefix_caching=False).chat([conv, conv], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [want, want]


@pytest.mark.parametrize("family", ["llava", "llava_next", "idefics3"])
def test_a_steps_images_run_in_one_encoder_call(family, vlm, llms):
    """Three requests with three different images start in one step: their images go to the
    vision side in one `embed_images` call (stacked where their inputs have one shape, grouped
    where not), and each request's ids still equal HF's for its own image."""
    _, model, proc = vlm(family)
    llm = llms(family, enable_prefix_caching=False)
    imgs = [images(1, seed=40 + i) for i in range(3)]
    want = [hf_greedy(model, proc, 1, img) for img in imgs]
    vlm_model = llm.engine.runner.model
    real, batches = vlm_model.embed_images, []

    def counting(encoder_inputs):
        batches.append(len(encoder_inputs))
        return real(encoder_inputs)

    vlm_model.embed_images = counting
    try:
        outs = llm.chat([conversation(1, image_part=pil_part(img)) for img in imgs], GREEDY)
    finally:
        del vlm_model.embed_images
    assert batches == [3]
    assert [o.outputs[0].token_ids for o in outs] == want


def test_too_many_images_is_refused(llms):
    llm = llms("llava")
    with pytest.raises(RequestError, match="limit"):
        llm.chat(conversation(9, image_part=pil_part(images(9))), GREEDY)


def test_image_for_a_text_only_model_is_refused(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", max_model_len=128,
              kv_cache_memory=4 << 20)
    try:
        with pytest.raises(RequestError, match="text-only"):
            llm.generate({"prompt": "hi <image>", "multi_modal_data": {"image": images(1)[0]}},
                         GREEDY)
    finally:
        llm.shutdown()


def test_a_failing_encoder_fails_its_request_alone(vlm, llms):
    """The vision tower raising on one request's image fails that request ("error"); the other
    request of the step is unchanged and the engine goes on. Both images are in one step: the
    batched call over them fails, then each image runs alone and only the bad one fails."""
    _, model, proc = vlm("llava")
    llm = llms("llava", enable_prefix_caching=False)
    bad, good = images(1, seed=31), images(1, seed=32)
    want = hf_greedy(model, proc, 1, good)
    vlm_model = llm.engine.runner.model
    real, calls, batches = vlm_model.embed_images, [], []  # bound before the patch below

    def first_call_fails(encoder_inputs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected encoder failure")
        return real([encoder_inputs])[0]

    def batch_fails(encoder_inputs):
        batches.append(len(encoder_inputs))
        raise RuntimeError("injected encoder failure")

    vlm_model.embed_image, vlm_model.embed_images = first_call_fails, batch_fails
    try:
        outs = llm.chat([conversation(1, image_part=pil_part(bad)),
                         conversation(1, image_part=pil_part(good))], GREEDY)
    finally:
        del vlm_model.embed_image, vlm_model.embed_images
    assert batches == [2] and len(calls) == 2  # one batched try, then one call per image
    assert outs[0].outputs[0].finish_reason == "error"
    assert outs[1].outputs[0].token_ids == want
    cache = llm.engine.scheduler.encoder_cache
    assert cache.num_free == cache.capacity
    again = llm.chat(conversation(1, image_part=pil_part(good)), GREEDY)
    assert again[0].outputs[0].token_ids == want


@pytest.mark.parametrize("kwargs, words", [
    (dict(limit_mm_per_prompt={"video": 1}), "modality"),
    (dict(limit_mm_per_prompt={"image": -1}), ">= 0"),
    (dict(allowed_local_media_path="/no/such/folder"), "existing folder"),
])
def test_bad_media_settings_fail_the_start(kwargs, words, vlm):
    from kubeinfer.engine.errors import ConfigError

    folder, _, _ = vlm("llava")
    with pytest.raises(ConfigError, match=words):
        LLM(str(folder), dtype="float32", max_model_len=512, kv_cache_memory=8 << 20, **kwargs)


def test_async_scheduling_with_images(vlm, llms):
    """The one-step-ahead loop (the CUDA default) with chunks that cut images and two requests:
    the same tokens as HF."""
    _, model, proc = vlm("llava")
    first, second = images(2, seed=51), images(1, seed=53)
    want = [hf_greedy(model, proc, 2, first), hf_greedy(model, proc, 1, second)]
    llm = llms("llava", async_scheduling=True, max_num_batched_tokens=6)
    assert llm.engine.config.scheduler.async_scheduling
    outs = llm.chat([conversation(2, image_part=pil_part(first)),
                     conversation(1, image_part=pil_part(second))], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == want
