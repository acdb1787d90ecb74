"""Which transformers class runs a config, and why the transformers backend cannot run one.

The backend runs a decoder-only model only when transformers' implementation sends its attention
through the `AttentionInterface` (`_supports_attention_backend`), since that is the one place our
paged attention can enter; everything else is refused with the reason, never run with wrong tokens.
"""
from __future__ import annotations

from typing import Any

# model_type -> why the backend refuses it, for families whose reason is more specific than
# "no attention interface".
_REASONS = {
    "bloom": "transformers' Bloom adds its ALiBi biases outside the attention interface (kubeinfer "
             "serves Bloom natively: use --model-impl auto)",
    "mpt": "transformers' MPT adds its ALiBi biases outside the attention interface (kubeinfer "
           "serves MPT natively: use --model-impl auto)",
    "mamba": "it is a state-space model (no attention, no KV cache)",
    "mamba2": "it is a state-space model (no attention, no KV cache)",
    "falcon_mamba": "it is a state-space model (no attention, no KV cache)",
    "jamba": "it is a hybrid of attention and Mamba state-space layers; kubeinfer has no "
             "state cache for the Mamba layers",
}


# model_type of models whose attention does go through the AttentionInterface although their class
# does not say so (`_supports_attention_backend` False); each is verified token for token against
# transformers in tests/engine/test_model_registry.py.
_ROUTES_ATTENTION_UNFLAGGED = {"stablelm"}


def hf_causal_lm_class(hf_config: Any) -> type | None:
    """The transformers class named by config.json `architectures`; for a config that names none,
    the causal-LM class registered for its model_type. None when transformers has no such class (an
    unknown name is never swapped for its model_type's class: it may be custom code of another shape)."""
    import transformers

    names = getattr(hf_config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    if names:
        return None
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    except (KeyError, ValueError):
        return None


def unsupported_reason(hf_config: Any) -> str | None:
    """None when the transformers backend can run this config, else why not (a sentence ending
    without a period, to be completed by the caller's advice)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type in _REASONS:
        return _REASONS[model_type]
    if getattr(hf_config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model; kubeinfer serves decoder-only models"
    if model_type == "falcon" and getattr(hf_config, "alibi", False):
        return _REASONS["bloom"]
    cls = hf_causal_lm_class(hf_config)
    if cls is None:
        return "transformers has no causal-LM implementation of it"
    if not getattr(cls, "_supports_attention_backend", False) and model_type not in _ROUTES_ATTENTION_UNFLAGGED:
        return (f"transformers' {cls.__name__} does not route its attention through the "
                "AttentionInterface (`_supports_attention_backend` is False), so kubeinfer's paged "
                "attention cannot take its place")
    return None

