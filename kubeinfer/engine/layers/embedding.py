"""Token embedding and LM head, split over the vocabulary when tensor parallel.

Rank r holds rows [r * V_per_rank, (r + 1) * V_per_rank) of the padded vocabulary; the last rank's
padding rows are zero and their logits are cut off after the gather. `PositionEmbedding` is GPT-2's
learned absolute position table, small enough to keep whole on every rank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kubeinfer.engine.parallel_state import tp_all_gather, tp_all_reduce, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.shape[0] != self.num_embeddings or loaded_weight.shape[1:] != param.shape[1:]:
            raise ValueError(f"checkpoint embedding of shape {tuple(loaded_weight.shape)} does not match "
                             f"vocab_size={self.num_embeddings}, hidden={param.shape[1]} in config.json")
        rows = min(self.num_embeddings_per_partition, self.num_embeddings - self.vocab_start)
        param.data[:rows].copy_(loaded_weight.narrow(0, self.vocab_start, rows))
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mask = (local < 0) | (local >= self.num_embeddings_per_partition)
        y = F.embedding(local.masked_fill(mask, 0), self.weight)
        y = y.masked_fill(mask.unsqueeze(-1), 0)
        return tp_all_reduce(y)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, dim={self.weight.shape[1]}, tp={self.tp_size}"


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the vocabulary. `tie_to(embedding)` shares the embedding's weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False):
        super().__init__(num_embeddings, embedding_dim)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.num_embeddings_per_partition), requires_grad=False)
            self.bias.weight_loader = self._bias_loader
        else:
            self.register_parameter("bias", None)

    def _bias_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        rows = min(self.num_embeddings_per_partition, self.num_embeddings - self.vocab_start)
        param.data[:rows].copy_(loaded_weight.narrow(0, self.vocab_start, rows))
        param.data[rows:].zero_()

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("call compute_logits(hidden_states); the LM head is not an embedding lookup")

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in the hidden states' dtype."""
        logits = F.linear(hidden_states, self.weight, self.bias)
        if self.tp_size > 1:
            logits = tp_all_gather(logits)[:, : self.num_embeddings]
        return logits


class PositionEmbedding(nn.Module):
    """Learned absolute positions (GPT-2's wpe), replicated on every rank: [max_position, hidden].
    Positions never exceed it: the engine's max_model_len comes from the same config field."""

    def __init__(self, max_position: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_position, embedding_dim), requires_grad=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions, self.weight)

    def extra_repr(self) -> str:
        return f"positions={self.weight.shape[0]}, dim={self.weight.shape[1]}"
