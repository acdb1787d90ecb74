"""A pipeline stage's CUDA-graph runner (pipeline_cuda_graphs.py), its buffers checked on CPU: the
graphs are stood in for by replays that run the recorded forward eagerly, so what is tested is what
a real graph replays (the stage's inputs copied into its buffers, padding rows, the outputs taken
from the buffers and cloned before they are sent). Two stages of the tiny Llama, built in this
process with each stage's parallel state, give the one-device model's hidden states through the
graph runners as through the eager forward."""
import numpy as np
import pytest
import torch

from kubeinfer.engine import parallel_state
from kubeinfer.engine.config import ModelConfig
from kubeinfer.engine.forward_context import AttentionMetadata, set_forward_context
from kubeinfer.engine.input_batch import InputBatch
from kubeinfer.engine.layers.attention import allocate_kv_cache, get_attention_layers
from kubeinfer.engine.loader.model import load_model
from kubeinfer.engine.pipeline_cuda_graphs import StageGraphRunner
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.scheduler_output import NewRequestData

BLOCK, NUM_BLOCKS = 4, 16


class EagerReplay:
    """Stands in for a captured graph: replaying runs the recorded forward now."""

    def __init__(self, runner, size):
        self.runner, self.size = runner, size

    def replay(self):
        with set_forward_context(self.runner._meta(self.size)):
            self.runner._forward(self.size)


def as_stage(monkeypatch, stage, num_stages, build):
    with monkeypatch.context() as m:
        m.setattr(parallel_state, "_PP_RANKS", list(range(num_stages)) if num_stages > 1 else None)
        m.setattr(parallel_state, "_PP_RANK", stage)
        return build()


def stage_model(path, kv):
    model, config = load_model(ModelConfig(model=str(path), dtype="float32"), "cpu")
    layers = get_attention_layers(model)
    kv.append(allocate_kv_cache(layers, NUM_BLOCKS, BLOCK, torch.float32, "cpu"))
    return model, config


def graph_runner(model, config, capture_sizes):
    runner = StageGraphRunner(model, max_batch_size=max(capture_sizes), max_model_len=32,
                              block_size=BLOCK, hidden_size=config.hidden_size,
                              dtype=torch.float32, device=torch.device("cpu"))
    runner.sizes = capture_sizes
    runner.graphs = {s: EagerReplay(runner, s) for s in capture_sizes}
    return runner


@pytest.fixture
def decode_batch():
    """Three requests, one token each (a decode-shaped step: one query row per request)."""
    batch = InputBatch(BLOCK)
    for i, token in enumerate((5, 17, 42)):
        batch.add_request(NewRequestData(
            req_id=str(i), prompt_token_ids=[token], output_token_ids=[],
            sampling_params=SamplingParams(), eos_token_ids=frozenset(), block_ids=[i],
            num_computed_tokens=0))
    inputs = batch.prepare({"0": 1, "1": 1, "2": 1})
    assert inputs.is_pure_decode
    return inputs


def eager(model, inputs, intermediate=None):
    meta = AttentionMetadata.from_arrays(inputs.attn, torch.from_numpy)
    ids = None if intermediate is not None else torch.from_numpy(inputs.input_ids)
    with set_forward_context(meta):
        return model(ids, torch.from_numpy(inputs.positions), intermediate)


def test_stage_graphs_give_the_one_device_hidden_states(monkeypatch, tiny_model_dir, decode_batch):
    path = tiny_model_dir("llama")
    kv = []  # keeps each model's cache alive
    full, _ = as_stage(monkeypatch, 0, 1, lambda: stage_model(path, kv))
    expected = eager(full, decode_batch)
    first, config = as_stage(monkeypatch, 0, 2, lambda: stage_model(path, kv))
    last, _ = as_stage(monkeypatch, 1, 2, lambda: stage_model(path, kv))
    first_graphs = as_stage(monkeypatch, 0, 2, lambda: graph_runner(first, config, [1, 4]))
    last_graphs = as_stage(monkeypatch, 1, 2, lambda: graph_runner(last, config, [1, 4]))
    assert first_graphs.can_run(decode_batch)
    for _ in range(2):  # the second round finds the buffers dirty from the first
        sent = first_graphs.run_stage(decode_batch, None)
        assert sent.hidden_states.shape == (3, config.hidden_size)
        # what was sent must not change when the buffers are written again (the next replay)
        before = sent.hidden_states.clone(), sent.residual.clone()
        first_graphs.hidden.fill_(np.nan)
        first_graphs.out_residual.fill_(np.nan)
        assert torch.equal(sent.hidden_states, before[0]) and torch.equal(sent.residual, before[1])
        got = last_graphs.run_stage(decode_batch, sent)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the eager stages agree too
    torch.testing.assert_close(eager(last, decode_batch, eager(first, decode_batch)), expected,
                               rtol=1e-5, atol=1e-5)
