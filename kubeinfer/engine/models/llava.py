"""LLaVA 1.5, LLaVA-NeXT and Idefics3 (SmolVLM): a vision tower and a projector in front of a native
Llama-family decoder (Llama, Mistral, Qwen2 from models/llama.py).

The vision side is transformers' own code (`LlavaModel` / `LlavaNextModel` / `Idefics3Model` without
their language model: CLIP or SigLIP, the feature-layer choice, the projector, LLaVA-NeXT's anyres
packing with its image_newline, Idefics3's pixel-shuffle connector over its tiles), loaded with the
checkpoint's weights (sdpa attention, the engine's dtype). It runs once per image, not per token,
the images of a step whose inputs stack in one call, and running HF's code keeps the image
embeddings exactly HF's. The decoder is
ours: paged attention, tensor parallelism, CUDA graphs for decode.

The runner's interface beyond a decoder's (model_runner.py): `embed_input_ids(ids [T]) -> [T, H]`,
`embed_images([encoder_inputs]) -> [[rows, H]]` (each image's placeholder embeddings, in order;
`embed_image` for one) and
`forward(input_ids, positions, inputs_embeds=None)`.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.linear import default_weight_loader
from kubeinfer.engine.loader.meta_init import materialize_meta_params, params_on_meta
from kubeinfer.engine.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from kubeinfer.engine.multimodal.encoder_batch import group_by, split_rows, to_device

_LANGUAGE_MODELS = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM,
                    "qwen2": Qwen2ForCausalLM}
# checkpoint prefixes of the vision side -> this model's (`vision.` is the HF module); both the
# hub's historical layout and transformers 5's are accepted
_VISION_PREFIXES = (("model.vision_tower.vision_model.", "vision_tower."),
                    ("vision_tower.vision_model.", "vision_tower."),
                    ("model.vision_tower.", "vision_tower."), ("vision_tower.", "vision_tower."),
                    ("model.multi_modal_projector.", "multi_modal_projector."),
                    ("multi_modal_projector.", "multi_modal_projector."),
                    ("model.image_newline", "image_newline"), ("image_newline", "image_newline"))
_LANGUAGE_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                      ("model.language_model.", "model."), ("lm_head.", "lm_head."))


def _rename(name: str, table: tuple[tuple[str, str], ...]) -> str | None:
    for old, new in table:
        if name.startswith(old):
            return new + name[len(old):]
    return None


class LlavaForConditionalGeneration(nn.Module):
    """LLaVA 1.5 (and the base of the other families here)."""

    is_multimodal = True
    _hf_base = "LlavaModel"  # transformers' base model: its vision side is used
    _hf_language_attr = "language_model"  # ... and this submodule of it dropped
    _vision_prefixes = _VISION_PREFIXES  # checkpoint prefix -> name in the HF base model
    _language_prefixes = _LANGUAGE_PREFIXES  # checkpoint prefix -> name in our decoder
    _encoder_keys = ("pixel_values", "image_sizes")  # the processor outputs the encoder takes
    _language_models = _LANGUAGE_MODELS  # text_config.model_type -> our decoder class

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        text_config = config.text_config
        lm_cls = self._language_models.get(text_config.model_type)
        if lm_cls is None:
            raise ConfigError(f"{type(self).__name__} with a {text_config.model_type!r} language "
                              f"model is not supported; kubeinfer runs it over "
                              f"{', '.join(sorted(self._language_models))}")
        self.language_model = lm_cls(text_config)
        import transformers

        # HF's base model builds its language model too: on the meta device, dropped at once
        with params_on_meta():
            vision = getattr(transformers, self._hf_base)(config)
        delattr(vision, self._hf_language_attr)
        materialize_meta_params(vision, next(self.language_model.parameters()).device)
        self.vision = vision

    # ---- the runner's interface ----
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)

    def embed_image(self, encoder_inputs: dict[str, Any]) -> torch.Tensor:
        """One image's embeddings [rows, hidden], rows = its placeholder tokens."""
        return self.embed_images([encoder_inputs])[0]

    def embed_images(self, encoder_inputs: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Many images' embeddings, one [rows, hidden] tensor each: the images whose inputs have
        the same shapes (LLaVA 1.5: all of them) are stacked into one vision call."""
        weight = next(self.vision.parameters())
        keys = [k for k in self._encoder_keys if k in encoder_inputs[0]]
        out: list[torch.Tensor | None] = [None] * len(encoder_inputs)
        for group in group_by(encoder_inputs, lambda inp: tuple(
                (k, tuple(inp[k].shape)) for k in keys if k in inp)):
            kwargs = {}
            for k in keys:
                parts = [torch.as_tensor(encoder_inputs[i][k]) for i in group]
                host = torch.cat(parts) if len(parts) > 1 else parts[0]
                kwargs[k] = to_device(host, weight.device,
                                      weight.dtype if k == "pixel_values" else None)
            features = self.vision.get_image_features(**kwargs).pooler_output
            for i, t in zip(group, split_rows(features, len(group))):
                out[i] = t
        return out

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model(input_ids, positions, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden_states)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF-named checkpoint tensors -> the decoder (its own loader) and the vision side."""
        vision_params = dict(self.vision.named_parameters())
        loaded: set[str] = set()

        def language_weights():
            for name, tensor in weights:
                target = _rename(name, self._vision_prefixes)
                if target is not None:
                    param = vision_params.get(target)
                    if param is None:
                        raise ValueError(f"checkpoint tensor {name!r} has no place in the vision "
                                         f"tower of {type(self).__name__}")
                    default_weight_loader(param, tensor)
                    loaded.add("vision." + target)
                    continue
                target = _rename(name, self._language_prefixes)
                if target is None:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in "
                                     f"{type(self).__name__}")
                yield target, tensor

        filled = self.language_model.load_weights(language_weights())
        loaded |= {"language_model." + n for n in filled}
        return loaded


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-NeXT: anyres tiles per image, packed with HF's own code (image_sizes per image)."""

    _hf_base = "LlavaNextModel"


class Idefics3ForConditionalGeneration(LlavaForConditionalGeneration):
    """Idefics3 / SmolVLM: SigLIP over an image's tiles and its global view, a pixel-shuffle
    connector; the rows fill the image's <image> positions, the row/column and <fake_token_around_
    image> markers between them stay text (PlaceholderRange.is_embed)."""

    _hf_base = "Idefics3Model"
    _hf_language_attr = "text_model"
    _vision_prefixes = (("model.vision_model.", "vision_model."),
                        ("vision_model.", "vision_model."),
                        ("model.connector.", "connector."), ("connector.", "connector."))
    _language_prefixes = (("model.text_model.", "model."), ("lm_head.", "lm_head."))
    _encoder_keys = ("pixel_values", "pixel_attention_mask")
