"""Chat messages whose `content` is a list of parts -> messages a VLM chat template renders, plus the
images in the order the template places them.

Parts (vLLM's chat API): `{"type": "text", "text": ...}`, `{"type": "image_url", "image_url":
{"url": ...}}` (the url may also be given as a bare string) and, offline, `{"type": "image_pil",
"image_pil": PIL.Image}`. Each image becomes `{"type": "image"}` in the message, the form HF chat
templates of vision-language models read, so the model's own template decides where its image
token goes. String contents become one text part, because those templates iterate over parts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubeinfer.engine.errors import RequestError

_KEPT_KEYS = ("name", "tool_call_id", "tool_calls")


@dataclass(frozen=True)
class ImageSource:
    """One image of a request: a URL to fetch, or a PIL image given offline. `field` is where it
    was in the request (messages.0.content.1.image_url.url), for error messages."""

    field: str
    url: str | None = None
    image: Any = None


@dataclass(frozen=True)
class ChatMedia:
    messages: list[dict[str, Any]]
    images: list[ImageSource]


def has_media_parts(messages: list[Any]) -> bool:
    """Whether any message has a non-text part (a cheap test before taking the media path)."""
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        if isinstance(content, list) and any(
                isinstance(p, dict) and p.get("type") != "text" for p in content):
            return True
    return False


def extract_chat_media(messages: list[Any], max_images: int) -> ChatMedia:
    """Split `messages` (dicts or objects with role/content) into template messages and images.
    RequestError (naming the field) for an unknown part, a malformed one, or more than
    `max_images` images (--limit-mm-per-prompt)."""
    out: list[dict[str, Any]] = []
    images: list[ImageSource] = []
    for i, m in enumerate(messages):
        get = m.get if isinstance(m, dict) else (lambda k, _m=m: getattr(_m, k, None))
        d: dict[str, Any] = {"role": get("role")}
        content = get("content")
        if content is None:
            d["content"] = []
        elif isinstance(content, str):
            d["content"] = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            d["content"] = [_part(i, j, p, images) for j, p in enumerate(content)]
        else:
            raise RequestError(f"messages[{i}].content must be a string or a list of parts",
                               param=f"messages.{i}.content")
        for key in _KEPT_KEYS:
            if get(key) is not None:
                d[key] = get(key)
        out.append(d)
    if len(images) > max_images:
        raise RequestError(f"the conversation has {len(images)} images, more than this server's "
                           f"limit of {max_images} per prompt (--limit-mm-per-prompt); send fewer",
                           param="messages")
    return ChatMedia(out, images)


def _part(i: int, j: int, part: Any, images: list[ImageSource]) -> dict[str, Any]:
    field = f"messages.{i}.content.{j}"
    if not isinstance(part, dict):
        raise RequestError(f"{field}: a content part must be an object with a `type`", param=field)
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{field}: a text part needs a string `text`", param=f"{field}.text")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise RequestError(f"{field}: an image_url part needs `image_url: {{\"url\": ...}}` with "
                               "a data: or https: URL", param=f"{field}.image_url")
        images.append(ImageSource(field=f"{field}.image_url.url", url=url))
        return {"type": "image"}
    if kind == "image_pil":
        img = part.get("image_pil")
        if not hasattr(img, "convert") or not hasattr(img, "size"):
            raise RequestError(f"{field}: an image_pil part needs a PIL image", param=field)
        images.append(ImageSource(field=f"{field}.image_pil", image=img))
        return {"type": "image"}
    raise RequestError(f"{field}: content part type {kind!r} is not supported; use 'text' or "
                       "'image_url'", param=f"{field}.type")
