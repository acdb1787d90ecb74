"""One step of a pipeline-parallel runner: this stage's forward and the hand-offs around it.

Every rank runs the same steps in the same order (executor.py), and each stage runs them one after
another, so up to one step per stage is in flight (the engine's batch queue, llm_engine.py): stage
0 computes step k + 1 while the last stage computes step k. Nothing waits for the whole pipeline:

- The first stage embeds the input ids; every other stage receives [T, hidden] hidden states and
  residual from the previous stage (point to point, same tensor rank) and sends its own on,
  without waiting for the receiver (the sends of a step are waited on before the next step's).
- The last stage computes the logits (its tensor group gathers the LM head) and its tensor rank 0
  samples. The results go to rank 0 as soon as they are ready (`ResultPusher`, when the sampler
  has a results pipe: pipeline_results.py), or stay there until rank 0 asks for them
  (`pipeline_output`, one call on the sampler's pipe, executor.py: a sampler on another node).
- No rank needs a sampled id on the device: a request is in one step in flight at most
  (in_flight.py), so its next step is scheduled after rank 0 has read its token, and the scheduler
  sends that token to every rank in the step's plan (`SchedulerOutput.resolved_output_tokens`),
  where it replaces the placeholder the rank appended at launch.

A pure-decode step replays the stage's CUDA graph (pipeline_cuda_graphs.py); the others run
eagerly.
"""
from __future__ import annotations

from typing import Any

import torch

from kubeinfer.engine.forward_context import AttentionMetadata, set_forward_context
from kubeinfer.engine.input_batch import StepInputs
from kubeinfer.engine.outputs import ModelRunnerOutput
from kubeinfer.engine.parallel_state import (is_first_stage, is_last_stage, pp_recv_prev,
                                             pp_send_next)
from kubeinfer.engine.pipeline_stage import IntermediateTensors
from kubeinfer.engine.request import PLACEHOLDER
from kubeinfer.engine.sampler import pack
from kubeinfer.engine.scheduler_output import SchedulerOutput

# the runner and its PendingStep are typed Any: model_runner.py imports this module
Runner = Any
Step = Any


def execute_stage_step(runner: Runner, out: SchedulerOutput, step: Step) -> Step:
    """`ModelRunner.execute_model` with pipeline stages: update the batch, launch this stage's
    share of the step, keep it for `pipeline_output` on the sampling rank."""
    _put_resolved_tokens(runner, out.resolved_output_tokens)
    scheduled = {r: n for r, n in out.num_scheduled_tokens.items() if r not in runner._failed}
    if scheduled:
        _launch(runner, step, runner.batch.prepare(scheduled))
    if runner.result_sink is not None:
        runner.result_sink.put(step)  # sent to rank 0 once ready (pipeline_results.py)
    elif runner.is_sampler:
        runner._unread.append(step)  # until rank 0 asks for it (`pipeline_output`)
    return step


def pipeline_output(runner: Runner, index: int) -> ModelRunnerOutput | None:
    """The sampling rank's results of launched step `index` (None on the other ranks, which
    keep no results). Steps are read in launch order; older unread ones are read on the way."""
    if not runner.is_sampler:
        return None
    while runner._unread:
        step = runner._unread.popleft()
        output = runner.get_output(step)
        if step.index == index:
            return output
    raise RuntimeError(f"step {index} is not among the sampling rank's unread steps")


def _put_resolved_tokens(runner: Runner, resolved: dict[str, tuple[int, int]]) -> None:
    """Replace this rank's placeholders with the tokens the last stage sampled (rank 0 read them
    before scheduling the requests again)."""
    for req_id, (index, token) in resolved.items():
        state = runner.batch.states.get(req_id)
        if state is None:
            continue  # a request that could not join: skipped until finished
        if index >= state.num_output_tokens:
            raise RuntimeError(f"request {req_id}: token {index} was sampled, but this rank holds "
                               f"{state.num_output_tokens} outputs")
        state.set_output_token(index, token)


def _launch(runner: Runner, step: Step, inputs: StepInputs) -> None:
    """Run this stage's share of a step; fill `step` as `ModelRunner._launch` does."""
    hidden = _stage_forward(runner, inputs)
    if hidden is not None and inputs.prompt_logits_indices is not None:
        step.prompt_reqs = inputs.prompt_logprobs_reqs
        packed = runner._prompt_logprobs(hidden[runner._to_device(inputs.prompt_logits_indices)],
                                         inputs)
        if packed is not None:
            step.prompt_host = runner._to_host(packed)
    if inputs.sample_states and hidden is not None:
        logits = runner.model.compute_logits(hidden[runner._to_device(inputs.logits_indices)])
        if runner.is_sampler:
            step.meta = runner._sampling_metadata(inputs.sample_states)
            sampled, raw_logprobs = runner.sampler.sample(logits, step.meta)
            step.host = runner._to_host(pack(sampled.long(), raw_logprobs, step.meta))
    # every rank keeps the same batch: a placeholder per sampled token, until its id comes
    step.row_of = {state.req_id: i for i, state in enumerate(inputs.sample_states)}
    step.slots = [(state, state.append_output_token(PLACEHOLDER)) for state in inputs.sample_states]
    if runner.device.type == "cuda" and (step.host is not None or step.prompt_host is not None):
        step.event = torch.cuda.Event()
        step.event.record()


def _stage_forward(runner: Runner, inputs: StepInputs) -> torch.Tensor | None:
    """The last stage's hidden states [T, hidden]; None on the others, after sending theirs on."""
    intermediate = None
    if is_first_stage():
        if (inputs.input_ids == PLACEHOLDER).any():
            raise RuntimeError("a pipeline step's input token is a placeholder: a request was "
                               "scheduled before its previous step was read")
    else:
        shape = (inputs.num_tokens, runner.hf_config.hidden_size)
        hidden, residual = pp_recv_prev([torch.empty(shape, dtype=runner.dtype, device=runner.device)
                                         for _ in range(2)])
        intermediate = IntermediateTensors(hidden, residual)
    graphs = runner.graph_runner
    if graphs is not None and inputs.prompt_logits_indices is None and graphs.can_run(inputs):
        out = graphs.run_stage(inputs, intermediate)
    else:
        meta = AttentionMetadata.from_arrays(inputs.attn, runner._to_device)
        input_ids = runner._to_device(inputs.input_ids) if intermediate is None else None
        with set_forward_context(meta):
            out = runner.model(input_ids, runner._to_device(inputs.positions), intermediate)
    if is_last_stage():
        return out
    pp_send_next([out.hidden_states, out.residual])
    return None
