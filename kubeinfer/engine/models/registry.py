"""Architecture name (config.json `architectures`) -> native model class."""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from kubeinfer.engine.config import ConfigError

# architecture -> (module under kubeinfer.engine.models, class); imported lazily so that listing
# architectures stays cheap.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
}

# Configs converted from GGUF, or written by hand, may name only a model_type.
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(hf_config: Any) -> type[nn.Module]:
    """The class for the config's architecture; ConfigError naming the supported ones otherwise."""
    names = list(getattr(hf_config, "architectures", None) or [])
    if not names and getattr(hf_config, "model_type", None) in _MODEL_TYPES:
        names = [_MODEL_TYPES[hf_config.model_type]]
    for name in names:
        if name in _MODELS:
            module, cls = _MODELS[name]
            return getattr(importlib.import_module(f"kubeinfer.engine.models.{module}"), cls)
    shown = ", ".join(names) or f"none (model_type {getattr(hf_config, 'model_type', None)!r})"
    raise ConfigError(f"model architecture {shown} is not supported by kubeinfer. Supported "
                      f"architectures: {', '.join(supported_architectures())}. Serve a model of one of "
                      "these architectures (its config.json `architectures` field names it).")
