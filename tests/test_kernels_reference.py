"""Tests for kernels/reference.py against naive per-sequence implementations written here."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.reference import copy_blocks, paged_attention, store_kv

HEAD_DIM = 16


def naive_attention(
    query: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: list[list[int]],
    context_lens: list[int],
    q_lens: list[int],
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """One sequence at a time: gather its keys block by block, causal softmax(QK^T)V."""
    num_heads = query.shape[1]
    outputs = []
    start = 0
    for table, ctx, q_len in zip(tables, context_lens, q_lens, strict=True):
        keys = torch.cat([k_cache[b] for b in table])[:ctx]  # [ctx, kv_heads, D]
        values = torch.cat([v_cache[b] for b in table])[:ctx]
        group = num_heads // keys.shape[1]
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        q = query[start : start + q_len]
        start += q_len
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        q_pos = torch.arange(ctx - q_len, ctx)[:, None]
        k_pos = torch.arange(ctx)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        scores = scores.masked_fill(~allowed, -float("inf"))
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), values))
    return torch.cat(outputs)


def make_case(
    seed: int,
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    seqs: list[tuple[int, int]],  # (context_len, q_len) per sequence
    num_blocks: int = 96,
):
    """Random caches, scrambled disjoint block tables, flat queries; the kernel's tensors too."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen)
    v_cache = torch.randn(shape, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for ctx, _ in seqs:
        n = -(-ctx // block_size)
        tables.append([free.pop() for _ in range(n)])
    total_q = sum(q for _, q in seqs)
    query = torch.randn(total_q, num_heads, HEAD_DIM, generator=gen)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    context_lens = torch.tensor([c for c, _ in seqs], dtype=torch.int32)
    starts = [0]
    for _, q in seqs:
        starts.append(starts[-1] + q)
    query_start_loc = torch.tensor(starts, dtype=torch.int32)
    return query, k_cache, v_cache, tables, block_tables, context_lens, query_start_loc


def check(seed, block_size, num_heads, num_kv_heads, seqs, window=None) -> None:
    query, k_cache, v_cache, tables, block_tables, context_lens, qsl = make_case(
        seed, block_size, num_heads, num_kv_heads, seqs
    )
    scale = HEAD_DIM**-0.5
    got = paged_attention(
        query, k_cache, v_cache, block_tables, context_lens, qsl, scale, sliding_window=window
    )
    want = naive_attention(
        query, k_cache, v_cache, tables, [c for c, _ in seqs], [q for _, q in seqs], scale, window
    )
    assert got.shape == query.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- paged_attention ------------------------------------------------------------------------

MIXED = [(37, 1), (5, 5), (70, 9), (1, 1), (16, 16), (33, 1), (48, 20)]


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (4, 2), (8, 2)])
def test_paged_attention_matches_naive_on_mixed_decode_and_prefill(
    block_size: int, num_heads: int, num_kv_heads: int
) -> None:
    # Decodes, whole prompts, and chunks over a cached prefix; lengths not multiples of blocks.
    check(block_size * 7 + num_heads, block_size, num_heads, num_kv_heads, MIXED)


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_paged_attention_matches_naive_on_decodes_only(block_size: int) -> None:
    check(1, block_size, 8, 2, [(ctx, 1) for ctx in (1, 9, 17, 31, 64, 65)])


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_paged_attention_matches_naive_on_prefill_chunks_only(block_size: int) -> None:
    check(2, block_size, 4, 2, [(23, 23), (50, 7), (40, 2), (90, 33)])


def test_paged_attention_with_a_single_token() -> None:
    check(3, 16, 4, 2, [(1, 1)])


def test_paged_attention_with_a_single_sequence_long_context() -> None:
    check(4, 8, 4, 1, [(200, 3)])


@pytest.mark.parametrize("window", [1, 4, 13])
def test_paged_attention_sliding_window_matches_naive(window: int) -> None:
    check(5, 8, 4, 2, MIXED, window=window)


