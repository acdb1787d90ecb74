"""Images through the OpenAI API on a tiny Qwen2.5-VL: greedy token ids through the server equal
HF transformers' `generate` on the processor's output (M-RoPE positions from image_grid_thw)."""
from __future__ import annotations

import pytest
import torch

from kubeinfer.engine.multimodal.qwen2_vl_processor import load_qwen2_vl_processor
from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from tests.fixtures.tiny_vlm import make_image, save_tiny_vlm_weights
from tests.server.conftest import start_server, tiny_config
from tests.server.test_vlm_http import MAX_NEW, chat, data_url, messages, png_bytes

pytest.importorskip("PIL", reason="pillow is a dependency: pip install pillow")


@pytest.fixture(scope="module")
def qwen(tiny_vlm_dir):
    folder = tiny_vlm_dir("qwen2_5_vl")
    model = save_tiny_vlm_weights(folder, "qwen2_5_vl")
    return folder, model, load_qwen2_vl_processor(folder, "qwen2_5_vl")


@pytest.fixture(scope="module")
def client(qwen):
    state = ModelLifecycle(tiny_config(qwen[0], allowed_media_domains=()), log_requests=False)
    running = start_server(state)
    yield running.client()
    running.stop()


def test_greedy_ids_equal_hf(qwen, client):
    _, model, proc = qwen
    imgs = [make_image(45, 31, 70), make_image(29, 60, 71)]
    template_msgs = messages(["x"] * len(imgs))
    for part in template_msgs[0]["content"]:
        if part["type"] == "image_url":
            part.clear()
            part["type"] = "image"
    prompt = proc.apply_chat_template(template_msgs, tokenize=False, add_generation_prompt=True)
    inputs = proc(text=[prompt], images=[imgs], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    want = want[0, inputs["input_ids"].shape[1]:].tolist()
    assert chat(client, messages([data_url(png_bytes(img)) for img in imgs])) == want
