"""GPTBigCode decoder (GPTBigCodeForCausalLM): SantaCoder, StarCoder (1), WizardCoder and the like.

The GPT-2 block (gpt2.py) with its differences explicit: plain nn.Linear checkpoints (no Conv1D
transpose), and multi-query attention (`multi_query`, the default): one K/V head shared by every
query head, `c_attn` holding [q (hidden) | k (head_dim) | v (head_dim)]. Under tensor parallelism
that one KV head is replicated on every rank. Without multi_query, c_attn holds each head's
q, k and v side by side ([H, 3, D] rows).
"""
from __future__ import annotations

from typing import Any

import torch

from kubeinfer.engine.models.fused_qkv import split_contiguous, split_per_head
from kubeinfer.engine.models.gpt2 import GPT2LMHeadModel


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    model_name = "GPTBigCode"

    @staticmethod
    def num_kv_heads(config: Any) -> int:
        return 1 if config.multi_query else config.num_attention_heads

    def split_qkv(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden, heads = self.config.hidden_size, self.config.num_attention_heads
        if self.config.multi_query:
            return split_contiguous(name, tensor, hidden, hidden // heads)
        return split_per_head(name, tensor, heads, hidden // heads)

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # nn.Linear weights, already [out, in]
