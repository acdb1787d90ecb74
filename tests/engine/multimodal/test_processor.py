"""The processor path on tiny LLaVA 1.5, LLaVA-NeXT and Idefics3 (SmolVLM) folders: expanded ids
and pixel values equal the HF processor's, placeholder ranges agree with each image processed
alone, and the preprocessor's chat / prompt entry points and their refusals."""
from __future__ import annotations

import base64
import io

import pytest
import torch

from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.multimodal import MultiModalConfig, MultiModalPreprocessor
from kubeinfer.engine.multimodal.processor import MultiModalProcessor, is_multimodal_model
from tests.fixtures.tiny_vlm import make_image

# odd sizes: LLaVA-NeXT picks a different grid for each, Idefics3 a different tiling
IMAGES = [(37, 53), (61, 19), (23, 23)]
FAMILIES = ("llava", "llava_next", "idefics3")


@pytest.fixture(scope="module")
def processors(tiny_vlm_dir):
    return {f: MultiModalProcessor.from_pretrained(tiny_vlm_dir(f)) for f in FAMILIES}


def hf_processor(folder):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(folder), backend="pil")


def conversation(n_images: int):
    parts = [{"type": "text", "text": "Compare"}]
    for i in range(n_images):
        parts += [{"type": "image"}, {"type": "text", "text": f" picture {i} "}]
    return [{"role": "user", "content": parts}]


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_and_pixels_equal_the_hf_processor(family, processors, tiny_vlm_dir):
    hf = hf_processor(tiny_vlm_dir(family))
    images = [make_image(w, h, seed) for seed, (w, h) in enumerate(IMAGES)]
    prompt = processors[family].render_chat(conversation(len(images)))
    assert prompt == hf.apply_chat_template(conversation(len(images)), tokenize=False,
                                            add_generation_prompt=True)
    ours = processors[family].process(prompt, images, add_special_tokens=False)
    ref = hf(text=[prompt], images=[images], add_special_tokens=False, return_tensors="pt")
    assert ours.prompt_token_ids == ref["input_ids"][0].tolist()
    # per-image encoder inputs put back together are the processor's tensors, bit for bit
    for key, value in ref.items():
        if key in ("input_ids", "attention_mask"):
            continue
        parts = [f.encoder_inputs[key] for f in ours.features]
        dim = 1 if family == "idefics3" else 0  # Idefics3: [1, tiles, ...]
        assert torch.equal(torch.cat(parts, dim=dim), value), key


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_ranges_match_each_image_processed_alone(family, processors):
    proc = processors[family]
    images = [make_image(w, h, seed) for seed, (w, h) in enumerate(IMAGES)]
    out = proc.process(proc.render_chat(conversation(len(images))), images, add_special_tokens=False)
    ids = out.prompt_token_ids
    embed_positions = []
    for img, f in zip(images, out.features):
        alone = proc.hf(text=[proc.placeholder], images=[[img]], return_tensors="pt")
        assert f.placeholder.num_embeds == alone["input_ids"][0].tolist().count(proc.image_token_id)
        ph = f.placeholder
        mask = ph.is_embed or (True,) * ph.length
        embed_positions += [ph.offset + k for k in range(ph.length) if mask[k]]
        assert ids[ph.offset] == ids[ph.end - 1] == proc.image_token_id
    assert embed_positions == [i for i, t in enumerate(ids) if t == proc.image_token_id]
    spans = [(f.placeholder.offset, f.placeholder.end) for f in out.features]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    if family == "llava_next":  # the token count follows the image size
        assert len({f.placeholder.num_embeds for f in out.features}) > 1
    if family == "idefics3":  # row/column markers inside a split image stay text
        assert out.features[0].placeholder.is_embed is not None


def test_placeholder_count_must_match_the_images(processors):
    proc = processors["llava"]
    with pytest.raises(RequestError, match="1 image placeholder.*2 image") as e:
        proc.process("USER: <image> hi", [make_image(5, 5, 0), make_image(5, 5, 1)])
    assert e.value.param == "prompt"


