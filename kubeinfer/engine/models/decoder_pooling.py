"""Decoder LMs as pooling models: a `*ForCausalLM` class turned into an embedder (gte-Qwen2,
e5-mistral; vLLM's `--convert embed`) or a sequence classifier / reward model
(`LlamaForSequenceClassification`, `Qwen2ForSequenceClassification`; vLLM's `--convert classify`).

`as_pooling_model(causal_cls, task)` subclasses the native decoder, so its layers, rotary and
weight loading are reused as they are; the language-model head is dropped (a classifier gets HF's
bias-free `score` layer instead). The pooling runner hands every model a right-padded batch
[B, L] and a mask; a decoder reads it causally, each row on its own. Rather than a second
attention path, the rows' real tokens are laid end to end and run as one step of fresh prefills
over a scratch paged KV cache, the same attention metadata and kernels the generate runner uses
(Triton on CUDA, the torch reference elsewhere). The cache holds nothing between batches; the
engine reserves it at start-up for its largest step (`reserve_cache`), so a cache that cannot fit
is a start-up error rather than a failed batch.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.forward_context import AttentionMetadata, set_forward_context
from kubeinfer.engine.layers.attention import get_attention_layers
from kubeinfer.engine.layers.linear import default_weight_loader
from kubeinfer.engine.pooling_params import POOLING_TASKS
_BLOCK_SIZE = 16  # a power of two, as the Triton kernels split slots with shifts and masks
_classes: dict[tuple[type, str], type] = {}


def as_pooling_model(causal_cls: type[nn.Module], task: str) -> type[nn.Module]:
    """The pooling-runner class for a native decoder class: task "embed" (hidden states, pooled
    LAST by default) or "classify" (adds classify()). One class per (decoder, task)."""
    if task not in POOLING_TASKS:
        raise ValueError(f"task must be one of {POOLING_TASKS}, got {task!r}")
    key = (causal_cls, task)
    if key not in _classes:
        base = _DecoderClassifier if task == "classify" else _DecoderEmbedder
        suffix = "ForSequenceClassification" if task == "classify" else "Embedding"
        name = causal_cls.__name__.removesuffix("ForCausalLM") + suffix
        _classes[key] = type(name, (base, causal_cls), {"__module__": __name__})
    return _classes[key]


class _DecoderEmbedder(nn.Module):
    """Mixed in before a `*ForCausalLM` class (see as_pooling_model)."""

    default_pooling_type = "LAST"  # vLLM's default for a converted decoder, normalized
    position_offset = 0

    def __init__(self, config: Any):
        super().__init__(config)
        # Built with the causal LM, then dropped: a pooling model never computes logits. (Tied
        # embeddings share the token table, so nothing is freed there.)
        del self.lm_head
        self._num_cache_blocks = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] right-padded, attention_mask [B, L] bool -> hidden [B, L, hidden]
        (zeros at padding). Each row attends causally over its own tokens only."""
        batch, length = input_ids.shape
        lens = attention_mask.sum(1)
        positions = (torch.cumsum(attention_mask.long(), dim=1) - 1)[attention_mask]
        meta = self._prefill_metadata(lens, positions)
        with set_forward_context(meta):
            flat = super().forward(input_ids[attention_mask], positions)
        out = flat.new_zeros(batch, length, flat.shape[-1])
        out[attention_mask] = flat
        return out

    def _prefill_metadata(self, lens: torch.Tensor, positions: torch.Tensor) -> AttentionMetadata:
        """Each row a fresh prefill over its own consecutive blocks of the scratch cache."""
        device = lens.device
        blocks_per_row = (lens + _BLOCK_SIZE - 1) // _BLOCK_SIZE
        self._ensure_cache(int(blocks_per_row.sum()), device)
        first_block = torch.cumsum(blocks_per_row, 0) - blocks_per_row
        width = int(blocks_per_row.max())
        block_tables = (first_block[:, None]
                        + torch.arange(width, device=device)[None, :]).to(torch.int32)
        row_of_token = torch.repeat_interleave(torch.arange(lens.shape[0], device=device), lens)
        slot_mapping = ((first_block[row_of_token] + positions // _BLOCK_SIZE) * _BLOCK_SIZE
                        + positions % _BLOCK_SIZE).long()
        query_start_loc = torch.zeros(lens.shape[0] + 1, dtype=torch.int32, device=device)
        query_start_loc[1:] = torch.cumsum(lens, 0)
        longest = int(lens.max())
        return AttentionMetadata(slot_mapping=slot_mapping, query_start_loc=query_start_loc,
                                 seq_lens=lens.to(torch.int32), block_tables=block_tables,
                                 max_query_len=longest, max_seq_len=longest)

    def reserve_cache(self, num_tokens: int, num_rows: int) -> None:
        """Size the scratch cache for steps of up to `num_tokens` real tokens in `num_rows` rows
        (each row rounds up to whole blocks). ConfigError when it does not fit."""
        param = next(self.parameters())
        num_blocks = -(-num_tokens // _BLOCK_SIZE) + num_rows
        try:
            self._ensure_cache(num_blocks, param.device)
        except torch.OutOfMemoryError:
            layers = get_attention_layers(self)
            per_block = sum(2 * _BLOCK_SIZE * a.num_kv_heads * a.head_dim for a in layers)
            need = num_blocks * per_block * param.element_size() / 2**30
            raise ConfigError(
                f"the KV cache a decoder needs to embed {num_tokens} tokens per step "
                f"({need:.1f} GiB) does not fit on {param.device}. Lower --max-model-len or "
                "--max-num-batched-tokens (and --max-num-seqs).") from None

    def _ensure_cache(self, num_blocks: int, device: torch.device) -> None:
        if num_blocks <= self._num_cache_blocks:
            return
        dtype = next(self.parameters()).dtype
        self._num_cache_blocks = 0  # until the new one is bound everywhere
        for layer in get_attention_layers(self):
            layer.k_cache = layer.v_cache = torch.tensor([])  # free the old one before growing
        for layer in get_attention_layers(self):
            shape = (num_blocks, _BLOCK_SIZE, layer.num_kv_heads, layer.head_dim)
            layer.bind_kv_cache(torch.empty(shape, dtype=dtype, device=device),
                                torch.empty(shape, dtype=dtype, device=device))
        self._num_cache_blocks = num_blocks

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The decoder's loader over HF names; `lm_head.` is skipped, and checkpoints of the bare
        model (`LlamaModel`, `Qwen2Model`: names without the `model.` prefix) are read too."""
        return super().load_weights(self._decoder_weights(weights))

    def _decoder_weights(self, weights: Iterable[tuple[str, torch.Tensor]]
                         ) -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name.startswith("lm_head."):
                continue
            yield (name if name.startswith("model.") else f"model.{name}"), tensor


class _DecoderClassifier(_DecoderEmbedder):
    """HF's `*ForSequenceClassification` for decoders: `score` (no bias) over the last token."""

    def __init__(self, config: Any):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, hidden] -> logits [B, num_labels] at each row's last real token."""
        last = attention_mask.sum(1) - 1
        return self.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        score: list[torch.Tensor] = []

        def split(items: Iterable[tuple[str, torch.Tensor]]):
            for name, tensor in items:
                if name == "score.weight":
                    score.append(tensor)
                else:
                    yield name, tensor

        loaded = super().load_weights(split(weights))
        if score:
            default_weight_loader(self.score.weight, score[0])
            loaded.add("score.weight")
        return loaded
