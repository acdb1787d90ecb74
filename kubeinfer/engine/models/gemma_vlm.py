"""Gemma 3 (Gemma3ForConditionalGeneration) and PaliGemma 1/2 (PaliGemmaForConditionalGeneration):
a SigLIP tower and a projector before a native Gemma decoder, with bidirectional attention spans.

The vision side is transformers' own (`Gemma3Model` / `PaliGemmaModel` without their language
model), as in llava.py: SigLIP, then Gemma 3's avg-pool + RMSNorm + projection or PaliGemma's linear
projector. The image rows replace the image token's embeddings unscaled, while text embeddings are
Gemma's scaled ones (transformers 5 scales in the embedding, older versions divided the image rows
by sqrt(hidden) before scaling everything: the same numbers).

What differs from LLaVA is the attention (engine/attention_spans.py):
- Gemma 3: each image's soft tokens attend to each other bidirectionally; its sliding layers keep
  the window over them (HF: AND(window, OR(causal, same image))).
- PaliGemma: the whole prompt (the "prefix", images and text) is bidirectional; generated tokens are
  causal. HF ORs the prefix over PaliGemma 2's sliding window, so its layers set
  `span_over_window`. Positions start at 1 (HF's position_ids = cache_position + 1), which only
  the rotary embedding sees.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from kubeinfer.engine.layers.attention import get_attention_layers
from kubeinfer.engine.models.gemma import GemmaForCausalLM
from kubeinfer.engine.models.gemma2 import Gemma2ForCausalLM
from kubeinfer.engine.models.gemma3 import Gemma3ForCausalLM
from kubeinfer.engine.models.llava import LlavaForConditionalGeneration

# transformers 5's layout first (model.language_model.*), then the hub's historical one
_LANGUAGE_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                      ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))


class _GemmaVisionLanguage(LlavaForConditionalGeneration):
    _encoder_keys = ("pixel_values",)
    _language_prefixes = _LANGUAGE_PREFIXES

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        return self.language_model(input_ids, positions, inputs_embeds=inputs_embeds)


class Gemma3ForConditionalGeneration(_GemmaVisionLanguage):
    _hf_base = "Gemma3Model"
    _language_models = {"gemma3_text": Gemma3ForCausalLM}

    @staticmethod
    def bidirectional_spans(num_prompt_tokens: int, mm_features: tuple[Any, ...]
                            ) -> list[tuple[int, int]]:
        """Each run of image soft tokens: an image's placeholder range, or with pan-and-scan
        crops each crop's run (HF groups consecutive image tokens; the markers between crops
        are text, is_embed False)."""
        spans = []
        for f in mm_features:
            rng = f.placeholder
            embed = rng.is_embed or (True,) * rng.length
            start = None
            for k, is_image in enumerate((*embed, False)):
                if is_image and start is None:
                    start = k
                elif not is_image and start is not None:
                    spans.append((rng.offset + start, rng.offset + k))
                    start = None
        return spans


class PaliGemmaForConditionalGeneration(_GemmaVisionLanguage):
    _hf_base = "PaliGemmaModel"
    _language_models = {"gemma": GemmaForCausalLM, "gemma2": Gemma2ForCausalLM}

    def __init__(self, config: Any):
        # PaliGemmaConfig marks its text model bidirectional, meaning the prefix: the spans do that
        # here, and the decoder itself stays causal for the generated tokens
        config = copy.deepcopy(config)
        config.text_config.use_bidirectional_attention = False
        super().__init__(config)
        for layer in get_attention_layers(self.language_model):
            layer.span_over_window = True

    @staticmethod
    def bidirectional_spans(num_prompt_tokens: int, mm_features: tuple[Any, ...]
                            ) -> list[tuple[int, int]]:
        """The whole prompt."""
        return [(0, num_prompt_tokens)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(input_ids, positions + 1, inputs_embeds)
