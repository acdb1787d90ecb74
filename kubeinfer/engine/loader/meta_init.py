"""Build a model with its parameters on the meta device, and give them real storage afterwards.

Parameters of a model built from a transformers class would otherwise be allocated and randomly
initialised only to be overwritten by the checkpoint (slow on CPU, a second copy of the weights on a
GPU). Buffers stay real: rotary tables (`inv_freq`) are computed in `__init__` and never saved, so a
meta buffer could not be filled from the checkpoint.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Within this block every registered parameter is moved to the meta device (no storage)."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            meta = param.to("meta")
            module._parameters[name] = type(param)(meta, requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def meta_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.device.type == "meta"]


@torch.no_grad()
def materialize_meta_params(model: nn.Module, device: torch.device | str) -> None:
    """Give every meta parameter uninitialised storage on `device` (dummy weights fill them next).
    A parameter shared by several modules (tied embeddings) stays shared."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in done:
                done[id(param)] = type(param)(torch.empty(param.shape, dtype=param.dtype, device=device),
                                              requires_grad=False)
            module._parameters[name] = done[id(param)]
