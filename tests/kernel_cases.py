"""Paged-attention inputs shared by the kernel tests (Triton's and the CPU kernel's)."""

from __future__ import annotations

import torch

# Decodes, whole prompts and chunks over a cached prefix; no length a multiple of a block.
MIXED = [(37, 1), (5, 5), (70, 9), (1, 1), (33, 1), (48, 20)]


def make_case(
    seqs: list[tuple[int, int]],  # (context_len, q_len) per sequence
    *, block_size: int = 16, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 64,
    dtype: torch.dtype = torch.float32, seed: int = 0, device: str | torch.device = "cpu",
):  # fmt: skip
    """Random caches and queries, scrambled disjoint block tables padded with -1. Every slot no
    sequence may read holds NaN, so a kernel that reads one, even to multiply it by zero, fails.
    Returns (query, k_cache, v_cache, block_tables, context_lens, query_start_loc)."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-ctx // block_size) for ctx, _ in seqs]
    num_blocks = sum(needed) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(n)] for n in needed]
    readable = torch.zeros(shape[:2], dtype=torch.bool)
    for table, (ctx, _) in zip(tables, seqs, strict=True):
        for pos in range(ctx):
            readable[table[pos // block_size], pos % block_size] = True
    k_cache[~readable] = float("nan")
    v_cache[~readable] = float("nan")
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    context_lens = torch.tensor([c for c, _ in seqs], dtype=torch.int32)
    starts = torch.tensor([0] + [q for _, q in seqs]).cumsum(0).to(torch.int32)
    query = torch.randn(int(starts[-1]), num_heads, head_dim, generator=gen)
    tensors = (query, k_cache, v_cache, block_tables, context_lens, starts)
    return [t.to(device, dtype if t.is_floating_point() else t.dtype) for t in tensors]
