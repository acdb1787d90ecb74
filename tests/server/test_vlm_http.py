"""Images through the OpenAI API on a tiny LLaVA: greedy token ids through the server equal HF
transformers' `generate` (one image, two images, text only), and bad media is a 400 with an OpenAI
error body naming the part (corrupt base64, a non-image data URL, a decompression bomb, a
disallowed URL, too many images, an image for a text-only model)."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import openai
import pytest
import torch

from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from tests.fixtures.tiny_vlm import make_image, save_tiny_vlm_weights
from tests.server.conftest import MODEL_NAME, start_server, tiny_config

pytest.importorskip("PIL", reason="pillow is a dependency: pip install pillow")

MAX_NEW = 5


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def bomb_png(width: int, height: int) -> bytes:
    """A small real PNG whose header then declares width x height."""
    data = bytearray(png_bytes(make_image(8, 8, 0)))
    ihdr = 16
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    body = bytes(data[ihdr - 4:ihdr + 13])
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return bytes(data)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def messages(urls: list[str], text: str = "Describe") -> list[dict]:
    parts = [{"type": "text", "text": text}]
    for i, url in enumerate(urls):
        parts += [image_part(url), {"type": "text", "text": f" picture {i}"}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def llava(tiny_vlm_dir):
    import transformers

    folder = tiny_vlm_dir("llava")
    model = save_tiny_vlm_weights(folder, "llava")
    return folder, model, transformers.AutoProcessor.from_pretrained(str(folder), backend="pil")


@pytest.fixture(scope="module")
def server(llava):
    # data URLs only, as the operator renders it; two images a prompt
    state = ModelLifecycle(tiny_config(llava[0], allowed_media_domains=(),
                                       limit_mm_per_prompt=(("image", 2),)),
                           log_requests=False)
    running = start_server(state)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def chat(client, msgs) -> list[int]:
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=msgs, max_tokens=MAX_NEW, temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    return resp.choices[0].model_extra["token_ids"]


@pytest.mark.parametrize("n_images", [1, 2, 0])
def test_greedy_ids_equal_hf(n_images, llava, client):
    _, model, proc = llava
    imgs = [make_image(31 + 7 * i, 45 - 9 * i, 40 + i) for i in range(n_images)]
    template_msgs = messages(["x"] * n_images)
    for part in template_msgs[0]["content"]:
        if part["type"] == "image_url":
            part.clear()
            part["type"] = "image"
    prompt = proc.apply_chat_template(template_msgs, tokenize=False, add_generation_prompt=True)
    inputs = proc(text=[prompt], images=[imgs] if imgs else None, add_special_tokens=False,
                  return_tensors="pt")
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    want = want[0, inputs["input_ids"].shape[1]:].tolist()
    assert chat(client, messages([data_url(png_bytes(img)) for img in imgs])) == want


BAD = {
    "corrupt base64": ("data:image/png;base64,iVBORw0KGgo!!!notbase64", "base64"),
    "not an image": (data_url(b"hello, world", "text/plain"), "image"),
    "image mime, text bytes": (data_url(b"hello, world"), "image"),
    "decompression bomb": (data_url(bomb_png(100_000, 100_000)), "pixels"),
    "disallowed URL": ("https://example.com/cat.png", "data"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_media_is_a_400_naming_the_part(case, client):
    url, words = BAD[case]
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, messages([url]))
    error = info.value.body
    assert info.value.status_code == 400
    assert words in error["message"].lower()
    assert error["param"] == "messages.0.content.1.image_url.url"
    assert error["type"] == "BadRequestError"


def test_too_many_images_is_a_400(client):
    url = data_url(png_bytes(make_image(20, 20, 1)))
    with pytest.raises(openai.BadRequestError, match="limit"):
        chat(client, messages([url] * 3))


def test_the_server_still_serves_after_bad_input(client):
    url = data_url(png_bytes(make_image(20, 20, 2)))
    assert len(chat(client, messages([url]))) == MAX_NEW


def test_image_for_a_text_only_model_is_a_400(server_factory):
    text_server = server_factory()
    url = data_url(png_bytes(make_image(20, 20, 3)))
    with pytest.raises(openai.BadRequestError, match="text-only"):
        chat(text_server.client(), messages([url]))
