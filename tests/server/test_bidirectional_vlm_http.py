"""Gemma 3 through the OpenAI API: greedy token ids through the server equal HF transformers'
`generate` with its bidirectional image masks (one image, as data URL), and a PaliGemma prompt
longer than the step budget is a 400 naming the flag to raise."""
from __future__ import annotations

import openai
import pytest
import torch

from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from tests.fixtures.tiny_gemma_vlm import build_tiny_gemma_vlm, save_tiny_gemma_vlm_weights
from tests.fixtures.tiny_vlm import make_image
from tests.server.conftest import MODEL_NAME, start_server, tiny_config
from tests.server.test_vlm_http import data_url, png_bytes

pytest.importorskip("PIL", reason="pillow is a dependency: pip install pillow")

MAX_NEW = 5


@pytest.fixture(scope="module")
def gemma3(smollm2_tokenizer_dir, tmp_path_factory):
    import transformers

    folder = build_tiny_gemma_vlm("gemma3", smollm2_tokenizer_dir, tmp_path_factory.mktemp("gemma3"))
    model = save_tiny_gemma_vlm_weights(folder, "gemma3")
    return folder, model, transformers.AutoProcessor.from_pretrained(str(folder), backend="pil")


@pytest.fixture(scope="module")
def client(gemma3):
    state = ModelLifecycle(tiny_config(gemma3[0], allowed_media_domains=()), log_requests=False)
    running = start_server(state)
    yield running.client()
    running.stop()


def test_greedy_ids_equal_hf(gemma3, client):
    _, model, proc = gemma3
    img = make_image(41, 27, 5)
    parts = [{"type": "text", "text": "Describe"}, {"type": "image"},
             {"type": "text", "text": " briefly"}]
    prompt = proc.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                      add_generation_prompt=True)
    inputs = proc(text=[prompt], images=[[img]], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    want = want[0, inputs["input_ids"].shape[1]:].tolist()
    parts[1] = {"type": "image_url", "image_url": {"url": data_url(png_bytes(img))}}
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": parts}], max_tokens=MAX_NEW,
        temperature=0.0, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert resp.choices[0].model_extra["token_ids"] == want


def test_span_longer_than_the_budget_is_a_400(smollm2_tokenizer_dir, tmp_path_factory):
    folder = build_tiny_gemma_vlm("paligemma", smollm2_tokenizer_dir, tmp_path_factory.mktemp("pali"))
    config = tiny_config(folder, load_format="dummy")  # no weights: the request never runs
    from dataclasses import replace

    config = replace(config, scheduler=replace(config.scheduler, max_num_batched_tokens=32))
    running = start_server(ModelLifecycle(config, log_requests=False))
    try:
        with pytest.raises(openai.BadRequestError, match="--max-num-batched-tokens") as info:
            running.client().completions.create(model=MODEL_NAME, prompt="word " * 40,
                                                max_tokens=2)
        assert info.value.status_code == 400
    finally:
        running.stop()
