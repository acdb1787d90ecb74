"""Loading HF-named checkpoint tensors into models whose q/k/v and gate/up matrices are fused.

The native models share this loop: a checkpoint
tensor whose name holds a stacked piece (".q_proj.") goes to the fused parameter (".qkv_proj.")
with its shard id; any other goes to the parameter of the same name. Each parameter's
`weight_loader` cuts this rank's slice, so tensor parallelism stays out of the model files.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from kubeinfer.engine.layers.linear import default_weight_loader

# (fused parameter, checkpoint name, shard id), as the weight loaders of the fused layers take them
STACKED_QKV_GATE_UP = [(".qkv_proj.", ".q_proj.", "q"), (".qkv_proj.", ".k_proj.", "k"),
                       (".qkv_proj.", ".v_proj.", "v"), (".gate_up_proj.", ".gate_proj.", 0),
                       (".gate_up_proj.", ".up_proj.", 1)]


def load_stacked_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                         stacked_params_mapping: list[tuple[str, str, str | int]],
                         skip: Callable[[str], bool] = lambda name: False) -> set[str]:
    """Copy checkpoint tensors into `model`; returns the parameter names filled.

    Tensors for which `skip(name)` holds (rotary tables, a tied lm_head) are ignored; a tensor with
    no place in the model is a ValueError naming it, since it means the checkpoint does not match
    its config.json.
    """
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb." in name or skip(name):
            continue
        for fused, piece, shard_id in stacked_params_mapping:
            if piece in name:
                target = name.replace(piece, fused)
                param = params.get(target)
                if param is not None:
                    param.weight_loader(param, tensor, shard_id)
                break
        else:
            target, param = name, params.get(name)
            if param is not None:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}; "
                             "the checkpoint does not match its config.json architecture")
        loaded.add(target)
    return loaded
