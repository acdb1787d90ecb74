"""The Qwen2-VL / Qwen2.5-VL vision tower on its Triton kernels (rotary in float32 mode on strided
q/k views, RMSNorm, residual add fused into the next RMSNorm, SiLU-and-mul on the merged gate_up
GEMM): the rows of a small packed batch equal HF's vision model and the tower's own torch path.

Here rather than in tests/engine/multimodal because this folder's conftest sets TRITON_INTERPRET=1
on a machine with no GPU, so the kernels run (interpreted) on CPU tensors; on a GPU the same test
runs the compiled kernels. Tiny shapes: the interpreter runs each program in Python. Qwen2.5-VL
only: Qwen2-VL's tower (LayerNorm, fc1/fc2) shares the rotary call and adds no kernel path, and
test_qwen2_vl.py compares it with HF.
"""
from __future__ import annotations

import pytest
import torch
import transformers

from kubeinfer.engine.models.qwen2_vl_vision import Qwen2VisionTower
from kubeinfer.kernels import ops

# window 56 pixels = 2 x 2 merged cells: the 6 x 8 patch image has windows of 16 and 8 patches
# (the gathered path), block 1 full attention
# intermediate 44: not a multiple of 8, so the tower pads its SwiGLU to 64 units (padded_width)
VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=44, out_hidden_size=64,
              window_size=56, fullatt_block_indexes=[1], hidden_act="silu", in_channels=3,
              patch_size=14, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.1)
GRIDS = [(1, 6, 8), (1, 4, 4)]  # two images packed in one call


@pytest.fixture(scope="module")
def towers():
    """(HF's vision model, ours with its weights), float32 on the test device."""
    # imported here, not at the top: ~1 s that every xdist worker would pay while collecting
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    from tests.kernels.conftest import DEVICE

    torch.manual_seed(7)
    config = transformers.Qwen2_5_VLConfig(vision_config=VISION).vision_config
    hf = Qwen2_5_VisionTransformerPretrainedModel._from_config(
        config, attn_implementation="sdpa").float().eval()
    ours = Qwen2VisionTower(config, windowed=True).to(DEVICE)
    params = dict(ours.named_parameters())
    filled = {ours.load_weight(params, name, t.to(DEVICE)) for name, t in hf.state_dict().items()
              if not name.startswith("rotary_pos_emb")}
    assert filled == set(params)  # gate_proj and up_proj filled the merged gate_up_proj
    assert ours.blocks[0].mlp.down_proj.weight.shape == (32, 64)  # 44 padded to 64
    return hf, ours


def test_tower_on_triton_equals_hf_and_torch_path(towers, monkeypatch):
    hf, ours = towers
    device = next(ours.parameters()).device
    features = 3 * 2 * 14 * 14
    pixels = torch.randn(sum(t * h * w for t, h, w in GRIDS), features)
    with torch.no_grad():
        want = hf(pixels, grid_thw=torch.tensor(GRIDS)).pooler_output
        monkeypatch.setattr(ops, "backend", "torch")
        torch_path = ours(pixels.to(device), GRIDS).cpu()
        monkeypatch.setattr(ops, "backend", "triton")
        triton_path = ours(pixels.to(device), GRIDS).cpu()
    assert triton_path.shape == want.shape == (sum(h * w for _, h, w in GRIDS) // 4, 64)
    # the rotary is bit-exact; RMSNorm's float32 sum of squares runs in another order in the
    # kernel, and HF's attention is not our SDPA call: float32 noise only
    torch.testing.assert_close(triton_path, torch_path, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(triton_path, want, rtol=1e-4, atol=1e-4)
