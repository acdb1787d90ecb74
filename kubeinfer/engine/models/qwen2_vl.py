"""Qwen2-VL and Qwen2.5-VL: a dynamic-resolution vision tower before a native Qwen2 decoder with
M-RoPE (three position ids per token: temporal, height, width).

The vision tower is native (`qwen2_vl_vision.py`: the patch embedding as a linear layer, 2-D
rotary in its blocks, Qwen2.5-VL's window attention with full attention at
`fullatt_block_indexes`, the 2x2 patch merger); it runs once per image, a step's images packed
into one call (encoder_runner.py), its rows cached until the image's positions are computed.
The decoder is models/llama.py's Qwen2 with its rotary swapped for `layers/mrotary.py`'s M-RoPE;
`mrope_positions.py` computes each request's 3-D positions from its images' `image_grid_thw`
when the runner admits it.

The runner's interface beyond a decoder's: `embed_input_ids`, `embed_images([encoder_inputs])
-> [[rows, H]]` (`embed_image` for one), `forward(input_ids, positions [3, T] or [T],
inputs_embeds=None)`, and `mrope` (the `MRopePositions` the persistent batch uses); `uses_mrope`
sizes the CUDA graphs' position buffer.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kubeinfer.engine.layers.mrotary import get_mrope
from kubeinfer.engine.models.llama import Qwen2ForCausalLM
from kubeinfer.engine.models.qwen2_vl_vision import Qwen2VisionTower
from kubeinfer.engine.mrope_positions import MRopePositions
from kubeinfer.engine.multimodal.encoder_batch import split_rows, to_device

# checkpoint prefix -> this model's; transformers 5's layout and the hub's older one
_PREFIXES = (("model.visual.", "visual."), ("visual.", "visual."),
             ("model.language_model.", "model."), ("model.", "model."), ("lm_head.", "lm_head."))


class Qwen2VLForConditionalGeneration(nn.Module):
    is_multimodal = True
    uses_mrope = True
    windowed_vision = False  # Qwen2.5-VL's tower: window attention, RMSNorm, SwiGLU

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        text_config = config.text_config
        self.language_model = Qwen2ForCausalLM(text_config)
        decoder = self.language_model.model
        head_dim = getattr(text_config, "head_dim", None) or \
            text_config.hidden_size // text_config.num_attention_heads
        mrope = get_mrope(text_config, head_dim)
        for layer in decoder.layers[decoder.start:decoder.end]:
            layer.self_attn.rotary_emb = mrope
        self.rotary = mrope
        self.mrope = MRopePositions(config.vision_config.spatial_merge_size)
        self.visual = Qwen2VisionTower(config.vision_config, self.windowed_vision)

    # ---- the runner's interface ----
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)

    def embed_image(self, encoder_inputs: dict[str, Any]) -> torch.Tensor:
        """One image's embeddings [rows, hidden]: its merged patches, in placeholder order."""
        return self.embed_images([encoder_inputs])[0]

    def embed_images(self, encoder_inputs: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Many images in one tower call, their patches packed end to end (any sizes): one
        [rows, hidden] tensor per image. The grids are read on the host (the processor's CPU
        tensors), so nothing here waits for the device."""
        weight = next(self.visual.parameters())
        grids = [tuple(torch.as_tensor(inp["image_grid_thw"]).reshape(-1, 3)[0].tolist())
                 for inp in encoder_inputs]
        pixels = [inp["pixel_values"] for inp in encoder_inputs]
        host = torch.cat([torch.as_tensor(p) for p in pixels]) if len(pixels) > 1 \
            else torch.as_tensor(pixels[0])
        out = self.visual(to_device(host, weight.device, weight.dtype), grids)
        unit = self.config.vision_config.spatial_merge_size ** 2
        return split_rows(out, len(grids), [t * h * w // unit for t, h, w in grids])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        self.rotary.begin_forward()  # the layers share one M-RoPE table per forward
        return self.language_model(input_ids, positions, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden_states)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF-named checkpoint tensors -> the vision tower and the decoder (its own loader)."""
        visual_params = dict(self.visual.named_parameters())
        loaded: set[str] = set()

        def language_weights():
            for name, tensor in weights:
                target = next((new + name[len(old):] for old, new in _PREFIXES
                               if name.startswith(old)), None)
                if target is None:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in "
                                     f"{type(self).__name__}")
                if target.startswith("visual."):
                    filled = self.visual.load_weight(visual_params, target[len("visual."):],
                                                     tensor)
                    if filled is None:
                        raise ValueError(f"checkpoint tensor {name!r} has no place in the vision "
                                         f"tower of {type(self).__name__}")
                    loaded.add("visual." + filled)
                    continue
                yield target, tensor

        filled = self.language_model.load_weights(language_weights())
        loaded |= {"language_model." + n for n in filled}
        return loaded


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: RMSNorm and SwiGLU in the vision blocks, window attention except at
    `fullatt_block_indexes` (HF's tower); the decoder and M-RoPE are Qwen2-VL's."""

    windowed_vision = True
