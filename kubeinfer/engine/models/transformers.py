"""The transformers backend: any decoder-only transformers model over our paged KV cache.

As vLLM's `TransformersForCausalLM`: the model is transformers' own class, built with its parameters
on the meta device and filled from the checkpoint; its attention is ours (layers/
transformers_attention.py registers it as `attn_implementation="kubeinfer"` and gives every attention
module a real `Attention` submodule, so the runner binds the KV cache as for a native model). The
engine's step is one flattened sequence of every request's new tokens, so the base model runs with
batch 1 and `position_ids=positions[None]`: rotary embeddings are the model's own, computed from the
positions, and transformers builds no mask and keeps no cache of its own. Hidden states come from the
base model and logits from the LM head (`compute_logits`), with the head's scaling that the
architectures' `forward` applies (Cohere's `logit_scale`, Granite's `logits_scaling`, Gemma 2's final
soft-capping).

Tensor parallelism is not implemented for the backend yet: it is refused with TP > 1.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.linear import tp_size
from kubeinfer.engine.layers.transformers_attention import (ATTN_IMPLEMENTATION, attach_attention,
                                                            probe_shapes, register_attention)
from kubeinfer.engine.loader.hf_weights import load_hf_weights
from kubeinfer.engine.loader.meta_init import params_on_meta
from kubeinfer.engine.models.transformers_support import hf_causal_lm_class, unsupported_reason


class TransformersForCausalLM(nn.Module):
    """The model runner's interface (see models/llama.py) over a transformers causal LM."""

    def __init__(self, config: Any):
        super().__init__()
        reason = unsupported_reason(config)
        if reason:
            raise ConfigError(f"the transformers backend cannot run {_name(config)}: {reason}.")
        if tp_size() > 1:
            raise ConfigError(f"{_name(config)} runs on the transformers backend, which does not "
                              "support tensor parallelism yet; serve it with --tensor-parallel-size 1.")
        register_attention()
        # The engine's hf_config stays as loaded; the transformers model gets its own copy that
        # selects our attention and no cache.
        hf_config = copy.deepcopy(config)
        hf_config._attn_implementation = ATTN_IMPLEMENTATION
        hf_config.use_cache = False
        self.config = config
        self.device = torch.get_default_device()
        self.dtype = torch.get_default_dtype()
        cls = hf_causal_lm_class(config)
        with params_on_meta():
            self.model = cls._from_config(hf_config, dtype=self.dtype, attn_implementation=ATTN_IMPLEMENTATION)
        self.model.eval()
        self.attn_layers = attach_attention(self.model, hf_config)
        if not self.attn_layers:
            raise ConfigError(f"the transformers backend found no attention modules in "
                              f"{cls.__name__}, so it cannot page its KV cache")
        self.base = self.model.base_model
        self.lm_head = self.model.get_output_embeddings()
        self.logit_scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere: multiply
        self.logits_scaling = float(getattr(config, "logits_scaling", None) or 1.0)  # Granite: divide
        self.final_softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [T], positions [T] (the step's requests end to end) -> hidden [T, hidden]."""
        out = self.base(input_ids=input_ids[None], position_ids=positions[None], attention_mask=None,
                        use_cache=False, return_dict=True)
        return out.last_hidden_state[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Fill the model from HF-named checkpoint tensors (transformers' own renames and fusions
        applied); returns the parameter names filled."""
        load_hf_weights(self.model, weights, self.device, self.dtype)
        self._probe()
        return {name for name, _ in self.named_parameters()}

    def tie_weights(self) -> None:
        """After dummy weights: tie as the checkpoint would, then settle the attention shapes."""
        self.model.tie_weights()
        self._probe()

    @torch.no_grad()
    def _probe(self) -> None:
        """One token through the model without a cache, so that every Attention takes the head
        layout its module really produces before the runner lays out the KV cache."""
        one = torch.zeros(1, dtype=torch.long, device=self.device)
        with probe_shapes():
            self.forward(one, one)
        shapes = {(a.num_kv_heads, a.head_dim) for a in self.attn_layers}
        if len(shapes) > 1:
            raise ConfigError(f"{_name(self.config)} has layers with different KV head layouts "
                              f"(KV heads, head size) {sorted(shapes)}; kubeinfer's KV cache holds one "
                              "layout for all layers")


def _name(config: Any) -> str:
    names = getattr(config, "architectures", None) or []
    return ", ".join(names) or f"model_type {getattr(config, 'model_type', None)!r}"
