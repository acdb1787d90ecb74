"""ImageWorkload: the image requests of `kubeinfer bench throughput | latency --image-size N`
(and of benchmarks/hf_peer.py, which runs HF transformers on the same inputs).

Each request is a chat with one user message: one generated RGB image of N x N pixels, then
`input_len` words of text, rendered by the model's chat template and expanded by the model's
processor, the same path a /v1/chat/completions request with one image takes
(`MultiModalPreprocessor.chat`). A config-only shape folder (benchmarks/models) has no processor;
bench_processor.py writes one for it into a temporary folder, whose word-level tokenizer makes
`input_len` words exactly `input_len` text tokens.

Images are random pixels from a seed and the request's index, so the same run gets the same
images, and no two requests share one (their prefix-cache blocks and encoder outputs differ, as
with distinct users' photos); `shared_image` gives every request image 0 instead.
"""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

# the smallest image a ViT patch grid takes and a bound that keeps one image's pixels sane
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 28, 4096


def check_image_model(model_path: str | Path) -> None:
    """ValueError (saying what to do) unless the folder holds a vision-language model's config."""
    path = Path(model_path) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--image-size needs a vision-language model, and {path} cannot be "
                         f"read ({e})") from None
    if "vision_config" not in config:
        arch = ", ".join(config.get("architectures") or [config.get("model_type", "?")])
        raise ValueError(f"--image-size needs a vision-language model; {model_path} is a "
                         f"text-only model ({arch}). Drop --image-size or pass a VLM folder "
                         "such as benchmarks/models/llava-1.5-7b-shape")


def check_image_size(size: int) -> None:
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"--image-size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} "
                         f"pixels, got {size}")


def make_image(size: int, seed: int):
    """An RGB PIL image of random pixels, the same for the same arguments."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


class ImageWorkload:
    """Chat requests with one image each for the model folder `model_path`."""

    def __init__(self, model_path: str | Path, image_size: int, seed: int = 0,
                 shared_image: bool = False):
        from kubeinfer.bench_processor import (has_processor_files, text_token_ids,
                                               write_synthetic_processor)
        from kubeinfer.engine.multimodal import MultiModalConfig, MultiModalPreprocessor

        check_image_size(image_size)
        check_image_model(model_path)
        self.image_size, self.seed, self.shared_image = image_size, seed, shared_image
        self._tmp: tempfile.TemporaryDirectory | None = None
        folder = Path(model_path)
        self.is_synthetic = not has_processor_files(folder)
        if self.is_synthetic:
            self._tmp = tempfile.TemporaryDirectory(prefix="kubeinfer-bench-processor-")
            folder = write_synthetic_processor(model_path, self._tmp.name)
        self.mm = MultiModalPreprocessor.from_model(folder, MultiModalConfig(), str(model_path))
        tok = self.mm.processor.tokenizer
        if self.is_synthetic:
            self._text_ids = text_token_ids(json.loads((folder / "config.json").read_text()))
        else:  # a real tokenizer: ids below its added tokens, decoded (lengths then approximate)
            self._text_ids = (0, tok.vocab_size)

    def close(self) -> None:
        self.mm.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def messages(self, index: int, text_len: int) -> list[dict[str, Any]]:
        """Request `index`'s chat: one image, then `text_len` random words."""
        rng = random.Random(self.seed * 1_000_003 + index)
        ids = [rng.randrange(*self._text_ids) for _ in range(text_len)]
        if self.is_synthetic:
            text = " ".join(f"w{i}" for i in ids)
        else:
            text = self.mm.processor.tokenizer.decode(ids, skip_special_tokens=True)
        image = make_image(self.image_size, self.seed * 1_000_003 + (0 if self.shared_image else index))
        return [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                             {"type": "text", "text": text}]}]

    def inputs(self, text_lens: list[int], first_index: int = 0) -> list:
        """MultiModalInputs of requests first_index, first_index + 1, ... (one per text length),
        processed on the preprocessor's thread pool."""
        futures = [self.mm.submit_chat(self.messages(first_index + i, n))
                   for i, n in enumerate(text_lens)]
        return [f.result() for f in futures]

    def __enter__(self) -> ImageWorkload:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
