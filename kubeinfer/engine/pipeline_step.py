"""One step of a pipeline-parallel runner: this stage's forward and the hand-offs around it.

Every rank runs the same step (executor.py). The first stage embeds the input ids; every other
stage receives [T, hidden] hidden states and residual from the previous stage (point to point,
same tensor rank) and sends its own to the next. The last stage computes the logits (its tensor
group gathers the LM head) and its tensor rank 0 samples; the sampled ids are broadcast to every
rank of the engine, so each fills the next step's inputs from them on the device and keeps the
same batch. The rest of the results (logprobs, prompt logprobs) stay on the sampling rank; rank 0
fetches them through the executor (`ModelRunner.pipeline_output`). CUDA graphs are not used with
more than one stage: each step runs eagerly.
"""
from __future__ import annotations

from typing import Any

import torch

from kubeinfer.engine.forward_context import AttentionMetadata, set_forward_context
from kubeinfer.engine.input_batch import StepInputs
from kubeinfer.engine.parallel_state import (is_first_stage, is_last_stage, pp_recv_prev,
                                             pp_send_next, sampler_rank, world_broadcast)
from kubeinfer.engine.pipeline_stage import IntermediateTensors
from kubeinfer.engine.request import PLACEHOLDER
from kubeinfer.engine.sampler import pack

# the runner and its PendingStep are typed Any: model_runner.py imports this module
Runner = Any
Step = Any


def launch_stage_step(runner: Runner, step: Step, inputs: StepInputs,
                      prev: Step | None) -> None:
    """Run this stage's share of a step; fill `step` as `ModelRunner._launch` does."""
    hidden = _stage_forward(runner, inputs, prev)
    if hidden is not None and inputs.prompt_logits_indices is not None:
        step.prompt_reqs = inputs.prompt_logprobs_reqs
        packed = runner._prompt_logprobs(hidden[runner._to_device(inputs.prompt_logits_indices)],
                                         inputs)
        if packed is not None:
            step.prompt_host = runner._to_host(packed)
    if not inputs.sample_states:
        return
    num_sample = len(inputs.sample_states)
    if hidden is not None:
        logits = runner.model.compute_logits(hidden[runner._to_device(inputs.logits_indices)])
    if runner.is_sampler:
        step.meta = runner._sampling_metadata(inputs.sample_states)
        sampled, raw_logprobs = runner.sampler.sample(logits, step.meta)
        sampled = world_broadcast(sampled.long().contiguous(), sampler_rank())
        step.host = runner._to_host(pack(sampled, raw_logprobs, step.meta))
    else:
        sampled = world_broadcast(torch.empty(num_sample, dtype=torch.long, device=runner.device),
                                  sampler_rank())
        step.host = runner._to_host(sampled)
    step.sampled = sampled
    step.row_of = {state.req_id: i for i, state in enumerate(inputs.sample_states)}
    step.slots = [(state, state.append_output_token(PLACEHOLDER)) for state in inputs.sample_states]
    if runner.device.type == "cuda":
        step.event = torch.cuda.Event()
        step.event.record()


def _stage_forward(runner: Runner, inputs: StepInputs,
                   prev: Step | None) -> torch.Tensor | None:
    """The last stage's hidden states [T, hidden]; None on the others, after sending theirs on."""
    meta = AttentionMetadata.from_arrays(inputs.attn, runner._to_device)
    positions = runner._to_device(inputs.positions)
    input_ids, intermediate = None, None
    if is_first_stage():
        fill_ids = runner._filler(inputs, prev)
        input_ids = runner._to_device(inputs.input_ids)
        if fill_ids is not None:
            # on CPU the tensor shares the numpy array's memory: keep the host's placeholders
            input_ids = input_ids.clone() if runner.device.type == "cpu" else input_ids
            fill_ids(input_ids)
    else:
        shape = (inputs.num_tokens, runner.hf_config.hidden_size)
        hidden, residual = pp_recv_prev([torch.empty(shape, dtype=runner.dtype, device=runner.device)
                                         for _ in range(2)])
        intermediate = IntermediateTensors(hidden, residual)
    with set_forward_context(meta):
        out = runner.model(input_ids, positions, intermediate)
    if is_last_stage():
        return out
    pp_send_next([out.hidden_states, out.residual])
    return None
