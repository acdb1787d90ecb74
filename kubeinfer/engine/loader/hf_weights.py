"""Checkpoint tensors -> a transformers model built on the meta device (the transformers backend).

Checkpoints on the hub keep their historical layout while transformers 5 models fuse some weights
(Mixtral's per-expert w1/w2/w3 become one `experts.gate_up_proj` tensor, `block_sparse_moe` becomes
`mlp`); transformers' own conversion rules (`conversion_mapping`) translate the one into the other, so
they are applied here exactly as `from_pretrained` applies them. With transformers 4, which has no
conversions, names map one to one.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from kubeinfer.engine.loader.meta_init import meta_parameter_names

logger = logging.getLogger(__name__)


def load_hf_weights(hf_model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                    device: torch.device, dtype: torch.dtype) -> None:
    """Fill `hf_model`'s parameters from (checkpoint name, tensor) pairs, then re-tie tied weights.

    Raises ValueError naming the parameters the checkpoint did not provide.
    """
    state = dict(weights)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:  # transformers 4: checkpoint names are the model's names
        _load_by_name(hf_model, state, device)
    else:
        config = LoadStateDictConfig(device_map={"": device}, dtype=dtype,
                                     weight_mapping=get_model_conversion_mapping(hf_model))
        info, _ = convert_and_load_state_dict_in_model(hf_model, state, config)
        if info.unexpected_keys:
            logger.debug("checkpoint tensors with no place in %s (ignored): %s",
                         type(hf_model).__name__, sorted(info.unexpected_keys)[:10])
        if getattr(info, "mismatched_keys", None):
            raise ValueError(f"checkpoint tensors of the wrong shape: {sorted(info.mismatched_keys)[:5]}")
    del state
    hf_model.tie_weights()
    missing = meta_parameter_names(hf_model)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} weights that {type(hf_model).__name__} "
                         f"needs (e.g. {', '.join(missing[:3])})")


@torch.no_grad()
def _load_by_name(hf_model: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> None:
    prefix = getattr(hf_model, "base_model_prefix", "")
    for name in dict(hf_model.named_parameters()):
        tensor = state.get(name)
        if tensor is None and prefix and name.startswith(prefix + "."):
            tensor = state.get(name[len(prefix) + 1:])  # base-model checkpoints lack the prefix
        if tensor is None:
            continue
        module_name, _, attr = name.rpartition(".")
        module = hf_model.get_submodule(module_name)
        old = module._parameters[attr]
        if tuple(tensor.shape) != tuple(old.shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the model "
                             f"expects {tuple(old.shape)}")
        module._parameters[attr] = nn.Parameter(tensor.to(device=device, dtype=old.dtype),
                                                requires_grad=False)
