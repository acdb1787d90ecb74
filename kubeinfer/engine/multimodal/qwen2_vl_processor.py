"""The Qwen2-VL / Qwen2.5-VL processor without torchvision: transformers' own processor on the PIL
image processor (`Qwen2VLImageProcessorPil`, which Qwen2.5-VL shares) and no video processor.

transformers 5 checks every sub-processor an `__init__` names against its base class, and the video
processor's base class imports torchvision, so `Qwen2VLProcessor(video_processor=None)` and
`AutoProcessor.from_pretrained` fail beside the CPU build of torch. `ImageOnlyQwen2VLProcessor`
names only the image processor and the tokenizer; everything else (placeholder expansion to
grid_t * grid_h * grid_w / merge_size**2 image pads, `image_grid_thw`, `mm_token_type_ids`) is
transformers' code, so ids and pixel values are the reference's bit for bit. Videos are refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubeinfer.engine.errors import ConfigError, RequestError

QWEN2_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def _processor_class(model_type: str) -> type:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    base = Qwen2VLProcessor if model_type == "qwen2_vl" else Qwen2_5_VLProcessor

    class ImageOnlyQwen2VLProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
            self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
            self.image_token_id = (getattr(tokenizer, "image_token_id", None)
                                   or tokenizer.convert_tokens_to_ids(self.image_token))
            self.video_token_id = (getattr(tokenizer, "video_token_id", None)
                                   or tokenizer.convert_tokens_to_ids(self.video_token))
            self.video_processor = None
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def __call__(self, *args, videos=None, **kwargs):
            if videos is not None:
                raise RequestError("videos are not supported; send images")
            return super().__call__(*args, **kwargs)

    ImageOnlyQwen2VLProcessor.__name__ = f"ImageOnly{base.__name__}"
    return ImageOnlyQwen2VLProcessor


def build_qwen2_vl_processor(model_type: str, image_processor: Any, tokenizer: Any,
                             chat_template: str | None = None) -> Any:
    """A Qwen2-VL (or Qwen2.5-VL) processor over the given PIL image processor and tokenizer."""
    if model_type not in QWEN2_VL_MODEL_TYPES:
        raise ValueError(f"not a Qwen2-VL family: {model_type!r}")
    return _processor_class(model_type)(image_processor, tokenizer, chat_template=chat_template)


def load_qwen2_vl_processor(path: str | Path, model_type: str) -> Any:
    """The folder's processor: its tokenizer, its image processor settings (preprocessor_config.json
    or processor_config.json's image_processor) on the PIL backend, its chat template."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    if not any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise ConfigError(f"{path} has no image processor settings (preprocessor_config.json or "
                          "processor_config.json); it cannot take images")
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    chat_template = None
    if (path / "chat_template.jinja").is_file():
        chat_template = (path / "chat_template.jinja").read_text()
    elif (path / "chat_template.json").is_file():
        chat_template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return build_qwen2_vl_processor(model_type, image_processor, tokenizer, chat_template)
