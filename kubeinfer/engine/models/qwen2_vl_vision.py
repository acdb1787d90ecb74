"""The Qwen2-VL / Qwen2.5-VL vision tower, native: the images of a step packed into one call (their
patches end to end, as HF's cu_seqlens), from the processor's flattened patches to the decoder's
image rows.

- Patch embedding: HF's Conv3d has kernel == stride == one patch (temporal_patch_size x patch x
  patch over 3 channels), so on the processor's already flattened patches it is one linear layer
  (the checkpoint's 5-D kernel is reshaped as it loads).
- Blocks: pre-norm attention with 2-D rotary (half the rotary features turn with the patch's row,
  half with its column; neox layout, float32 as HF) and an MLP. Qwen2-VL: LayerNorm and a
  fc1/act/fc2 MLP. Qwen2.5-VL: RMSNorm and SwiGLU with biases, and window attention: patches are
  regrouped window by window (`window_size` pixels square, in merged cells), and every block
  except those at `fullatt_block_indexes` attends only within its window.
- Elementwise work goes through kubeinfer.kernels.ops (one Triton kernel each on a GPU, the torch
  references elsewhere), each with HF's rounding: the rotary of q and k read in place from the
  QKV output (float32 math, a cos|sin row per patch), RMSNorm, and for RMSNorm towers the
  residual add fused into the next norm (`x + delta` rounded to x's dtype, as HF's
  `x = x + attn(...)`); SwiGLU's gate and up are one GEMM (merged as the weights load) and one
  act-and-mul kernel.
- Patch merger: a norm, then each 2x2 group of neighbouring patches (consecutive in the
  processor's order) concatenated and projected by a two-layer MLP to the decoder's width; the
  window regrouping is undone on the merged rows.

Attention runs per segment (a window, or a frame at the full-attention blocks), never over the
whole pack with a mask: segments of one length are stacked into [segments, heads, length, dim]
and go through one SDPA call (a view when they are all one length, as a 448-pixel image's 16
windows of 64 patches; a gather otherwise), so window attention costs windows, not the square of
all patches. Everything that depends only on an image's grid (window order, rotary angles) is
built on the host once per grid and kept on the device; a call reads grids from the host, so the
tower never waits for the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kubeinfer.kernels import ops


class VisionRMSNorm(nn.Module):
    """HF's Qwen2-VL RMSNorm: normalised in float32, cast back, then scaled."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)  # HF's formula (reference.rms_norm)


def _add_norm(norm: nn.Module, delta: torch.Tensor | None, residual: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + delta), residual + delta); the sum rounded to the stream's dtype once, as
    HF's `x = x + f(x)`. One kernel for RMSNorm; delta None: nothing to add."""
    if delta is None:
        return norm(residual), residual
    if isinstance(norm, VisionRMSNorm):
        return ops.fused_add_rms_norm(delta, residual, norm.weight, norm.eps)
    residual = residual + delta
    return norm(residual), residual


def _activation(name: str):
    from transformers.activations import ACT2FN  # the exact functions the checkpoints name

    return ACT2FN[name]


# hidden_act -> the fused act-and-mul op with the same function (HF's silu is F.silu, its
# gelu_pytorch_tanh F.gelu(approximate="tanh")); any other activation runs as two torch ops
_ACT_AND_MUL = {"silu": ops.silu_and_mul, "swish": ops.silu_and_mul,
                "gelu_pytorch_tanh": ops.gelu_tanh_and_mul}


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, segments: Segments) -> torch.Tensor:
        """x [N, dim]; cos_sin [N, head_dim] float32, row i patch i's cos | sin."""
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, self.head_dim)
        # q and k read in place from the GEMM's output (strided views), turned by one kernel
        # with HF's float32 vision math; v stays a view
        q, k = ops.rotary_embedding(None, qkv[:, 0], qkv[:, 1], cos_sin, float32_math=True)
        return self.proj(segments.attend(q, k, qkv[:, 2]).reshape(n, -1))


