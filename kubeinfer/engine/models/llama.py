"""Llama-family decoder: Llama 2/3/3.1, Mistral, Qwen2, Qwen3 and SmolLM.

They differ only in small switches read from the config: q/k/v bias (Qwen2 always, others by
`attention_bias`), per-head q/k RMSNorm before rotary (Qwen3), an explicit head_dim, sliding-window
layers, RoPE scaling and tied embeddings. Model code stays single-device and compile-free; tensor
parallelism lives in the layers, the paged cache in `Attention` and the step's metadata in the
forward context.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.activation import SiluAndMul
from kubeinfer.engine.layers.attention import Attention
from kubeinfer.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kubeinfer.engine.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                            RowParallelLinear)
from kubeinfer.engine.layers.norm import RMSNorm
from kubeinfer.engine.layers.rotary import RotaryEmbedding, get_rope
from kubeinfer.engine.parallel_state import is_first_stage, is_last_stage
from kubeinfer.engine.models.stacked_weights import load_stacked_weights
from kubeinfer.engine.pipeline_stage import (IntermediateTensors, PPMissingLayer,
                                             stage_layer_range)


def _sliding_window(config: Any, layer_idx: int) -> int | None:
    """The window of one layer: Qwen configs name sliding layers in layer_types, Mistral's applies to
    all layers."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, qkv_bias: bool,
                 qk_norm: bool):
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // total_heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_kv_heads, bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden,
                                        bias=getattr(config, "attention_bias", False))
        self.rotary_emb = rotary_emb
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads,
                              sliding_window=_sliding_window(config, layer_idx))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, intermediate_size: int | None = None, reduce_results: bool = True):
        super().__init__()
        if config.hidden_act != "silu":
            raise ConfigError(f"hidden_act {config.hidden_act!r} in config.json is not supported by the "
                              "native Llama-family model; only 'silu' is")
        bias = getattr(config, "mlp_bias", False)
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias,
                                           reduce_results=reduce_results)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, qkv_bias: bool,
                 qk_norm: bool, mlp: nn.Module):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, qkv_bias, qk_norm)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    """The decoder stack, or this pipeline stage's share of it: layers [start, end), the embedding
    on the first stage, the final norm on the last (pipeline_stage.py)."""

    def __init__(self, config: Any, qkv_bias: bool, qk_norm: bool,
                 make_mlp: Callable[[Any, int], nn.Module] = lambda config, _: LlamaMLP(config)):
        super().__init__()
        self.is_first, self.is_last = is_first_stage(), is_last_stage()
        self.start, self.end = stage_layer_range(config.num_hidden_layers)
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size)
                             if self.is_first else PPMissingLayer())
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # One table shared by all layers: for Llama 3.1 it is 131072 x 128 float32 (64 MiB).
        rotary_emb = get_rope(config, head_dim)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary_emb, qkv_bias, qk_norm, make_mlp(config, i))
            if self.start <= i < self.end else PPMissingLayer()
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.is_last else PPMissingLayer()

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        if self.is_first:
            # a vision-language model passes the embeddings with its images merged in (llava.py)
            hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            residual = None
        else:
            hidden_states, residual = intermediate.hidden_states, intermediate.residual
        for layer in self.layers[self.start:self.end]:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not self.is_last:
            return IntermediateTensors(hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """The model runner's interface: forward(input_ids [T], positions [T]) -> hidden [T, hidden];
    compute_logits(hidden [N, hidden]) -> float32 logits [N, vocab]; load_weights(HF names)."""

    supports_pp = True  # pipeline stages: LlamaModel holds a stage's layers (pipeline_stage.py)
    qkv_bias_always = False  # Qwen2 has q/k/v bias without saying so in its config
    qk_norm = False  # Qwen3 normalises each head of q and k before rotary
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}
    # (fused parameter, checkpoint name, shard id) for the weight loaders
    stacked_params_mapping = [(".qkv_proj.", ".q_proj.", "q"), (".qkv_proj.", ".k_proj.", "k"),
                              (".qkv_proj.", ".v_proj.", "v"), (".gate_up_proj.", ".gate_proj.", 0),
                              (".gate_up_proj.", ".up_proj.", 1)]

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        qkv_bias = self.qkv_bias_always or getattr(config, "attention_bias", False)
        self.model = LlamaModel(config, qkv_bias, self.qk_norm, self.make_mlp)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = (ParallelLMHead(config.vocab_size, config.hidden_size)
                        if self.model.is_last else PPMissingLayer())
        # a last stage without the embedding loads its tied LM head from the embedding's tensor
        self.lm_head_from_embedding = self.tie_word_embeddings and not self.model.is_first
        if self.tie_word_embeddings and self.model.is_first and self.model.is_last:
            self.lm_head.tie_to(self.model.embed_tokens)

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        """The feed-forward block of layer `layer_idx`: forward(hidden [T, H]) -> [T, H]. The
        mixture-of-experts families return their sparse block here."""
        return LlamaMLP(config)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        """Hidden states [T, hidden]; on a pipeline stage other than the last, what the next
        stage takes as `intermediate` (the first stage takes input ids, the others don't)."""
        return self.model(input_ids, positions, intermediate, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors into this model; returns the parameter names filled.

        q/k/v_proj land in qkv_proj and gate/up_proj in gate_up_proj; rotary tables, a tied
        lm_head and the layers of other pipeline stages are skipped.
        """
        named = ((n, t) for n, t in ((self._checkpoint_name(n), t) for n, t in weights)
                 if n is not None)
        return load_stacked_weights(self, named, self.stacked_params_mapping)

    def _checkpoint_name(self, name: str) -> str | None:
        """The parameter a checkpoint tensor fills (None: not on this rank)."""
        if self.tie_word_embeddings and name.startswith("lm_head."):
            return None
        if self.lm_head_from_embedding and name == "model.embed_tokens.weight":
            return "lm_head.weight"  # a tied head on a last stage that holds no embedding
        return None if self._on_another_stage(name) else name

    def _on_another_stage(self, name: str) -> bool:
        """Whether a checkpoint tensor belongs to a layer another pipeline stage holds."""
        model = self.model
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            return not model.start <= index < model.end
        return ((name.startswith("model.embed_tokens.") and not model.is_first)
                or (name.startswith(("model.norm.", "lm_head.")) and not model.is_last))


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_always = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
