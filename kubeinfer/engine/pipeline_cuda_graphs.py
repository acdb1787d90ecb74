"""CUDA graphs for one pipeline stage's share of a pure-decode step.

As `cuda_graphs.py`'s, one graph per captured batch size over persistent buffers, with the stage's
own inputs and outputs: a stage after the first reads the previous stage's hidden states and
residual from two more buffers (the received tensors are copied in before the replay), and a stage
before the last writes its hidden states and residual to buffers whose rows are cloned before they
are sent, since the send runs beside the next step's replay, which overwrites the buffers. The
sends and receives stay outside the graphs (pipeline_step.py). Every stage of a step decides alike
whether the graph runs (the batch is the same on every rank), though nothing depends on it: the
hidden states passed on are [T, hidden] either way.
"""
from __future__ import annotations

import torch

from kubeinfer.engine.cuda_graphs import CUDAGraphRunner
from kubeinfer.engine.input_batch import StepInputs
from kubeinfer.engine.parallel_state import is_first_stage, is_last_stage
from kubeinfer.engine.pipeline_stage import IntermediateTensors


class StageGraphRunner(CUDAGraphRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_first, self.is_last = is_first_stage(), is_last_stage()
        self.in_hidden = None if self.is_first else torch.zeros_like(self.hidden)
        self.in_residual = None if self.is_first else torch.zeros_like(self.hidden)
        self.out_residual = None if self.is_last else torch.zeros_like(self.hidden)

    def _forward(self, size: int) -> None:
        intermediate = None
        if not self.is_first:
            intermediate = IntermediateTensors(self.in_hidden[:size], self.in_residual[:size])
        out = self.model(self.input_ids[:size] if self.is_first else None, self.positions[:size],
                         intermediate)
        if self.is_last:
            self.hidden[:size] = out
        else:
            self.hidden[:size] = out.hidden_states
            self.out_residual[:size] = out.residual

    def run_stage(self, batch: StepInputs, intermediate: IntermediateTensors | None
                  ) -> torch.Tensor | IntermediateTensors:
        """Replay this stage's graph for a pure-decode batch: the last stage's hidden states
        [num_reqs, hidden], or what the next stage takes."""
        num = batch.num_reqs
        if not self.is_first:
            self.in_hidden[:num].copy_(intermediate.hidden_states)
            self.in_residual[:num].copy_(intermediate.residual)
        hidden = self.run(batch)
        if self.is_last:
            return hidden
        return IntermediateTensors(hidden.clone(), self.out_residual[:num].clone())
