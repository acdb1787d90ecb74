"""InternLM (v1) and InternLM3: Llama with their own names for the attention bias switches.

Their config.json files need --trust-remote-code (transformers has no InternLM v1 config; it serves
model_type internlm3 with its Llama model). InternLM v1 sets `bias` for q/k/v and o_proj together;
InternLM3's remote config sets `qkv_bias` (q/k/v) and `bias` (o_proj and the MLP), which the Llama
layout can follow only when they agree, as transformers also requires. Both map to Llama's
`attention_bias` (and `mlp_bias`) before the Llama model is built.
"""
from __future__ import annotations

from typing import Any

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.models.llama import LlamaForCausalLM


class InternLMForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any):
        if not hasattr(config, "attention_bias"):
            config.attention_bias = bool(getattr(config, "bias", False))
        rotary = getattr(config, "rotary", None)  # later v1 configs: {"base": 10000, "type": ...}
        if isinstance(rotary, dict) and "base" in rotary and not getattr(config, "rope_theta", None):
            config.rope_theta = float(rotary["base"])
        super().__init__(config)


class InternLM3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any):
        if not hasattr(config, "attention_bias"):  # the remote config's names
            qkv_bias, bias = bool(getattr(config, "qkv_bias", False)), bool(getattr(config, "bias", False))
            if qkv_bias != bias:
                raise ConfigError(f"this InternLM3 config has qkv_bias={qkv_bias} and bias={bias}; "
                                  "kubeinfer's Llama-based InternLM3 needs them equal, as transformers does")
            config.attention_bias = config.mlp_bias = bias
        super().__init__(config)
