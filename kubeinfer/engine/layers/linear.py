"""Linear layers that know their tensor-parallel shard.

Each parameter carries a `weight_loader(param, loaded_weight[, shard_id])` that copies this rank's slice
of a full checkpoint tensor, so model files never see tensor parallelism: adding TP means joining the
process group (`parallel_state.py` owns it), not editing models. Shapes follow torch: weight
[out_features, in_features].

- ColumnParallelLinear splits the output dimension; each rank holds out/tp rows.
- RowParallelLinear splits the input dimension and all-reduces the partial sums.
- MergedColumnParallelLinear / QKVParallelLinear stack several checkpoint matrices (gate|up, q|k|v)
  into one matmul; each piece is sharded on its own so a rank's slice stays [gate_r | up_r].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# the group lives in parallel_state; these names stay importable from here for the layers
from kubeinfer.engine.parallel_state import tp_all_gather, tp_all_reduce, tp_rank, tp_size  # noqa: F401


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor parallel size ({d}); "
                         "choose a --tensor-parallel-size that divides it")
    return n // d


def _check_shape(loaded_weight: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded_weight.shape) != tuple(expected):
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded_weight.shape)} does not fit a "
                         f"parameter of shape {tuple(expected)}; is the config.json the one this "
                         "checkpoint was saved with?")


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    """Copy a whole tensor (norms, replicated biases); the shapes must match exactly."""
    _check_shape(loaded_weight, param.shape)
    param.data.copy_(loaded_weight)


def _full_shape(shard_shape: torch.Size, dim: int, full_size: int) -> tuple[int, ...]:
    """The unsharded checkpoint shape a shard of `shard_shape` is cut from along `dim`; checked before
    narrowing, since narrow() would silently accept a checkpoint that is too large."""
    shape = list(shard_shape)
    shape[dim] = full_size
    return tuple(shape)


class LinearBase(nn.Module):
    """y = x @ W^T (+ b) with W [output_size_per_partition, input_size_per_partition]."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None):
        super().__init__()
        self.tp_rank, self.tp_size, self.tp_dim = tp_rank(), tp_size(), tp_dim
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if self.tp_dim is not None and param.dim() > self.tp_dim:
            size = param.shape[self.tp_dim]
            _check_shape(loaded_weight, _full_shape(param.shape, self.tp_dim, size * self.tp_size))
            loaded_weight = loaded_weight.narrow(self.tp_dim, self.tp_rank * size, size)
        default_weight_loader(param, loaded_weight)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, "
                f"tp={self.tp_size}")


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, tp_dim=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the result stays split unless gather_output."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 gather_output: bool = False):
        super().__init__(input_size, _divide(output_size, tp_size(), "output size"), bias, tp_dim=0)
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return tp_all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices fused into one (gate_proj and up_proj -> gate_up_proj).

    `output_sizes` are the full (unsharded) sizes; load each with shard_id = its index.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      loaded_shard_id: int | None = None) -> None:
        if loaded_shard_id is None:  # a checkpoint that already stores the fused matrix
            raise ValueError("a fused gate_up_proj checkpoint tensor is not supported; "
                             "load gate_proj and up_proj separately")
        size = self.output_sizes[loaded_shard_id] // self.tp_size
        offset = sum(self.output_sizes[:loaded_shard_id]) // self.tp_size
        target = param.data.narrow(0, offset, size)
        _check_shape(loaded_weight, _full_shape(target.shape, 0, self.output_sizes[loaded_shard_id]))
        default_weight_loader(target, loaded_weight.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; output [q (H*D) | k (KVH*D) | v (KVH*D)] per rank.

    When there are fewer KV heads than ranks, each KV head is replicated on tp/KVH ranks, as in vLLM.
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = False):
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        size = tp_size()
        self.head_size = head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = _divide(total_num_heads, size, "number of attention heads")
        if size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = _divide(size, total_num_kv_heads, "tp size / KV heads")
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, size, "number of KV heads")
            self.num_kv_head_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_size * size
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      loaded_shard_id: str | None = None) -> None:
        if loaded_shard_id not in ("q", "k", "v"):
            raise ValueError("a fused qkv_proj checkpoint tensor is not supported; "
                             "load q_proj, k_proj and v_proj separately")
        q_size = self.num_heads * self.head_size
        kv_size = self.num_kv_heads * self.head_size
        if loaded_shard_id == "q":
            offset, size, rank, total = 0, q_size, self.tp_rank, self.total_num_heads
        else:
            offset = q_size if loaded_shard_id == "k" else q_size + kv_size
            size, rank = kv_size, self.tp_rank // self.num_kv_head_replicas
            total = self.total_num_kv_heads
        target = param.data.narrow(0, offset, size)
        _check_shape(loaded_weight, _full_shape(target.shape, 0, total * self.head_size))
        default_weight_loader(target, loaded_weight.narrow(0, rank * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products are summed with an all-reduce.

    The bias is added once, after the reduction, so it is not counted tp times.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 reduce_results: bool = True):
        super().__init__(_divide(input_size, tp_size(), "input size"), output_size, bias, tp_dim=1)
        self.reduce_results = reduce_results

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        if self.reduce_results:
            y = tp_all_reduce(y)
        return y if self.bias is None else y + self.bias
