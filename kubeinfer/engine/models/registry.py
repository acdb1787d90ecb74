"""Architecture name (config.json `architectures`) -> native model class, and the runner it gets.

Pooling architectures (encoders, bare decoders, sequence classifiers) are served by the pooling
runner; a generative decoder can be too, with `--runner pooling` (an embedder, as vLLM's
`--convert embed`), through `decoder_pooling.as_pooling_model`.
"""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from kubeinfer.engine.config import RUNNERS
from kubeinfer.engine.errors import ConfigError

# architecture -> (module under kubeinfer.engine.models, class); imported lazily so that listing
# architectures stays cheap.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
    "GemmaForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    # Llama under another name. Yi and Solar 10.7B checkpoints already say LlamaForCausalLM.
    # Aquila, Xverse and InternLM v1 are not mapped: transformers has no implementation of them, so
    # their tokens could not be checked against a reference; Orion (LayerNorm) and Solar Pro
    # (SolarForCausalLM, extra skip connections) are not Llama.
    "InternLM3ForCausalLM": ("internlm", "InternLM3ForCausalLM"),
}

# Pooling architectures, served by the pooling runner, never by the generator: architecture ->
# (module, class, task the decoder class is converted to; None for a class that pools as it is).
_POOLING_MODELS: dict[str, tuple[str, str, str | None]] = {
    "BertModel": ("bert", "BertModel", None),
    "RobertaModel": ("roberta", "RobertaModel", None),
    "XLMRobertaModel": ("roberta", "XLMRobertaModel", None),
    "BertForSequenceClassification": ("bert", "BertForSequenceClassification", None),
    "RobertaForSequenceClassification": ("roberta", "RobertaForSequenceClassification", None),
    "XLMRobertaForSequenceClassification": ("roberta", "XLMRobertaForSequenceClassification",
                                            None),
    # bare decoders (e5-mistral-7b-instruct says MistralModel), embedders as they are saved
    "LlamaModel": ("llama", "LlamaForCausalLM", "embed"),
    "MistralModel": ("llama", "MistralForCausalLM", "embed"),
    "Qwen2Model": ("llama", "Qwen2ForCausalLM", "embed"),
    "Qwen3Model": ("llama", "Qwen3ForCausalLM", "embed"),
    # decoder classifiers and reward models: HF's `score` over the last token
    "LlamaForSequenceClassification": ("llama", "LlamaForCausalLM", "classify"),
    "MistralForSequenceClassification": ("llama", "MistralForCausalLM", "classify"),
    "Qwen2ForSequenceClassification": ("llama", "Qwen2ForCausalLM", "classify"),
    "Qwen3ForSequenceClassification": ("llama", "Qwen3ForCausalLM", "classify"),
}

# Configs converted from GGUF, or written by hand, may name only a model_type.
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                "internlm3": "InternLM3ForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted([*_MODELS, *_POOLING_MODELS])


def _architectures(hf_config: Any) -> list[str]:
    names = list(getattr(hf_config, "architectures", None) or [])
    if not names and getattr(hf_config, "model_type", None) in _MODEL_TYPES:
        names = [_MODEL_TYPES[hf_config.model_type]]
    return names


def resolve_runner(runner: str, hf_config: Any) -> str:
    """--runner auto|generate|pooling -> "generate" or "pooling", as vLLM picks: auto is pooling for
    the pooling architectures (BertModel, XLMRobertaModel, *ForSequenceClassification, ...),
    generate otherwise; pooling on a generative decoder makes it an embedder. A runner the
    architecture cannot do is a ConfigError saying which one it can."""
    if runner not in RUNNERS:
        raise ConfigError(f"--runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    names = _architectures(hf_config)
    is_pooling = any(n in _POOLING_MODELS for n in names)
    shown = ", ".join(names) or "this model"
    if runner == "auto":
        return "pooling" if is_pooling else "generate"
    if runner == "generate" and is_pooling:
        raise ConfigError(f"{shown} is an embedding or classification model and cannot generate "
                          "text: serve it with --runner pooling (or auto) and call /v1/embeddings "
                          "(or /classify for a classifier).")
    if runner == "pooling" and not is_pooling and not any(n in _MODELS for n in names):
        raise ConfigError(f"--runner pooling supports the pooling architectures "
                          f"{', '.join(sorted(_POOLING_MODELS))} and, as embedders, the decoders "
                          f"{', '.join(sorted(_MODELS))}; {shown} is none of them.")
    return runner


def get_model_class(hf_config: Any, runner: str = "generate") -> type[nn.Module]:
    """The class for the config's architecture under a resolved runner ("generate" or "pooling");
    ConfigError naming the supported ones otherwise. Under pooling a generative decoder becomes
    an embedder."""
    names = _architectures(hf_config)
    if runner == "generate":
        resolve_runner("generate", hf_config)  # an embedding model gets the --runner hint
    tables = ([_POOLING_MODELS, {k: (*v, "embed") for k, v in _MODELS.items()}]
              if runner == "pooling" else [_MODELS])
    for table in tables:
        for name in names:
            if name in table:
                return _load_class(*table[name])
    shown = ", ".join(names) or f"none (model_type {getattr(hf_config, 'model_type', None)!r})"
    raise ConfigError(f"model architecture {shown} is not supported by kubeinfer. Supported "
                      f"architectures: {', '.join(supported_architectures())}. Serve a model of one of "
                      "these architectures (its config.json `architectures` field names it).")


def _load_class(module: str, cls: str, task: str | None = None) -> type[nn.Module]:
    model_cls = getattr(importlib.import_module(f"kubeinfer.engine.models.{module}"), cls)
    if task is None:
        return model_cls
    from kubeinfer.engine.models.decoder_pooling import as_pooling_model

    return as_pooling_model(model_cls, task)
