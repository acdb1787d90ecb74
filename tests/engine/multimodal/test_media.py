"""Media parsing and every bad input: data URLs, decoding limits, fetch allow-lists, local files,
image counts, chat parts, config flags."""
from __future__ import annotations

import base64
import http.server
import io
import socket
import struct
import threading
import zlib

import pytest

from kubeinfer.engine.errors import ConfigError, RequestError
from kubeinfer.engine.multimodal.chat_parts import extract_chat_media, has_media_parts
from kubeinfer.engine.multimodal.config import MultiModalConfig, parse_limit_mm_per_prompt
from kubeinfer.engine.multimodal.data_url import decode_data_url
from kubeinfer.engine.multimodal.image_decoder import decode_image
from kubeinfer.engine.multimodal.media_fetcher import MediaFetcher
from tests.fixtures.tiny_vlm import make_image

F = "messages.0.content.1.image_url.url"


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def bomb_png(width: int, height: int) -> bytes:
    """A real PNG made with Pillow whose header then declares width x height: a few hundred bytes
    that would decode to gigabytes."""
    data = bytearray(png_bytes(make_image(8, 8, 0)))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    body = bytes(data[ihdr - 4:ihdr + 13])
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return bytes(data)


# ---- data URLs and decoding ----
def test_data_url_round_trip_decodes_to_the_same_pixels():
    img = make_image(13, 7, 1)
    out = decode_image(decode_data_url(data_url(png_bytes(img)), F, 10**6), F, 10**6)
    assert out.size == (13, 7) and out.mode == "RGB" and out.tobytes() == img.tobytes()


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64,iVBOR%%%!!", "corrupt"),
    ("data:image/png;base64,abc", "corrupt"),  # wrong length
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("data:image/png,rawbytes", "not base64"),
    ("data:image/png;base64", "comma"),
])
def test_bad_data_urls_name_the_field(url, words):
    with pytest.raises(RequestError, match=words) as e:
        decode_data_url(url, F, 10**6)
    assert e.value.param == F and F in str(e.value)


def test_image_mime_with_non_image_bytes_is_refused():
    data = decode_data_url(data_url(b"hello, this is text"), F, 10**6)
    with pytest.raises(RequestError, match="not an image") as e:
        decode_image(data, F, 10**6)
    assert e.value.param == F


def test_truncated_png_is_refused():
    data = png_bytes(make_image(64, 64, 2))
    with pytest.raises(RequestError, match="truncated or corrupt|could not be read"):
        decode_image(data[: len(data) // 2], F, 10**6)


def test_decompression_bomb_is_refused_from_the_header():
    with pytest.raises(RequestError, match="more than the limit") as e:
        decode_image(bomb_png(100_000, 100_000), F, 25_000_000)
    assert e.value.param == F


def test_pixel_cap_applies_before_decoding():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (2000, 1000)).save(buf, format="PNG")  # compresses to a few KB
    with pytest.raises(RequestError, match="2000x1000 pixels"):
        decode_image(buf.getvalue(), F, 1_000_000)
    assert decode_image(buf.getvalue(), F, 2_000_000).size == (2000, 1000)


def test_oversized_data_url_is_refused_before_decoding():
    with pytest.raises(RequestError, match="larger than 100 bytes"):
        decode_data_url(data_url(b"x" * 1000), F, 100)


# ---- remote and local URLs ----
def test_default_allows_any_host_but_empty_list_allows_data_urls_only():
    fetcher = MediaFetcher(MultiModalConfig(allowed_media_domains=()))
    with pytest.raises(RequestError, match="only data URLs") as e:
        fetcher.fetch("https://example.com/cat.png", F)
    assert e.value.param == F
    MediaFetcher(MultiModalConfig()).check_host("https://example.com/cat.png", F)  # no error


def test_disallowed_domain_is_refused_without_a_connection():
    fetcher = MediaFetcher(MultiModalConfig(allowed_media_domains=("images.example.com",)))
    with pytest.raises(RequestError, match="does not fetch images from 'evil.example.com'"):
        fetcher.fetch("https://evil.example.com/x.png", F)
    with pytest.raises(RequestError, match="unsupported image URL scheme 'ftp'"):
        fetcher.fetch("ftp://images.example.com/x.png", F)


def test_unreachable_url_fails_with_refused_not_a_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with block ends
    fetcher = MediaFetcher(MultiModalConfig(allowed_media_domains=("127.0.0.1",),
                                            fetch_timeout_s=60))
    with pytest.raises(RequestError, match="could not fetch") as e:
        fetcher.fetch(f"http://127.0.0.1:{port}/x.png", F)
    assert "refused" in str(e.value).lower() and e.value.param == F


def test_a_host_that_never_answers_hits_the_timeout():
    with socket.socket() as listener:  # accepts connections (backlog) but never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        fetcher = MediaFetcher(MultiModalConfig(allowed_media_domains=("127.0.0.1",),
                                                fetch_timeout_s=0.3))
        with pytest.raises(RequestError, match="took longer than 0.3 s"):
            fetcher.fetch(f"http://127.0.0.1:{port}/x.png", F)


