"""A pipeline stage's share of a decoder: which layers it holds and what it passes on.

With --pipeline-parallel-size N each stage holds a contiguous range of the decoder layers (the
embedding on the first, the final norm and the LM head on the last). A stage that is not the last
hands the next one its hidden states and residual (`IntermediateTensors`); the layers it does not
hold are `PPMissingLayer`s, so parameter names (model.layers.<i>.) keep the checkpoint's indices.
`layer_range` is the pure split (even, the remainder to the first stages, or the user's
--pp-layer-partition); `stage_layer_range` applies it to this process's stage.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.parallel_state import pp_layer_partition, pp_rank, pp_size


@dataclass
class IntermediateTensors:
    """What a stage passes to the next: [T, hidden] hidden states and residual."""

    hidden_states: torch.Tensor
    residual: torch.Tensor


class PPMissingLayer(nn.Identity):
    """A layer another stage holds: no parameters, never called."""


def layer_range(num_layers: int, stage: int, num_stages: int,
                partition: Sequence[int] | None = None) -> tuple[int, int]:
    """[start, end) of the layers stage `stage` of `num_stages` holds."""
    if partition is None:
        partition = layer_split(num_layers, num_stages)
    check_partition(partition, num_layers, num_stages)
    start = sum(partition[:stage])
    return start, start + partition[stage]


def check_partition(partition: Sequence[int], num_layers: int, num_stages: int) -> None:
    """ConfigError unless `partition` gives each of `num_stages` stages at least one layer and
    all `num_layers` layers in total."""
    if num_layers < num_stages:
        raise ConfigError(f"--pipeline-parallel-size={num_stages} needs at least one decoder layer "
                          f"per stage but the model has {num_layers}; lower "
                          "--pipeline-parallel-size")
    text = ",".join(map(str, partition))
    if len(partition) != num_stages or sum(partition) != num_layers or min(partition) < 1:
        raise ConfigError(f"--pp-layer-partition (KUBEINFER_PP_LAYER_PARTITION) {text!r} must "
                          f"give each of the {num_stages} stages at least one layer and "
                          f"{num_layers} layers in all (the model's num_hidden_layers), e.g. "
                          f"{','.join(map(str, layer_split(num_layers, num_stages)))}")


def layer_split(num_layers: int, num_stages: int) -> list[int]:
    """The even split: the remainder goes to the first stages (the last one also runs the LM
    head)."""
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def stage_layer_range(num_layers: int) -> tuple[int, int]:
    """This process's stage's layers (all of them with one stage)."""
    return layer_range(num_layers, pp_rank(), pp_size(), pp_layer_partition())
