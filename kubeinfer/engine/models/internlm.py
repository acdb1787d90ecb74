"""InternLM3: Llama with its own names for the attention bias switches.

transformers serves model_type internlm3 with its Llama model. InternLM3's remote config sets
`qkv_bias` (q/k/v) and `bias` (o_proj and the MLP), which the Llama layout can follow only when they
agree, as transformers also requires; they map to Llama's `attention_bias` and `mlp_bias` before the
Llama model is built. (InternLM v1 is not served: transformers has no implementation to check it by.)
"""
from __future__ import annotations

from typing import Any

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.models.llama import LlamaForCausalLM


class InternLM3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any):
        if not hasattr(config, "attention_bias"):  # the remote config's names
            qkv_bias, bias = bool(getattr(config, "qkv_bias", False)), bool(getattr(config, "bias", False))
            if qkv_bias != bias:
                raise ConfigError(f"this InternLM3 config has qkv_bias={qkv_bias} and bias={bias}; "
                                  "kubeinfer's Llama-based InternLM3 needs them equal, as transformers does")
            config.attention_bias = config.mlp_bias = bias
        super().__init__(config)