@dataclass
class Segments:
    """Attention segments of a packed sequence of N rows: `uniform` = (count, length) when all
    segments have one length (then [N, ...] is a view [count, length, ...]); otherwise `groups`,
    per distinct length an index [count, length] of the rows (on the device)."""

    uniform: tuple[int, int] | None
    groups: list[torch.Tensor]

    @classmethod
    def of(cls, lengths: list[int], device) -> Segments:
        if len(set(lengths)) == 1:
            return cls((len(lengths), lengths[0]), [])
        starts, at = {}, 0
        for n in lengths:
            starts.setdefault(n, []).append(at)
            at += n
        groups = [torch.tensor(s, dtype=torch.long, device="cpu")[:, None]
                  + torch.arange(n, device="cpu")
                  for n, s in starts.items()]
        return cls(None, [_host_to(g, device) for g in groups])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [N, heads, dim] -> [N, heads, dim], each row attending within its segment."""
        if self.uniform is not None:
            b, n = self.uniform
            return _sdpa(*(t.view(b, n, *t.shape[1:]) for t in (q, k, v))).reshape(q.shape)
        out = torch.empty_like(q)
        for index in self.groups:
            out[index] = _sdpa(q[index], k[index], v[index])
        return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, L, heads, dim] each -> [B, L, heads, dim], no mask (flash/efficient kernels apply)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _host_to(t: torch.Tensor, device) -> torch.Tensor:
    if torch.device(device).type == "cuda":  # pinned: the copy does not wait for the stream
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def padded_width(hidden: int) -> int:
    """The SwiGLU width the tower computes with: `hidden` itself when its bf16 rows are 16-byte
    aligned, else the next multiple of 64. Qwen2.5-VL's 3,420 is not: its down projection's
    input rows (6,840 bytes) sent cuBLAS to align-2 sm80 kernels, a fifth of the H100 prefill
    steps' GPU time (profile_bench_phases.py). The extra units have zero gate, up and down weights
    and biases, so they add exact zeros."""
    return hidden if hidden % 8 == 0 else -(-hidden // 64) * 64


class VisionMLP(nn.Module):
    """fc1/act/fc2 (Qwen2-VL) or gate/up/down with biases (Qwen2.5-VL's SwiGLU; gate and up are
    one [2 * width, dim] layer, gate's rows first, filled by `Qwen2VisionTower.load_weight`;
    width = padded_width(hidden))."""

    def __init__(self, dim: int, hidden: int, act: str, gated: bool):
        super().__init__()
        self.gated, self.act = gated, _activation(act)
        if gated:
            self.hidden, width = hidden, padded_width(hidden)
            self.gate_up_proj = nn.Linear(dim, 2 * width)
            self.down_proj = nn.Linear(width, dim)
            self.act_and_mul = _ACT_AND_MUL.get(act)
        else:
            self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.fc2(self.act(self.fc1(x)))
        gate_up = self.gate_up_proj(x)
        if self.act_and_mul is not None:
            return self.down_proj(self.act_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp: VisionMLP, make_norm):
        super().__init__()
        self.norm1, self.norm2 = make_norm(dim), make_norm(dim)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, delta: torch.Tensor | None, residual: torch.Tensor, cos_sin: torch.Tensor,
                segments: Segments) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's `x = x + attn(norm1(x)); x = x + mlp(norm2(x))` with the last add left to the
        next norm: x is residual + delta (delta None: x is residual). Returns (delta, residual)
        for the next block."""
        h, residual = _add_norm(self.norm1, delta, residual)
        h, residual = _add_norm(self.norm2, self.attn(h, cos_sin, segments), residual)
        return self.mlp(h), residual


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, dim: int, merge: int, make_norm):
        super().__init__()
        self.width = dim * merge * merge
        self.ln_q = make_norm(dim)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(),
                                 nn.Linear(self.width, out_dim))

    def forward(self, delta: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
        """Merges x = residual + delta (the last block's pending add, fused into ln_q)."""
        return self.mlp(_add_norm(self.ln_q, delta, residual)[0].view(-1, self.width))


@dataclass
class _GridLayout:
    """One image grid's index and angle tensors (device), and its segment lengths (host)."""

    num_patches: int
    num_cells: int
    cos_sin: torch.Tensor  # [patches, head_dim] float32: cos | sin of the head_dim/2 angles,
    # in the tower's (window) order (kernels.ops.rotary_embedding's table layout)
    frame_lens: list[int]  # full attention: one segment a frame
    window_lens: list[int]  # window attention (Qwen2.5-VL), in patches
    patch_order: torch.Tensor | None  # [patches]: the window order of the processor's patches
    cell_unorder: torch.Tensor | None  # [cells]: merged rows back to the processor's order


class Qwen2VisionTower(nn.Module):
    """forward(pixel_values [N, C*T*P*P], grids [(t, h, w), ...]) -> [N / merge**2, out_dim]."""

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
        self.inv_freq_host = inv_freq  # the angles are built on the host, once per grid
        self._layouts: dict[tuple, _GridLayout] = {}

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]
                ) -> torch.Tensor:
        """pixel_values [sum of t*h*w, features]: the images' patches end to end; grids: each
        image's (t, h, w) in patches, host ints. Returns [sum of t*h*w / merge**2, out_dim], the
        images' rows end to end, each in its placeholder order."""
        device = pixel_values.device
        layouts = [self._grid_layout(tuple(int(v) for v in g), device) for g in grids]
        x = self.patch_embed.proj(pixel_values.to(self.patch_embed.proj.weight.dtype))
        cos_sin = torch.cat([lay.cos_sin for lay in layouts]) if len(layouts) > 1 \
            else layouts[0].cos_sin
        frames = Segments.of([n for lay in layouts for n in lay.frame_lens], device)
        windows = None
        if self.windowed:
            x = x[self._packed(layouts, "patch_order", "num_patches")]
            windows = Segments.of([n for lay in layouts for n in lay.window_lens], device)
        delta = None
        for i, block in enumerate(self.blocks):
            delta, x = block(delta, x, cos_sin,
                             frames if i in self.full_attention_blocks else windows)
        merged = self.merger(delta, x)
        if self.windowed:  # back to the processor's (placeholder) order
            merged = merged[self._packed(layouts, "cell_unorder", "num_cells")]
        return merged

    @staticmethod
    def _packed(layouts: list[_GridLayout], attr: str, size: str) -> torch.Tensor:
        """The images' index tensors end to end, each shifted by the rows before it."""
        if len(layouts) == 1:
            return getattr(layouts[0], attr)
        parts, at = [], 0
        for lay in layouts:
            parts.append(getattr(lay, attr) + at)
            at += getattr(lay, size)
        return torch.cat(parts)

    def _grid_layout(self, grid: tuple[int, int, int], device) -> _GridLayout:
        """What depends only on an image's grid, built on the host once and kept on the device
        (a few distinct sizes in practice; the cache is bounded all the same)."""
        key = (grid, str(device))
        lay = self._layouts.get(key)
        if lay is None:
            if len(self._layouts) >= 64:
                self._layouts.pop(next(iter(self._layouts)))
            lay = self._layouts[key] = self._build_layout(*grid, device)
        return lay

    def _build_layout(self, t: int, h: int, w: int, device) -> _GridLayout:
        unit = self.merge * self.merge
        freqs = self._rotary_angles(t, h, w)
        patch_order = cell_unorder = None
        window_lens: list[int] = []
        if self.windowed:
            order, cells = self._window_order(t, h, w)
            within = torch.arange(unit, device="cpu")  # the patches of one merged cell
            patch_order = (order[:, None] * unit + within).reshape(-1)
            freqs = freqs[patch_order]
            cell_unorder = _host_to(torch.argsort(order), device)
            patch_order = _host_to(patch_order, device)
            window_lens = [n * unit for n in cells]
        # HF's emb = cat(freqs, freqs): both halves' cos (sin) are these, as the kernel reads them
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        return _GridLayout(t * h * w, t * h * w // unit, _host_to(cos_sin, device), [h * w] * t,
                           window_lens, patch_order, cell_unorder)

    def _rotary_angles(self, t: int, h: int, w: int) -> torch.Tensor:
        """[t*h*w, head_dim/2] float32 on the host: each patch's row angles, then its column
        angles, in the processor's order (2x2 merge groups consecutive)."""
        m = self.merge
        rows = torch.arange(h, device="cpu").view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
        cols = torch.arange(w, device="cpu").view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        rows = rows.permute(0, 2, 1, 3).reshape(-1).repeat(t)
        cols = cols.permute(0, 2, 1, 3).reshape(-1).repeat(t)
        inv = self.inv_freq_host
        return torch.cat([rows[:, None].float() * inv, cols[:, None].float() * inv], dim=-1)

    def _window_order(self, t: int, h: int, w: int) -> tuple[torch.Tensor, list[int]]:
        """Merged cells regrouped window by window (windows row-major, cells row-major inside),
        and the number of cells in each window."""
        gh, gw = h // self.merge, w // self.merge
        side = self.window_size // self.merge // self.patch_size  # a window's side, in cells
        cells = torch.arange(t * gh * gw, device="cpu").view(t, gh, gw)
        parts = [cells[f, y:y + side, x:x + side].reshape(-1) for f in range(t)
                 for y in range(0, gh, side) for x in range(0, gw, side)]
        return torch.cat(parts), [p.numel() for p in parts]

    def load_weight(self, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor
                    ) -> str | None:
        """Copy one checkpoint tensor (name relative to the tower) into `params` (this tower's
        named parameters). Returns the parameter it filled (gate_proj / up_proj fill one half of
        gate_up_proj), None if it has no place."""
        target, rows = name, None
        for part, half in ((".mlp.gate_proj.", 0), (".mlp.up_proj.", 1)):
            if part in name:
                target = name.replace(part, ".mlp.gate_up_proj.")
                rows = half
        param = params.get(target)
        if param is None:
            return None
        if name == "patch_embed.proj.weight":  # the Conv3d kernel [D, C, T, P, P] as a linear
            tensor = tensor.reshape(tensor.shape[0], -1)
        dest = param.data
        if rows is not None:  # gate's rows first, then up's (the act-and-mul kernels' layout)
            width = dest.shape[0] // 2
            half = dest[rows * width:(rows + 1) * width]
            dest, pad = half[:tensor.shape[0]], half[tensor.shape[0]:]
            pad.zero_()  # padded_width's extra units: exact zeros
        elif target.endswith(".mlp.down_proj.weight") and dest.shape[1] > tensor.shape[1]:
            dest[:, tensor.shape[1]:].zero_()
            dest = dest[:, :tensor.shape[1]]
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor visual.{name} has shape {tuple(tensor.shape)}; "
                             f"the vision tower expects {tuple(dest.shape)}")
        dest.copy_(tensor.to(dest.dtype))
        return target
