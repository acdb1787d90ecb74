"""rank_profiler: torch.profiler on every rank through collective_rpc("profile", ...), for
benchmarks/profile_ttft.py; a summary of plain data (it travels back down the workers' pipes)."""
import pickle

import pytest
import torch

from kubeinfer import LLM, SamplingParams
from kubeinfer.engine import rank_profiler


def test_stop_summarises_what_ran_between_start_and_stop():
    rank_profiler.start()
    with pytest.raises(RuntimeError, match="already running"):
        rank_profiler.start()
    a = torch.randn(64, 64)
    for _ in range(3):
        a = a @ a
    summary = rank_profiler.stop()
    names = {name: calls for name, _, calls in summary["host_ops_ms"]}
    assert names.get("aten::mm") == 3
    assert pickle.loads(pickle.dumps(summary)) == summary
    with pytest.raises(RuntimeError, match="not running"):
        rank_profiler.stop()


def test_every_rank_profiles_through_the_executor(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu", max_model_len=128,
              num_gpu_blocks_override=16)
    llm.engine.executor.collective_rpc("profile", "start")
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2), use_tqdm=False)
    (summary,) = llm.engine.executor.collective_rpc("profile", "stop")
    assert any(name == "aten::mm" or name == "aten::addmm" for name, _, _ in summary["host_ops_ms"])
