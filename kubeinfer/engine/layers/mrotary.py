"""Multimodal rotary embedding (M-RoPE, Qwen2-VL / Qwen2.5-VL): the rotary frequencies split into
three sections (`mrope_section`, in pairs of features, summing to rotary_dim / 2); section i turns
with the token's i-th position id (temporal, height, width). The sections are contiguous in each
half, as HF's `Qwen2VLRotaryEmbedding` lays them out (not Qwen3-VL's interleaving).

Positions [3, T] pick, per feature, the cos/sin row of that feature's section; the rotation itself
is the ordinary neox rotary over those per-token rows (the Triton kernel on a GPU). Positions [T]
(a text-only batch: all three ids equal; the profiling and warm-up forwards) are plain rotary.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.rotary import RotaryEmbedding, get_rope
from kubeinfer.kernels import ops


class MRotaryEmbedding(RotaryEmbedding):
    def __init__(self, base: RotaryEmbedding, mrope_section: Sequence[int]):
        nn.Module.__init__(self)  # the table is the base's: not built twice
        self.head_size, self.rotary_dim = base.head_size, base.rotary_dim
        self.max_position = base.max_position
        self.register_buffer("cos_sin_cache", base.cos_sin_cache, persistent=False)
        half = self.rotary_dim // 2
        if sum(mrope_section) != half or len(mrope_section) != 3:
            raise ConfigError(f"mrope_section {list(mrope_section)} in config.json must be three "
                              f"sizes summing to half the rotary dimension ({half})")
        # built on the CPU: the default device may be meta while a model is laid out
        section = torch.repeat_interleave(torch.arange(3, device="cpu"),
                                          torch.tensor(list(mrope_section), device="cpu"))
        # [1, 1, rotary_dim]: the position row each cos and sin feature reads
        index = torch.cat([section, section]).view(1, 1, -1)
        self.register_buffer("section_index", index.to(torch.get_default_device()),
                             persistent=False)
        self.mrope_section = tuple(mrope_section)
        self._step = None  # (positions, token index, per-token rows) of the forward in progress

    def begin_forward(self) -> None:
        """Forget the last forward's tables: the model calls this first in every forward, so a
        CUDA-graph capture recomputes them inside the graph rather than reading the warm-up's."""
        self._step = None

    def _tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token index [T], per-token cos/sin rows [T, rotary_dim]) of positions [3, T]. Every
        layer of one forward gets the same positions tensor, so they are built once per forward
        (the memo keeps that tensor alive, which makes the identity check sound; a caller that
        rewrites positions in place between forwards calls begin_forward, as the model does)."""
        step = getattr(self, "_step", None)
        if step is not None and step[0] is positions:
            return step[1], step[2]
        num_tokens = positions.shape[1]
        rows = self.cos_sin_cache[positions]  # [3, T, rotary_dim]
        per_token = rows.gather(0, self.section_index.expand(1, num_tokens, -1))[0]
        token_index = torch.arange(num_tokens, device=positions.device)
        self._step = (positions, token_index, per_token)
        return token_index, per_token

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        token_index, per_token = self._tables(positions)
        q_shape, k_shape = q.shape, k.shape
        q = q.view(q.shape[0], -1, self.head_size)
        k = k.view(k.shape[0], -1, self.head_size)
        q, k = ops.rotary_embedding(token_index, q, k, per_token)
        return q.reshape(q_shape), k.reshape(k_shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mrope_section={list(self.mrope_section)}"


def get_mrope(hf_config, head_size: int) -> MRotaryEmbedding:
    """The text config's M-RoPE (its rope parameters' mrope_section)."""
    from kubeinfer.engine.layers.rotary import rope_parameters

    section = rope_parameters(hf_config).get("mrope_section")
    if not section:
        raise ConfigError("config.json's rope parameters have no mrope_section; a Qwen2-VL model "
                          "needs it to split the rotary dimensions among (t, h, w)")
    return MRotaryEmbedding(get_rope(hf_config, head_size), section)
