"""MultiModalPreprocessor: the front door of the multimodal path, for the server and `LLM`.

It turns a chat conversation (content parts with images) or a prompt with `multi_modal_data` into
`MultiModalInputs`: images fetched and decoded under the limits (media_fetcher.py,
image_decoder.py), the chat template rendered, the processor run. All of it runs on its own thread
pool, so image decoding never holds up the engine loop; `submit_*` return a
`concurrent.futures.Future` (the server awaits `asyncio.wrap_future(f)`), the plain methods block.

For a text-only model it still exists (`is_multimodal` False) and refuses images with a
RequestError, so a caller needs no special case.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubeinfer.engine.errors import RequestError, RequestFailedError
from kubeinfer.engine.multimodal.chat_parts import ImageSource, extract_chat_media
from kubeinfer.engine.multimodal.config import MultiModalConfig
from kubeinfer.engine.multimodal.image_decoder import decode_image
from kubeinfer.engine.multimodal.inputs import MultiModalInputs
from kubeinfer.engine.multimodal.media_fetcher import MediaFetcher
from kubeinfer.engine.multimodal.processor import MultiModalProcessor, is_multimodal_model

logger = logging.getLogger(__name__)


class MultiModalPreprocessor:
    def __init__(self, processor: MultiModalProcessor | None, config: MultiModalConfig | None = None,
                 model_name: str = "this model"):
        self.processor = processor
        self.config = config or MultiModalConfig()
        self.model_name = model_name
        self.fetcher = MediaFetcher(self.config)
        # threads start on the first submit; making the pool here keeps _executor race-free
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            self.config.num_workers, thread_name_prefix="kubeinfer-mm")

    @classmethod
    def from_model(cls, model_path: str | Path, config: MultiModalConfig | None = None,
                   model_name: str | None = None) -> MultiModalPreprocessor:
        """The preprocessor of a resolved model folder (ConfigError when its processor cannot be
        built); text-only models get one that refuses images."""
        name = model_name or str(model_path)
        processor = (MultiModalProcessor.from_pretrained(model_path, name)
                     if is_multimodal_model(model_path) else None)
        return cls(processor, config, name)

    @property
    def is_multimodal(self) -> bool:
        return self.processor is not None

    # ---- entry points ----
    def submit_chat(self, messages: list[Any], chat_template: str | None = None,
                    add_generation_prompt: bool = True) -> Future:
        """Future of `chat(...)`. Errors in the message structure are raised here, at once."""
        media = extract_chat_media(messages, self._max_images())
        self._check_accepts(media.images)
        return self._executor().submit(_guarded, self._chat, media.messages, media.images,
                                       chat_template, add_generation_prompt)

    def chat(self, messages: list[Any], chat_template: str | None = None,
             add_generation_prompt: bool = True) -> MultiModalInputs:
        return self.submit_chat(messages, chat_template, add_generation_prompt).result()

    def submit_prompt(self, prompt: str, multi_modal_data: dict[str, Any] | None) -> Future:
        """Future of `process_prompt(...)`: LLM.generate's {"prompt": ..., "multi_modal_data":
        {"image": image or [images]}}; an image is a PIL image or a URL string."""
        sources = self._sources(multi_modal_data)
        self._check_accepts(sources)
        if not isinstance(prompt, str):
            raise RequestError("prompt: a prompt with multi_modal_data must be text (with the "
                               "model's image placeholder), not token ids", param="prompt")
        return self._executor().submit(_guarded, self._prompt, prompt, sources)

    def process_prompt(self, prompt: str, multi_modal_data: dict[str, Any] | None) -> MultiModalInputs:
        return self.submit_prompt(prompt, multi_modal_data).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ---- work on the pool ----
    def _chat(self, messages, sources, chat_template, add_generation_prompt) -> MultiModalInputs:
        images = [self._load(s) for s in sources]
        prompt = self.processor.render_chat(messages, chat_template, add_generation_prompt)
        # the rendered template holds its special tokens already; don't add BOS twice
        return self.processor.process(prompt, images, add_special_tokens=False, field="messages")

    def _prompt(self, prompt: str, sources: list[ImageSource]) -> MultiModalInputs:
        images = [self._load(s) for s in sources]
        return self.processor.process(prompt, images, add_special_tokens=True, field="prompt")

    def _load(self, source: ImageSource):
        if source.image is not None:
            img = source.image
            width, height = img.size
            if width * height > self.config.max_image_pixels:
                raise RequestError(f"{source.field}: the image has {width}x{height} pixels, more "
                                   f"than the limit of {self.config.max_image_pixels}; scale it "
                                   "down", param=source.field)
            return img.convert("RGB") if img.mode != "RGB" else img
        data = self.fetcher.fetch(source.url, source.field)
        return decode_image(data, source.field, self.config.max_image_pixels)

    # ---- checks ----
    def _max_images(self) -> int:
        return self.config.limit("image")

    def _check_accepts(self, sources: list[ImageSource]) -> None:
        if sources and self.processor is None:
            raise RequestError(f"{self.model_name} is a text-only model and does not take images; "
                               "send text only, or serve a vision-language model",
                               param=sources[0].field)

    def _sources(self, data: dict[str, Any] | None) -> list[ImageSource]:
        if data is None:
            return []
        if not isinstance(data, dict):
            raise RequestError("multi_modal_data must be a dict such as {\"image\": image}",
                               param="multi_modal_data")
        unknown = sorted(set(data) - {"image"})
        if unknown:
            raise RequestError(f"multi_modal_data: modality {unknown[0]!r} is not supported; "
                               "kubeinfer takes 'image'", param=f"multi_modal_data.{unknown[0]}")
        images = data.get("image")
        images = [] if images is None else images if isinstance(images, (list, tuple)) else [images]
        if len(images) > self._max_images():
            raise RequestError(f"multi_modal_data has {len(images)} images, more than this "
                               f"server's limit of {self._max_images()} per prompt "
                               "(limit_mm_per_prompt)", param="multi_modal_data.image")
        sources = []
        for i, img in enumerate(images):
            field = f"multi_modal_data.image.{i}"
            if isinstance(img, str):
                sources.append(ImageSource(field=field, url=img))
            elif hasattr(img, "convert") and hasattr(img, "size"):
                sources.append(ImageSource(field=field, image=img))
            else:
                raise RequestError(f"{field}: an image must be a PIL image or a URL, not "
                                   f"{type(img).__name__}", param=field)
        return sources

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            raise RuntimeError("the multimodal preprocessor is closed")
        return self._pool


def _guarded(fn, *args):
    """Run fn; an unexpected exception (a processor bug, not the client's input) becomes a
    RequestFailedError whose message is safe to show, with the details in the log."""
    try:
        return fn(*args)
    except (RequestError, RequestFailedError):
        raise
    except Exception:
        logger.exception("multimodal preprocessing failed")
        raise RequestFailedError("preprocessing the request's images failed") from None
