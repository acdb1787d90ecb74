"""Cutting a checkpoint's fused q/k/v matrix into q, k and v, for each layout HF models store.

The engine's `QKVParallelLinear` loads q, k and v one at a time so every tensor-parallel rank takes
its own heads of each; these helpers turn a fused checkpoint tensor (weight [rows, hidden] or bias
[rows]) into those three pieces, named ".q_proj." / ".k_proj." / ".v_proj." so that
`stacked_weights.load_stacked_weights` routes them with a mapping onto the model's fused layer.

Layouts (rows of the fused tensor):
- contiguous  [q (H*D) | k (KVH*D) | v (KVH*D)]: GPT-2 (after the Conv1D transpose), MPT, GPTBigCode
  multi-query, Falcon multi-query (old architecture).
- per head    [H, 3, D]: each head's q, k, v rows side by side: GPT-NeoX, Bloom, GPTBigCode
  without multi-query, Falcon (old architecture, not multi-query).
- grouped     [KVH, H/KVH + 2, D]: each KV group's query heads, then its k and v: Falcon's new
  decoder architecture.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

PIECES = (".q_proj.", ".k_proj.", ".v_proj.")


def qkv_mapping(fused: str) -> list[tuple[str, str, str]]:
    """The (fused parameter, piece name, shard id) rows for a model whose fused layer is `fused`."""
    return [(fused, piece, shard) for piece, shard in zip(PIECES, ("q", "k", "v"))]


def _check_rows(name: str, tensor: torch.Tensor, rows: int, what: str) -> None:
    if tensor.shape[0] != rows:
        raise ValueError(f"checkpoint tensor {name!r} has {tensor.shape[0]} rows; the config's heads "
                         f"need {rows} ({what}). Is the config.json the one this checkpoint was "
                         "saved with?")


def split_contiguous(name: str, tensor: torch.Tensor, q_rows: int, kv_rows: int
                     ) -> tuple[torch.Tensor, ...]:
    _check_rows(name, tensor, q_rows + 2 * kv_rows, f"q {q_rows}, k and v {kv_rows} each")
    return tensor.split([q_rows, kv_rows, kv_rows])


def split_per_head(name: str, tensor: torch.Tensor, num_heads: int, head_dim: int
                   ) -> tuple[torch.Tensor, ...]:
    _check_rows(name, tensor, 3 * num_heads * head_dim, f"{num_heads} heads x 3 x {head_dim}")
    rest = tensor.shape[1:]
    t = tensor.reshape(num_heads, 3, head_dim, *rest)
    return tuple(t[:, i].reshape(num_heads * head_dim, *rest) for i in range(3))


def split_grouped(name: str, tensor: torch.Tensor, num_heads: int, num_kv_heads: int,
                  head_dim: int) -> tuple[torch.Tensor, ...]:
    group = num_heads // num_kv_heads
    _check_rows(name, tensor, (num_heads + 2 * num_kv_heads) * head_dim,
                f"{num_kv_heads} KV groups x ({group} query heads + k + v) x {head_dim}")
    rest = tensor.shape[1:]
    t = tensor.reshape(num_kv_heads, group + 2, head_dim, *rest)
    return (t[:, :group].reshape(num_heads * head_dim, *rest),
            t[:, group].reshape(num_kv_heads * head_dim, *rest),
            t[:, group + 1].reshape(num_kv_heads * head_dim, *rest))


def named_pieces(name: str, fused: str, pieces: Iterable[torch.Tensor]
                 ) -> Iterable[tuple[str, torch.Tensor]]:
    """(name with `fused` replaced by .q_proj. / .k_proj. / .v_proj., piece) for q, k and v."""
    for piece_name, piece in zip(PIECES, pieces):
        yield name.replace(fused, piece_name), piece