def test_paged_attention_ignores_what_other_sequences_blocks_hold() -> None:
    query, k_cache, v_cache, tables, block_tables, context_lens, qsl = make_case(
        6, 8, 4, 2, [(10, 1), (20, 4)]
    )
    scale = HEAD_DIM**-0.5
    before = paged_attention(query, k_cache, v_cache, block_tables, context_lens, qsl, scale)
    # Rewrite every slot no sequence may read: unused blocks and the tails of last blocks.
    readable = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for table, ctx in zip(tables, context_lens.tolist(), strict=True):
        for pos in range(ctx):
            readable[table[pos // 8], pos % 8] = True
    k_cache[~readable] = 1e3
    v_cache[~readable] = -1e3
    after = paged_attention(query, k_cache, v_cache, block_tables, context_lens, qsl, scale)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


# --- store_kv -------------------------------------------------------------------------------


def test_store_kv_writes_each_token_into_its_slot_and_skips_minus_one() -> None:
    block_size, num_blocks, kv_heads = 4, 5, 2
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(5, kv_heads, HEAD_DIM)
    value = torch.randn(5, kv_heads, HEAD_DIM)
    slots = torch.tensor([13, -1, 2, 7, -1])  # block 3 offset 1, pad, block 0 offset 2, ...
    store_kv(key, value, k_cache, v_cache, slots)

    written = {13: 0, 2: 2, 7: 3}
    flat_k = k_cache.view(-1, kv_heads, HEAD_DIM)
    flat_v = v_cache.view(-1, kv_heads, HEAD_DIM)
    for slot in range(num_blocks * block_size):
        if slot in written:
            assert torch.equal(flat_k[slot], key[written[slot]])
            assert torch.equal(flat_v[slot], value[written[slot]])
        else:
            # Slot -1 must not wrap around to the last slot of the last block.
            assert not flat_k[slot].any() and not flat_v[slot].any(), f"slot {slot} was written"
    assert torch.equal(k_cache[3, 1], key[0])
    assert torch.equal(k_cache[1, 3], key[3])


def test_store_kv_then_paged_attention_reads_the_stored_tokens() -> None:
    block_size, kv_heads, heads = 8, 2, 4
    k_cache = torch.zeros(6, block_size, kv_heads, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    table = [4, 1, 3]
    ctx = 19
    key = torch.randn(ctx, kv_heads, HEAD_DIM)
    value = torch.randn(ctx, kv_heads, HEAD_DIM)
    slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
    store_kv(key, value, k_cache, v_cache, slots)
    query = torch.randn(ctx, heads, HEAD_DIM)
    got = paged_attention(
        query,
        k_cache,
        v_cache,
        torch.tensor([table], dtype=torch.int32),
        torch.tensor([ctx], dtype=torch.int32),
        torch.tensor([0, ctx], dtype=torch.int32),
        HEAD_DIM**-0.5,
    )
    want = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1),
        key.repeat_interleave(2, dim=1).transpose(0, 1),
        value.repeat_interleave(2, dim=1).transpose(0, 1),
        is_causal=True,
    ).transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- copy_blocks ----------------------------------------------------------------------------


def test_copy_blocks_copies_every_layer_and_nothing_else() -> None:
    torch.manual_seed(7)
    layers = 3
    k_caches = [torch.randn(6, 4, 2, HEAD_DIM) for _ in range(layers)]
    v_caches = [torch.randn(6, 4, 2, HEAD_DIM) for _ in range(layers)]
    k_before = [k.clone() for k in k_caches]
    v_before = [v.clone() for v in v_caches]
    src, dst = torch.tensor([1, 4]), torch.tensor([5, 0])
    copy_blocks(k_caches, v_caches, src, dst)
    for layer in range(layers):
        for caches, before in ((k_caches, k_before), (v_caches, v_before)):
            cache, old = caches[layer], before[layer]
            assert torch.equal(cache[5], old[1])
            assert torch.equal(cache[0], old[4])
            for block in (1, 2, 3, 4):
                assert torch.equal(cache[block], old[block])


def test_copy_blocks_with_mismatched_layer_lists_is_refused() -> None:
    k_caches = [torch.zeros(2, 4, 1, HEAD_DIM)] * 2
    v_caches = [torch.zeros(2, 4, 1, HEAD_DIM)]
    with pytest.raises(ValueError):
        copy_blocks(k_caches, v_caches, torch.tensor([0]), torch.tensor([1]))
