"""Build the model (a native class or the transformers backend) and fill it with a checkpoint's weights
(or dummy ones)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.loader.hf_config import load_hf_config
from kubeinfer.engine.loader.meta_init import materialize_meta_params
from kubeinfer.engine.loader.resolve import resolve_model
from kubeinfer.engine.loader.weights import init_dummy_weights, iterate_weights
from kubeinfer.engine.models.registry import get_model_class

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


def config_dtype(hf_config: Any) -> torch.dtype:
    """The dtype config.json states (`dtype`, or `torch_dtype` before transformers 5); float32 when
    it states none, as checkpoints saved without one were float32."""
    value = getattr(hf_config, "dtype", None) or hf_config.__dict__.get("torch_dtype")
    if isinstance(value, str):
        value = _DTYPES.get(value.removeprefix("torch."))
    return value if isinstance(value, torch.dtype) else torch.float32


def resolve_dtype(dtype: str, hf_config: Any, device: str | torch.device) -> torch.dtype:
    """--dtype -> torch dtype. 'auto' is the config's dtype, except that CPU runs bf16/fp16 models in
    float32 because CPU half-precision matmuls are slow; an explicit dtype is always honoured."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ConfigError(f"--dtype {dtype!r} is not supported; "
                              "choose auto, bfloat16, float16 or float32")
        return _DTYPES[dtype]
    wanted = config_dtype(hf_config)
    if torch.device(device).type == "cpu" and wanted in (torch.bfloat16, torch.float16):
        return torch.float32
    return wanted


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def load_model(model_config: Any, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               path: Path | None = None, runner: str = "generate") -> tuple[nn.Module, Any]:
    """Resolve, build and load the model; returns (model in eval mode on `device`, hf_config).

    Args:
        model_config: a ModelConfig (model, dtype, load_format, seed, trust_remote_code, revision).
        device: where parameters are created; weights stream from CPU shard by shard.
        dtype: overrides model_config.dtype when given.
        path: the already-resolved model folder, to skip resolve_model.
        runner: "generate" (decoders, the default) or "pooling" (encoder-only embedding models).
    """
    path = Path(path) if path is not None else resolve_model(model_config)
    hf_config = load_hf_config(path, model_config)
    model_cls = get_model_class(hf_config, runner, getattr(model_config, "model_impl", "auto"))
    if dtype is None:
        dtype = resolve_dtype(model_config.dtype, hf_config, device)
    with _default_dtype(dtype), torch.device(device):
        model = model_cls(hf_config)
    if model_config.load_format == "dummy":
        # the transformers backend builds its parameters on the meta device
        materialize_meta_params(model, device)
        init_dummy_weights(model, model_config.seed)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return model.eval(), hf_config
    try:
        loaded = model.load_weights(iterate_weights(path, model_config.load_format))
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"loading the weights in {path} failed: {e}") from None
    missing = sorted({name for name, _ in model.named_parameters()} - loaded)
    if missing:
        raise ConfigError(f"the checkpoint in {path} lacks {len(missing)} weights that "
                          f"{model_cls.__name__} needs (e.g. {', '.join(missing[:3])}); it is incomplete "
                          "or does not match its config.json. Download it again.")
    return model.eval(), hf_config
