"""Random paged-attention batches shared by the Triton and the reference attention tests."""
from __future__ import annotations

import math

import torch

# The brief's mixed batch: a 5-token chunk after a 19-token cached prefix, a 1-token decode (36
# cached), a fresh 13-token prefill.
MIXED = [(5, 24), (1, 37), (13, 13)]


def make_batch(reqs, num_heads, num_kv_heads, head_size, block_size, dtype, device):
    """reqs: [(query_len, seq_len)]. Random caches with shuffled block ids; the cache slots no
    request owns (a spare block and the tail of each request's last block) hold NaN, so reading
    past a sequence shows up as NaN in the output."""
    query_lens = [q for q, _ in reqs]
    seq_lens = [s for _, s in reqs]
    blocks_per_req = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(shape, dtype=dtype, device=device)
    value_cache = torch.randn(shape, dtype=dtype, device=device)
    nan_block = num_blocks - 1
    key_cache[nan_block] = float("nan")
    value_cache[nan_block] = float("nan")
    ids = torch.randperm(num_blocks - 1).tolist()
    block_tables = torch.full((len(reqs), max(blocks_per_req) + 1), nan_block, dtype=torch.int32)
    for r, n in enumerate(blocks_per_req):
        block_tables[r, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
        tail = seq_lens[r] % block_size
        if n and tail:
            key_cache[block_tables[r, n - 1], tail:] = float("nan")
            value_cache[block_tables[r, n - 1], tail:] = float("nan")
    query_start_loc = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(sum(query_lens), num_heads, head_size, dtype=dtype, device=device)
    return dict(q=q, key_cache=key_cache, value_cache=value_cache,
                query_start_loc=query_start_loc.to(device),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                block_tables=block_tables.to(device), max_query_len=max(query_lens),
                max_seq_len=max(seq_lens), scale=head_size ** -0.5)