# ---- the preprocessor: chat and prompt entry points on its thread pool ----
def png_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def preprocessor(tiny_vlm_dir):
    pre = MultiModalPreprocessor.from_model(tiny_vlm_dir("llava"),
                                            MultiModalConfig(limit_per_prompt={"image": 2}),
                                            model_name="tiny-llava")
    yield pre
    pre.close()


def test_chat_with_data_urls_equals_processing_the_images(preprocessor):
    a, b = make_image(31, 17, 7), make_image(17, 31, 8)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(a)}},
        {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": png_data_url(b)}}]}]
    got = preprocessor.submit_chat(messages).result(timeout=60)
    proc = preprocessor.processor
    want = proc.process(proc.render_chat([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}]), [a, b],
        add_special_tokens=False)
    assert got.prompt_token_ids == want.prompt_token_ids
    assert [f.image_hash for f in got.features] == [f.image_hash for f in want.features]
    assert got.features[0].image_hash != got.features[1].image_hash


def test_generate_with_multi_modal_data(preprocessor):
    img = make_image(29, 41, 9)
    got = preprocessor.process_prompt("USER: <image>\nWhat is it? ASSISTANT:", {"image": img})
    assert len(got.features) == 1 and got.features[0].placeholder.num_embeds == 4
    with pytest.raises(RequestError, match="modality 'video'"):
        preprocessor.process_prompt("x", {"video": img})
    with pytest.raises(RequestError, match="3 images, more than"):
        preprocessor.process_prompt("<image>" * 3, {"image": [img] * 3})
    with pytest.raises(RequestError, match="must be a PIL image or a URL") as e:
        preprocessor.process_prompt("<image>", {"image": [b"raw"]})
    assert e.value.param == "multi_modal_data.image.0"


def test_bad_image_in_a_chat_surfaces_from_the_future(preprocessor):
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}]}]
    future = preprocessor.submit_chat(messages)
    with pytest.raises(RequestError, match="corrupt") as e:
        future.result(timeout=60)
    assert e.value.param == "messages.0.content.0.image_url.url"
    # the pool is still serving after a failed request
    url = png_data_url(make_image(8, 8, 1))
    ok = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    assert preprocessor.submit_chat(ok).result(timeout=60).features


def test_text_only_model_refuses_images(tiny_model_dir):
    folder = tiny_model_dir("llama")
    assert not is_multimodal_model(folder)
    pre = MultiModalPreprocessor.from_model(folder, model_name="tiny-llama")
    try:
        assert not pre.is_multimodal
        part = {"type": "image_url", "image_url": {"url": png_data_url(make_image(4, 4, 0))}}
        with pytest.raises(RequestError, match="tiny-llama is a text-only model") as e:
            pre.submit_chat([{"role": "user", "content": [part]}])
        assert e.value.param == "messages.0.content.0.image_url.url"
        with pytest.raises(RequestError, match="text-only"):
            pre.process_prompt("hi", {"image": make_image(4, 4, 0)})
    finally:
        pre.close()


def test_concurrent_requests_each_get_their_own_result(preprocessor):
    images = [make_image(11 + i, 13, 20 + i) for i in range(4)]
    futures = [preprocessor.submit_prompt("USER: <image> ASSISTANT:", {"image": img})
               for img in images]
    hashes = [f.result(timeout=60).features[0].image_hash for f in futures]
    assert hashes == [preprocessor.processor.process("<image>", [img]).features[0].image_hash
                      for img in images]
    assert len(set(hashes)) == 4


def test_a_processor_bug_is_a_request_failure_not_a_crash():
    from kubeinfer.engine.errors import RequestFailedError

    class Broken:
        def render_chat(self, *args):
            raise KeyError("template variable")

    pre = MultiModalPreprocessor(Broken(), model_name="broken")
    try:
        part = {"type": "image_url", "image_url": {"url": png_data_url(make_image(4, 4, 0))}}
        with pytest.raises(RequestFailedError, match="preprocessing the request's images failed"):
            pre.submit_chat([{"role": "user", "content": [part]}]).result(timeout=60)
    finally:
        pre.close()
