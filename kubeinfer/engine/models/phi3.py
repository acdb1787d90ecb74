"""Phi-3 and Phi-4 decoder (Phi3ForCausalLM): the Llama block with two differences, made explicit.

- The checkpoint stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` matrix. They are
  cut into their pieces here and each piece goes through the fused layer's own weight loader, so
  every rank still gets its own slice of q, k, v, gate and up under tensor parallelism.
- `longrope` RoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): per-frequency rescaling by `short_factor` or
  `long_factor`, and cos/sin multiplied by the attention factor sqrt(1 + ln(s) / ln(L0)), s the
  ratio of max_position_embeddings to the pretrained length L0 (or the config's explicit
  `attention_factor`), both as transformers computes them. HF switches to the long factors once a
  sequence grows past L0, which makes a token's rotation depend on how long its sequence later
  gets; a paged cache cannot rewrite keys already stored, so, like vLLM, the choice is made once:
  the long factors whenever the model serves a context longer than L0 (max_position_embeddings
  > L0), the short ones otherwise. Sequences longer than L0 then match HF exactly.

Phi-4-mini's partial rotary (partial_rotary_factor 0.75) and Phi-3's sliding window on every layer
come through the shared rotary and attention layers.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kubeinfer.engine.layers.norm import RMSNorm
from kubeinfer.engine.layers.rotary import RotaryEmbedding, get_rope, rope_parameters
from kubeinfer.engine.models.llama import LlamaDecoderLayer, LlamaMLP
from kubeinfer.engine.models.stacked_weights import STACKED_QKV_GATE_UP, load_stacked_weights


def longrope_original_max(config: Any) -> int:
    params = rope_parameters(config)
    original = params.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None)
    if not original:
        raise ConfigError("a longrope config needs original_max_position_embeddings (the pretrained "
                          "context length) in config.json")
    return int(original)


def get_phi3_rope(config: Any, head_dim: int) -> RotaryEmbedding:
    """The rotary table: HF's default/other RoPE through get_rope; longrope as described above."""
    params = rope_parameters(config)
    if params["rope_type"] != "longrope":
        return get_rope(config, head_dim)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original = longrope_original_max(config)
    use_long = config.max_position_embeddings > original
    # HF picks the long factors for seq_len > original; passing original + 1 asks for them.
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](
        config, torch.device("cpu"), seq_len=original + 1 if use_long else None)
    return RotaryEmbedding(head_dim, inv_freq.float(), config.max_position_embeddings,
                           float(attention_factor))


class Phi3Model(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary_emb = get_phi3_rope(config, head_dim)
        bias = bool(getattr(config, "attention_bias", False))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, rotary_emb, qkv_bias=bias, qk_norm=False,
                                                      mlp=LlamaMLP(config))
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class Phi3ForCausalLM(nn.Module):
    """The model runner's interface: forward(input_ids [T], positions [T]) -> hidden [T, hidden];
    compute_logits(hidden [N, hidden]) -> float32 logits [N, vocab]; load_weights(HF names)."""

    packed_modules_mapping = {"qkv_proj": ["qkv_proj"], "gate_up_proj": ["gate_up_proj"]}

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states).float()

    def _split_fused(self, weights: Iterable[tuple[str, torch.Tensor]]
                     ) -> Iterable[tuple[str, torch.Tensor]]:
        """qkv_proj -> q_proj, k_proj, v_proj and gate_up_proj -> gate_proj, up_proj, the names the
        fused layers' loaders take shard by shard."""
        attn = self.model.layers[0].self_attn
        q_total = attn.qkv_proj.total_num_heads * attn.head_dim
        kv_total = attn.qkv_proj.total_num_kv_heads * attn.head_dim
        for name, tensor in weights:
            if ".qkv_proj." in name:
                if tensor.shape[0] != q_total + 2 * kv_total:
                    raise ValueError(f"checkpoint tensor {name!r} has {tensor.shape[0]} rows; the "
                                     f"config's heads need {q_total + 2 * kv_total} (q {q_total}, "
                                     f"k and v {kv_total} each)")
                for piece, part in zip(("q", "k", "v"), tensor.split([q_total, kv_total, kv_total])):
                    yield name.replace(".qkv_proj.", f".{piece}_proj."), part
            elif ".gate_up_proj." in name:
                if tensor.shape[0] % 2:
                    raise ValueError(f"checkpoint tensor {name!r} has an odd number of rows "
                                     f"({tensor.shape[0]}); gate_up_proj stacks gate and up")
                gate, up = tensor.chunk(2, dim=0)
                yield name.replace(".gate_up_proj.", ".gate_proj."), gate
                yield name.replace(".gate_up_proj.", ".up_proj."), up
            else:
                yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors in (fused or split q/k/v and gate/up); returns the
        parameter names filled."""
        tied = self.tie_word_embeddings
        return load_stacked_weights(self, self._split_fused(weights), STACKED_QKV_GATE_UP,
                                    skip=lambda name: tied and name.startswith("lm_head."))
