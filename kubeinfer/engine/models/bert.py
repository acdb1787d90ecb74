"""BERT encoder (HF `BertModel`): the backbone of sentence-transformers embedding models such as
all-MiniLM-L6-v2, bge and e5, and `BertForSequenceClassification` (the same encoder, HF's tanh
pooler over [CLS] and a linear classifier). `roberta.py` builds RoBERTa/XLM-R on these classes.

Encoder-only and bidirectional, so there is no KV cache and no paging: the embedding engine hands
it a right-padded batch and a mask of the real tokens, and every layer attends over the whole
sequence with torch's scaled_dot_product_attention, padding keys masked out. Module names mirror
HF's, so checkpoint tensors map one to one (with or without the `bert.` prefix that task heads
such as BertForMaskedLM put in front).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.linear import default_weight_loader

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> [B, L, hidden]. One segment (token type 0), as embedding requests
        are."""
        x = (self.word_embeddings(input_ids) + self.position_embeddings(self.positions(input_ids))
             + self.token_type_embeddings.weight[0])
        return self.LayerNorm(x)

    def positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Position ids, [L] or [B, L]: BERT counts from 0 in every row."""
        return torch.arange(input_ids.shape[1], device=input_ids.device)


class BertSelfAttention(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, hidden], mask [B, 1, 1, L] (True: a real key) -> [B, L, hidden]."""
        b, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)),
                                             heads(self.value(x)), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, length, -1)


class BertSelfOutput(nn.Module):
    """Projection, residual add and post-LayerNorm; HF names it the same in attention and MLP."""

    def __init__(self, config: Any, in_size: int):
        super().__init__()
        self.dense = nn.Linear(in_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act_fn = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """The pooling runner's interface: forward(input_ids [B, L], attention_mask [B, L] bool) ->
    hidden states [B, L, hidden]; load_weights(HF names) -> the parameter names filled;
    `default_pooling_type`, the pooler without sentence-transformers files (vLLM's encoder
    default); `position_offset`, positions the model reserves below its first token (the
    context is max_position_embeddings minus it). Classifiers add classify() (below)."""

    default_pooling_type = "CLS"
    position_offset = 0
    checkpoint_prefix = "bert."  # what task-head checkpoints put in front of the encoder's names
    embeddings_cls = BertEmbeddings
    # checkpoint tensors an embedding model does not use: HF's tanh pooler over [CLS] and the
    # pre-training heads (`cls.` for BERT, `lm_head.` for RoBERTa)
    skipped_prefixes: tuple[str, ...] = ("pooler.", "cls.", "lm_head.")

    def __init__(self, config: Any):
        super().__init__()
        _check_config(config)
        self.config = config
        self.embeddings = self.embeddings_cls(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        mask = attention_mask[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors into this model; returns the parameter names filled.

        `skipped_prefixes` and buffers (`position_ids`, `token_type_ids`) are skipped; TF-era
        `gamma`/`beta` LayerNorm names are read as weight/bias.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix(self.checkpoint_prefix)
            if (name.startswith(self.skipped_prefixes)
                    or name.endswith(("position_ids", "token_type_ids"))):
                continue
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
                "LayerNorm.beta", "LayerNorm.bias")
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in "
                                 f"{type(self).__name__}; the checkpoint does not match its "
                                 "config.json architecture")
            default_weight_loader(param, tensor)
            loaded.add(name)
        return loaded


class BertPooler(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_hidden))


class BertForSequenceClassification(BertModel):
    """HF `BertForSequenceClassification`: classify(hidden, mask) -> logits [B, num_labels] from
    the tanh pooler over [CLS] and a linear classifier (dropout is off at inference)."""

    skipped_prefixes = ("cls.",)

    def __init__(self, config: Any):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.pooler = BertPooler(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(hidden[:, 0]))


def _check_config(config: Any) -> None:
    if config.hidden_act not in _ACTIVATIONS:
        raise ConfigError(f"hidden_act {config.hidden_act!r} in config.json is not supported by the "
                          f"native BERT model; supported: {', '.join(_ACTIVATIONS)}")
    kind = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if kind != "absolute":
        raise ConfigError(f"position_embedding_type {kind!r} in config.json is not supported by "
                          "the native BERT model; only 'absolute' is")
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"hidden_size ({config.hidden_size}) is not divisible by "
                          f"num_attention_heads ({config.num_attention_heads}) in config.json")
