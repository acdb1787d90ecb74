"""MultiModalProcessor: the model's own transformers processor, loaded without torchvision, and
what its output means for the engine.

transformers 5 builds the Qwen2-VL, SmolVLM, Mistral 3 (and by default every other) image
processor on torchvision, and PyPI's torchvision does not import beside the CPU torch the Makefile
installs. Each family also has a PIL/numpy image processor (`*ImageProcessorPil`); loading with
`backend="pil"` picks it, and it gives the same pixel values the model was trained with (the PIL
path is transformers' reference). Families whose processor needs a video processor or torchvision
for other parts are refused at start-up with a ConfigError that says so; Qwen2-VL and Qwen2.5-VL,
whose processor would build a video processor, are built image-only (qwen2_vl_processor.py).

`process(prompt, images)` calls the processor once on the whole prompt (so ids and pixel values are
the processor's, bit for bit), then finds each image's placeholder positions: the positions of the
image token (the one the model's embedding merge replaces) are handed out to the images in order,
each taking as many as its expansion holds; an image's range runs from its first to its last such
position, and text tokens inside (Idefics3's row/column markers) have is_embed False.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubeinfer.engine.errors import ConfigError, RequestError, RequestFailedError
from kubeinfer.engine.multimodal.hashing import hash_image
from kubeinfer.engine.multimodal.inputs import ImageFeature, MultiModalInputs, PlaceholderRange

# Processor outputs that are per token, not encoder inputs.
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def is_multimodal_model(model_path: str | Path) -> bool:
    """Whether the folder holds a vision-language model: a config with a vision tower and an image
    processor config beside it."""
    path = Path(model_path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return "vision_config" in config and any((path / f).is_file() for f in _PROCESSOR_FILES)


class MultiModalProcessor:
    def __init__(self, hf_processor: Any, image_token_id: int, model_name: str = "the model"):
        self.hf = hf_processor
        self.tokenizer = hf_processor.tokenizer
        self.image_token_id = image_token_id
        self.model_name = model_name
        # the text a prompt or chat template writes for one image
        self.placeholder: str = getattr(hf_processor, "image_token")
        # a fast tokenizer raises "Already borrowed" when two threads call it at once, so the
        # preprocessor's threads fetch and decode in parallel and take turns here
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model_path: str | Path, model_name: str | None = None
                        ) -> MultiModalProcessor:
        """Load the folder's processor on the PIL backend. ConfigError when it cannot be built."""
        from transformers import AutoProcessor

        from kubeinfer.engine.multimodal.qwen2_vl_processor import (QWEN2_VL_MODEL_TYPES,
                                                                    load_qwen2_vl_processor)

        path = Path(model_path)
        model_type = _model_type(path)
        try:
            if model_type in QWEN2_VL_MODEL_TYPES:  # AutoProcessor would need torchvision
                hf = load_qwen2_vl_processor(path, model_type)
            else:
                hf = AutoProcessor.from_pretrained(str(path), backend="pil")
        except Exception as e:  # transformers raises ImportError, ValueError, OSError, ...
            raise ConfigError(f"cannot build the image processor of {path} without torchvision "
                              f"({type(e).__name__}: {e}). Serve a model whose processor has a PIL "
                              "path (LLaVA, LLaVA-NeXT, Gemma 3, PaliGemma, Idefics3/SmolVLM)") from None
        if getattr(hf, "image_processor", None) is None or not hasattr(hf, "image_token"):
            raise ConfigError(f"{path} has no image processor; it cannot take images")
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        token_id = _image_token_id(config, hf)
        return cls(hf, token_id, model_name or str(path))

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)

    def render_chat(self, messages: list[dict[str, Any]], chat_template: str | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` (content as parts, images as {"type": "image"})."""
        template = chat_template or self.chat_template
        if template is None:
            raise RequestError(f"{self.model_name} has no chat template; send a prompt to "
                               "/v1/completions instead", param="messages")
        return self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def process(self, prompt: str, images: Sequence[Any], add_special_tokens: bool = True,
                field: str = "prompt") -> MultiModalInputs:
        """Expand `prompt`'s image placeholders for `images` (RGB PIL images, in prompt order)."""
        found = prompt.count(self.placeholder)
        if found != len(images):
            raise RequestError(f"{field}: the prompt has {found} image placeholder(s) "
                               f"{self.placeholder!r} but {len(images)} image(s) came with it; "
                               "write one placeholder per image", param=field)
        with self._lock:
            try:
                out = self.hf(text=[prompt], images=[list(images)] if images else None,
                              add_special_tokens=add_special_tokens, return_tensors="pt")
            except ValueError as e:
                raise RequestError(f"{field}: the model's processor refused the input: {e}",
                                   param=field) from None
            ids = out["input_ids"][0].tolist()
            counts = self._tokens_per_image(ids, images)
        ranges = _placeholder_ranges(ids, self.image_token_id, counts)
        per_image = _split_encoder_inputs(
            {k: v for k, v in out.items() if k not in _TOKEN_KEYS}, len(images),
            self._patches_per_image(images))
        features = tuple(ImageFeature(hash_image(img), rng, kw)
                         for img, rng, kw in zip(images, ranges, per_image))
        return MultiModalInputs(prompt=prompt, prompt_token_ids=ids, features=features)

    # ---- how many image tokens each image expanded to ----
    def _tokens_per_image(self, ids: list[int], images: Sequence[Any]) -> list[int]:
        total = ids.count(self.image_token_id)
        seq_len = getattr(self.hf, "image_seq_len", None)  # Idefics3/SmolVLM: per tile
        if seq_len is not None:
            counts = [p * seq_len for p in self._patches_per_image(images)]
        elif getattr(self.hf, "image_seq_length", None) and type(self.hf).__name__.startswith("PaliGemma"):
            counts = [self.hf.image_seq_length] * len(images)  # PaliGemma: runs are adjacent
        else:
            runs = _runs(ids, self.image_token_id)
            counts = [n for _, n in runs] if len(runs) == len(images) else []
        if len(counts) != len(images) or sum(counts) != total:
            counts = [self._count_alone(img) for img in images]
        if sum(counts) != total:
            raise RequestFailedError(f"cannot attribute {total} image tokens to {len(images)} "
                                     f"images with {type(self.hf).__name__}")
        return counts

    def _patches_per_image(self, images: Sequence[Any]) -> list[int]:
        """Leading-dimension units of pixel values per image (Idefics3 tiles, Gemma 3 crops)."""
        get = getattr(self.hf, "_get_num_multimodal_tokens", None)
        if get is None or not images:
            return [1] * len(images)
        data = get(image_sizes=[(img.size[1], img.size[0]) for img in images])
        patches = getattr(data, "num_image_patches", None)
        return list(patches) if patches else [1] * len(images)

    def _count_alone(self, image: Any) -> int:
        """Image tokens one image expands to, by processing it alone (the generic, slower path)."""
        out = self.hf(text=[self.placeholder], images=[[image]], return_tensors="pt")
        return out["input_ids"][0].tolist().count(self.image_token_id)


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _image_token_id(config: dict[str, Any], hf: Any) -> int:
    """The id the model's embedding merge replaces: the config's (LLaVA's image_token_index,
    Idefics3's image_token_id, Gemma 3's soft token), else the tokenizer's or the processor's."""
    for key in ("image_token_id", "image_token_index"):
        if isinstance(config.get(key), int):
            return config[key]
    for owner in (hf.tokenizer, hf):
        token_id = getattr(owner, "image_token_id", None)
        if isinstance(token_id, int):
            return token_id
    raise ConfigError("cannot tell which token id stands for image embeddings: config.json has no "
                      "image_token_id / image_token_index")


def _runs(ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of token_id."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(ids):
        if t != token_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _placeholder_ranges(ids: list[int], token_id: int, counts: list[int]) -> list[PlaceholderRange]:
    positions = [i for i, t in enumerate(ids) if t == token_id]
    ranges, k = [], 0
    for n in counts:
        mine = positions[k:k + n]
        k += n
        first, last = mine[0], mine[-1]
        length = last - first + 1
        is_embed = None
        if length != n:
            taken = set(mine)
            is_embed = tuple(p in taken for p in range(first, last + 1))
        ranges.append(PlaceholderRange(first, length, is_embed))
    return ranges


def _split_encoder_inputs(outputs: dict[str, Any], num_images: int, patches: list[int]
                          ) -> list[dict[str, Any]]:
    """One dict of tensors per image, the batch dimension kept: a tensor with one entry per image
    is sliced by image; one with an entry per patch (tile, crop) by the image's patches, also under
    a leading batch of 1 (Idefics3's [1, tiles, 3, H, W]); anything else goes whole to each."""
    starts = [sum(patches[:i]) for i in range(num_images)]
    per_image: list[dict[str, Any]] = [{} for _ in range(num_images)]
    for key, value in outputs.items():
        shape = getattr(value, "shape", None)
        for i in range(num_images):
            if shape is not None and len(shape) >= 1 and shape[0] == num_images:
                per_image[i][key] = value[i:i + 1]
            elif shape is not None and len(shape) >= 1 and shape[0] == sum(patches):
                per_image[i][key] = value[starts[i]:starts[i] + patches[i]]
            elif shape is not None and len(shape) >= 2 and shape[0] == 1 and shape[1] == sum(patches):
                per_image[i][key] = value[:, starts[i]:starts[i] + patches[i]]
            else:
                per_image[i][key] = value
    return per_image
