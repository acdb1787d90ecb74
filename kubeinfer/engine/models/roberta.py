"""RoBERTa and XLM-RoBERTa encoders (HF `RobertaModel`, `XLMRobertaModel`: bge-m3, multilingual
e5, ...) and their `*ForSequenceClassification` heads.

The layers are BERT's (`bert.py`); what differs is where positions start. As fairseq did, a token's
position id is padding_idx + 1 + the number of real tokens before it, and pad tokens sit at
padding_idx itself, so the first usable position is padding_idx + 1 and the context is
max_position_embeddings - (padding_idx + 1) tokens (512 of 514 for roberta-base). HF derives the
ids from input_ids (a token equal to the pad id counts as padding wherever it is), and so does
this file, which keeps a batch right-padded with the pad id bit-for-bit equal to HF's.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kubeinfer.engine.models.bert import BertEmbeddings, BertModel


class RobertaEmbeddings(BertEmbeddings):
    def __init__(self, config: Any):
        super().__init__(config)
        self.padding_idx = config.pad_token_id

    def positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L]: padding_idx + the running count of real tokens; pads get padding_idx."""
        real = input_ids.ne(self.padding_idx).long()
        return torch.cumsum(real, dim=1) * real + self.padding_idx


class RobertaModel(BertModel):
    checkpoint_prefix = "roberta."
    embeddings_cls = RobertaEmbeddings

    def __init__(self, config: Any):
        super().__init__(config)
        self.position_offset = config.pad_token_id + 1


class XLMRobertaModel(RobertaModel):
    pass  # the same network; only the tokenizer and vocabulary differ


class RobertaClassificationHead(nn.Module):
    """HF's head: dense + tanh over the <s> token, then out_proj to the labels."""

    def __init__(self, config: Any):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(cls_hidden)))


class RobertaForSequenceClassification(RobertaModel):
    """classify(hidden, mask) -> logits [B, num_labels]; RoBERTa classifiers have no pooler."""

    def __init__(self, config: Any):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.classifier = RobertaClassificationHead(config)

    def classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden[:, 0])


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    pass