@pytest.fixture(scope="module")
def image_server():
    """A local HTTP server: /img.png an image, /big.png over the byte cap, /hop a redirect to a
    host the allow-list does not name."""
    body = png_bytes(make_image(9, 5, 3))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", "http://localhost.localdomain:1/img.png")
                self.end_headers()
                return
            payload = body if self.path == "/img.png" else b"\0" * 5000
            self.send_response(200 if self.path in ("/img.png", "/big.png") else 404)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", body
    server.shutdown()
    server.server_close()


def test_http_fetch_from_an_allowed_host(image_server):
    base, body = image_server
    fetcher = MediaFetcher(MultiModalConfig(allowed_media_domains=("127.0.0.1",),
                                            max_image_bytes=1000))
    assert fetcher.fetch(f"{base}/img.png", F) == body
    with pytest.raises(RequestError, match="larger than 1000 bytes"):
        fetcher.fetch(f"{base}/big.png", F)
    with pytest.raises(RequestError, match="HTTP 404"):
        fetcher.fetch(f"{base}/missing.png", F)
    with pytest.raises(RequestError, match="does not fetch images from 'localhost.localdomain'"):
        fetcher.fetch(f"{base}/hop", F)


def test_local_files_only_under_the_allowed_folder(tmp_path):
    allowed, outside = tmp_path / "media", tmp_path / "secret"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "ok.png").write_bytes(png_bytes(make_image(4, 4, 4)))
    (outside / "key.png").write_bytes(b"secret")
    (allowed / "link.png").symlink_to(outside / "key.png")
    with pytest.raises(RequestError, match="does not read local files"):
        MediaFetcher(MultiModalConfig()).fetch(f"file://{allowed}/ok.png", F)
    fetcher = MediaFetcher(MultiModalConfig(allowed_local_media_path=str(allowed)))
    assert fetcher.fetch(f"file://{allowed}/ok.png", F) == (allowed / "ok.png").read_bytes()
    for url in (f"file://{outside}/key.png", f"file://{allowed}/../secret/key.png",
                f"file://{allowed}/link.png"):
        with pytest.raises(RequestError, match="outside the folder") as e:
            fetcher.fetch(url, F)
        assert e.value.param == F
    with pytest.raises(RequestError, match="not a file"):
        fetcher.fetch(f"file://{allowed}/nothing.png", F)


# ---- chat parts and limits ----
def test_chat_parts_become_template_parts_in_order():
    url = data_url(png_bytes(make_image(3, 3, 5)))
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "image_url", "image_url": {"url": url}},
                                             {"type": "image_url", "image_url": "https://x/y.png"}]}]
    assert has_media_parts(messages) and not has_media_parts(messages[:1])
    media = extract_chat_media(messages, max_images=2)
    assert media.messages[0]["content"] == [{"type": "text", "text": "be brief"}]
    assert media.messages[1]["content"] == [{"type": "text", "text": "a"}, {"type": "image"},
                                            {"type": "image"}]
    assert [(s.url, s.field) for s in media.images] == [
        (url, "messages.1.content.1.image_url.url"), ("https://x/y.png", "messages.1.content.2.image_url.url")]


def test_too_many_images_across_the_conversation():
    part = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    messages = [{"role": "user", "content": [part, part]}, {"role": "user", "content": [part]}]
    with pytest.raises(RequestError, match="3 images, more than this server's limit of 2") as e:
        extract_chat_media(messages, max_images=2)
    assert e.value.param == "messages"


@pytest.mark.parametrize("part, param", [
    ({"type": "audio_url", "audio_url": {"url": "x"}}, "messages.0.content.0.type"),
    ({"type": "image_url", "image_url": {}}, "messages.0.content.0.image_url"),
    ({"type": "text", "text": 3}, "messages.0.content.0.text"),
    ("just a string", "messages.0.content.0"),
])
def test_malformed_parts_name_the_field(part, param):
    with pytest.raises(RequestError) as e:
        extract_chat_media([{"role": "user", "content": [part]}], max_images=4)
    assert e.value.param == param


def test_limit_mm_per_prompt_flag():
    assert parse_limit_mm_per_prompt('{"image": 3}') == {"image": 3}
    assert MultiModalConfig(limit_per_prompt='{"image": 0}').limit("image") == 0
    for bad in ('{"image": -1}', '{"video": 1}', "image=2", '[1]', '{"image": true}'):
        with pytest.raises(ConfigError, match="limit-mm-per-prompt"):
            parse_limit_mm_per_prompt(bad)
    with pytest.raises(ConfigError, match="not an existing folder"):
        MultiModalConfig(allowed_local_media_path="/no/such/folder")
