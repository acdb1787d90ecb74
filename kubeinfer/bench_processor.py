"""The processor folder of a config-only vision-language shape (benchmarks/models/*-shape), so
`kubeinfer bench --image-size` and benchmarks/hf_peer.py can build chat prompts with an image.

The shape folders hold a config.json only: no tokenizer, no image processor. A benchmark needs
neither the real vocabulary nor the real merges: it needs prompts of the real length, the real
image-token expansion and the real pixel values. So this writes, into a folder of its own:

- a word-level tokenizer with the config's vocabulary size: word `w{i}` is id i, and the family's
  special tokens (image placeholder, vision start/end, chat markers, BOS/EOS) sit at the ids the
  config names, so `n` random words are exactly `n` text tokens and the image token is the id the
  model's embedding merge replaces;
- the family's image processor on its PIL path, with the settings of the public checkpoint
  (LLaVA 1.5: CLIP resize + center crop to the vision tower's image_size, CLIP mean/std;
  Qwen2-VL / Qwen2.5-VL: dynamic resolution in 28-pixel steps, Qwen's pixel bounds);
- the family's chat template (LLaVA 1.5's "USER: <image>\\n... ASSISTANT:", Qwen's im_start/im_end
  with vision_start/image_pad/vision_end), and a copy of config.json.

The engine then loads it as it loads any model folder (`MultiModalPreprocessor.from_model`), so
the benchmark's prompts go through the same processor path as a chat request. A folder that has
its own processor files is used as it is; this is only for the config-only shapes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# the families this can write a processor for, by config.json model_type
SYNTHETIC_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")

_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% endif %}{% endfor %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
_QWEN_TEMPLATE = (
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# the words of the templates above, given ids of their own so they are not the unknown word
_TEMPLATE_WORDS = ("USER:", "ASSISTANT:", "system", "user", "assistant", "You", "are", "a",
                   "helpful", "assistant.")


def has_processor_files(model_path: str | Path) -> bool:
    path = Path(model_path)
    return any((path / f).is_file() for f in _PROCESSOR_FILES)


def family_of(config: dict[str, Any]) -> str | None:
    """The config's family if this module can write its processor, else None."""
    model_type = config.get("model_type")
    return model_type if model_type in SYNTHETIC_FAMILIES else None


def write_synthetic_processor(model_path: str | Path, out_dir: str | Path) -> Path:
    """Write the processor folder of the config-only VLM folder `model_path` into `out_dir`.
    ValueError (with what to do) for a family this cannot write."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    family = family_of(config)
    if family is None:
        raise ValueError(f"{model_path} has no processor files (preprocessor_config.json) and the "
                         f"benchmark can write one only for {', '.join(SYNTHETIC_FAMILIES)} (this "
                         f"is {config.get('model_type')!r}): copy the model's tokenizer and "
                         "processor files into the folder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family == "llava":
        _write_llava(config, out)
    else:
        _write_qwen2_vl(config, out)
    shutil.copy(Path(model_path) / "config.json", out / "config.json")
    return out


def text_token_ids(config: dict[str, Any]) -> tuple[int, int]:
    """[low, high) of ids that are plain words in the synthetic tokenizer: every id below the
    first special one (the families put their special tokens at the top of the vocabulary)."""
    low = 3 + len(_TEMPLATE_WORDS)
    return low, min(i for i in _special_tokens(config).values() if i >= low)


def _special_tokens(config: dict[str, Any]) -> dict[str, int]:
    text = config.get("text_config", {})
    if config["model_type"] == "llava":
        return {"<s>": text.get("bos_token_id", 1), "</s>": text.get("eos_token_id", 2),
                "<image>": config.get("image_token_index", 32000)}
    return {"<|endoftext|>": config.get("bos_token_id", 151643),
            "<|im_start|>": config.get("bos_token_id", 151643) + 1,
            "<|im_end|>": config.get("eos_token_id", 151645),
            "<|vision_start|>": config.get("vision_start_token_id", 151652),
            "<|vision_end|>": config.get("vision_end_token_id", 151653),
            "<|image_pad|>": config.get("image_token_id", 151655),
            "<|video_pad|>": config.get("video_token_id", 151656)}


def _vocab_size(config: dict[str, Any]) -> int:
    return config.get("text_config", {}).get("vocab_size") or config["vocab_size"]


def build_tokenizer(config: dict[str, Any]):
    """The word-level tokenizer: `w{i}` -> i, the template words and the family's special tokens at
    their ids, id 0 the unknown word (LLaVA's <unk>; Qwen's '!', never produced by a prompt)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = _special_tokens(config)
    vocab = {f"w{i}": i for i in range(_vocab_size(config))}
    for i, word in enumerate(_TEMPLATE_WORDS, start=3):
        del vocab[f"w{i}"]
        vocab[word] = i
    for token, i in specials.items():
        vocab.pop(f"w{i}", None)
        vocab[token] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")
    fast.add_special_tokens({"additional_special_tokens": list(specials)})
    return fast


def _write_llava(config: dict[str, Any], out: Path) -> None:
    import transformers
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vision = config.get("vision_config", {})
    size = vision.get("image_size", 336)
    # llava-hf/llava-1.5-7b-hf's preprocessor_config.json: resize the short side, center crop
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size},
                                            crop_size={"height": size, "width": size})
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(config),
        patch_size=vision.get("patch_size", 14),
        vision_feature_select_strategy=config.get("vision_feature_select_strategy", "default"),
        num_additional_image_tokens=1, chat_template=_LLAVA_TEMPLATE)
    processor.save_pretrained(str(out))


def _write_qwen2_vl(config: dict[str, Any], out: Path) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision = config.get("vision_config", {})
    # Qwen/Qwen2.5-VL-7B-Instruct's preprocessor_config.json (min/max pixels, CLIP mean/std);
    # transformers' Qwen2-VL processor cannot be built without torchvision (its video processor),
    # so the parts are written one by one, as the model's own folder has them
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=3136, max_pixels=12845056, patch_size=vision.get("patch_size", 14),
        merge_size=vision.get("spatial_merge_size", 2),
        temporal_patch_size=vision.get("temporal_patch_size", 2))
    image_processor.save_pretrained(str(out))
    build_tokenizer(config).save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(_QWEN_TEMPLATE)
