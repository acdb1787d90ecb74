"""On a GPU: Qwen2.5-VL with images through the Triton rotary kernel (per-token M-RoPE tables),
the native vision tower on the device and CUDA graphs whose position buffer holds three rows;
greedy ids equal HF transformers' on the CPU (float32). Skipped where no GPU is present;
benchmarks/gpu_suite.py's `tests` step runs it."""
from __future__ import annotations

import pytest
import torch

from kubeinfer.engine.llm import LLM
from kubeinfer.engine.sampling_params import SamplingParams
from tests.engine.multimodal.test_qwen2_vl import hf_greedy
from tests.engine.multimodal.test_vlm_models import conversation, images, pil_part
from tests.fixtures.tiny_vlm import save_tiny_vlm_weights

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("eager", [False, True], ids=["graphs-async", "eager-async"])
def test_gpu_qwen2_5_vl_matches_hf(tiny_vlm_dir, eager):
    from kubeinfer.engine.multimodal.qwen2_vl_processor import load_qwen2_vl_processor

    family = "qwen2_5_vl"
    folder = tiny_vlm_dir(family)
    model = save_tiny_vlm_weights(folder, family)
    proc = load_qwen2_vl_processor(folder, family)
    batch = [images(2, seed=101), images(1, seed=103), []]
    max_new = 12  # most of them decode steps: CUDA-graph replays unless eager
    want = [hf_greedy(model, proc, len(imgs), imgs, max_new=max_new) for imgs in batch]
    llm = LLM(str(folder), dtype="float32", device="cuda", enforce_eager=eager, max_model_len=512,
              max_num_batched_tokens=64, gpu_memory_utilization=0.3)
    try:
        graphs = llm.engine.runner.graph_runner
        assert (graphs is None) == eager
        if graphs is not None:
            assert graphs.positions.dim() == 2 and graphs.positions.shape[0] == 3
        params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
        for _ in range(2):  # second round: prefix-cache hits
            outs = llm.chat([conversation(len(imgs), image_part=pil_part(imgs)) for imgs in batch],
                            params)
            assert [o.outputs[0].token_ids for o in outs] == want
    finally:
        llm.shutdown()
