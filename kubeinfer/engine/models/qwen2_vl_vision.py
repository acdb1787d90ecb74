"""The Qwen2-VL / Qwen2.5-VL vision tower, native: one image (or frame group) at a time, from the
processor's flattened patches to the decoder's image rows.

- Patch embedding: HF's Conv3d has kernel == stride == one patch (temporal_patch_size x patch x
  patch over 3 channels), so on the processor's already flattened patches it is one linear layer
  (the checkpoint's 5-D kernel is reshaped as it loads).
- Blocks: pre-norm attention with 2-D rotary (half the rotary features turn with the patch's row,
  half with its column; neox layout, float32 as HF) and an MLP. Qwen2-VL: LayerNorm and a
  fc1/act/fc2 MLP. Qwen2.5-VL: RMSNorm and SwiGLU with biases, and window attention: patches are
  regrouped window by window (`window_size` pixels square, in merged cells), and every block
  except those at `fullatt_block_indexes` attends only within its window.
- Patch merger: a norm, then each 2x2 group of neighbouring patches (consecutive in the
  processor's order) concatenated and projected by a two-layer MLP to the decoder's width; the
  window regrouping is undone on the merged rows.

Attention over the segments (frames, windows) is one SDPA call with a block-diagonal mask; one
image per call keeps the mask small (a 1024 x 1024 image: about 5,300 patches).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class VisionRMSNorm(nn.Module):
    """HF's Qwen2-VL RMSNorm: normalised in float32, cast back, then scaled."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _activation(name: str):
    from transformers.activations import ACT2FN  # the exact functions the checkpoints name

    return ACT2FN[name]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        cos, sin = cos[:, None], sin[:, None]  # [N, 1, head_dim], float32
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                             v.transpose(0, 1), attn_mask=mask)
        return self.proj(out.transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    """fc1/act/fc2 (Qwen2-VL) or gate/up/down with biases (Qwen2.5-VL's SwiGLU)."""

    def __init__(self, dim: int, hidden: int, act: str, gated: bool):
        super().__init__()
        self.gated, self.act = gated, _activation(act)
        if gated:
            self.gate_proj = nn.Linear(dim, hidden)
            self.up_proj = nn.Linear(dim, hidden)
            self.down_proj = nn.Linear(hidden, dim)
        else:
            self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp: VisionMLP, make_norm):
        super().__init__()
        self.norm1, self.norm2 = make_norm(dim), make_norm(dim)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, dim: int, merge: int, make_norm):
        super().__init__()
        self.width = dim * merge * merge
        self.ln_q = make_norm(dim)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(),
                                 nn.Linear(self.width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


class Qwen2VisionTower(nn.Module):
    """forward(pixel_values [N, C*T*P*P], grid_thw [1, 3]) -> [N / merge**2, out_dim]."""

    def __init__(self, config: Any, windowed: bool):
        super().__init__()
        self.windowed = windowed
        self.merge = config.spatial_merge_size
        self.patch_size = config.patch_size
        if windowed:  # Qwen2.5-VL
            dim, out_dim = config.hidden_size, config.out_hidden_size
            hidden = config.intermediate_size

            def make_norm(d):
                return VisionRMSNorm(d, 1e-6)
            self.window_size = config.window_size
            self.full_attention_blocks = frozenset(config.fullatt_block_indexes)
        else:  # Qwen2-VL
            dim, out_dim = config.embed_dim, config.hidden_size
            hidden = int(dim * config.mlp_ratio)

            def make_norm(d):
                return nn.LayerNorm(d, eps=1e-6)
            self.full_attention_blocks = frozenset(range(config.depth))
        self.num_heads = config.num_heads
        patch_features = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(patch_features, dim, bias=False)
        self.blocks = nn.ModuleList(
            VisionBlock(dim, config.num_heads, VisionMLP(dim, hidden, config.hidden_act, windowed),
                        make_norm) for _ in range(config.depth))
        self.merger = PatchMerger(out_dim, dim, self.merge, make_norm)
        head_dim = dim // config.num_heads
        theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float32, device="cpu")
        inv_freq = 1.0 / theta ** (quarter / (head_dim // 2))
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        t, h, w = (int(x) for x in grid_thw.reshape(-1, 3)[0].tolist())
        device = pixel_values.device
        x = self.patch_embed.proj(pixel_values.to(self.patch_embed.proj.weight.dtype))
        freqs = self._rotary_angles(t, h, w, device)
        unit = self.merge * self.merge
        if self.windowed:
            order, window_lens = self._window_order(t, h, w)
            within = torch.arange(unit, device=device)  # the patches of one merged cell
            patch_order = (order.to(device)[:, None] * unit + within).reshape(-1)
            x, freqs = x[patch_order], freqs[patch_order]
            window_mask = self._block_mask([n * unit for n in window_lens], device)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        frame_mask = self._block_mask([h * w] * t, device) if t > 1 else None
        for i, block in enumerate(self.blocks):
            mask = frame_mask if i in self.full_attention_blocks else window_mask
            x = block(x, cos, sin, mask)
        merged = self.merger(x)
        if self.windowed:  # back to the processor's (placeholder) order
            merged = merged[torch.argsort(order.to(device))]
        return merged

    def _rotary_angles(self, t: int, h: int, w: int, device) -> torch.Tensor:
        """[t*h*w, head_dim/2] float32: each patch's row angles, then its column angles, in the
        processor's order (2x2 merge groups consecutive)."""
        m = self.merge
        rows = torch.arange(h, device=device).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
        cols = torch.arange(w, device=device).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        rows = rows.permute(0, 2, 1, 3).reshape(-1).repeat(t)
        cols = cols.permute(0, 2, 1, 3).reshape(-1).repeat(t)
        inv = self.inv_freq.to(device)
        return torch.cat([rows[:, None].float() * inv, cols[:, None].float() * inv], dim=-1)

    def _window_order(self, t: int, h: int, w: int) -> tuple[torch.Tensor, list[int]]:
        """Merged cells regrouped window by window (windows row-major, cells row-major inside),
        and the number of cells in each window."""
        gh, gw = h // self.merge, w // self.merge
        side = self.window_size // self.merge // self.patch_size  # a window's side, in cells
        cells = torch.arange(t * gh * gw).view(t, gh, gw)
        parts = [cells[f, y:y + side, x:x + side].reshape(-1) for f in range(t)
                 for y in range(0, gh, side) for x in range(0, gw, side)]
        return torch.cat(parts), [p.numel() for p in parts]

    @staticmethod
    def _block_mask(lengths: list[int], device) -> torch.Tensor | None:
        """A block-diagonal boolean mask (True: may attend) over segments of these lengths; None
        for a single segment (attend everywhere)."""
        if len(lengths) == 1:
            return None
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                          torch.tensor(lengths, device=device))
        return segment[:, None] == segment[None, :]

    def load_weight(self, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> bool:
        """Copy one checkpoint tensor (name relative to the tower) into `params` (this tower's
        named parameters); False if it has no place."""
        param = params.get(name)
        if param is None:
            return False
        if name == "patch_embed.proj.weight":  # the Conv3d kernel [D, C, T, P, P] as a linear
            tensor = tensor.reshape(tensor.shape[0], -1)
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor visual.{name} has shape {tuple(tensor.shape)}; "
                             f"the vision tower expects {tuple(param.shape)}")
        param.data.copy_(tensor.to(param.dtype))
        return True
