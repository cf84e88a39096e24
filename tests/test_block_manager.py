"""Tests for engine/block_pool.py and engine/kv_cache_manager.py: blocks, ref counts, fork, CoW,
prefix caching."""

from __future__ import annotations

import pytest

from pagedserve.engine.block_pool import BlockPool
from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence

BLOCK_SIZE = 4


def make_seq(
    num_tokens: int, request_id: str = "r", params: SamplingParams | None = None
) -> Sequence:
    tokens = list(range(10, 10 + num_tokens))
    return Sequence(request_id, tokens, params or SamplingParams())


def prefill(kv: KVCacheManager, seq: Sequence) -> None:
    """Allocate and 'compute' the whole of `seq`, as one prefill step would."""
    n = seq.num_tokens - seq.num_computed_tokens
    assert kv.can_allocate(seq, n)
    kv.allocate(seq, n)
    seq.num_computed_tokens += n


def decode(kv: KVCacheManager, seq: Sequence, token: int = 7) -> None:
    """Append one token and compute it, as one decode step would."""
    seq.token_ids.append(token)
    assert kv.can_allocate(seq, 1)
    kv.allocate(seq, 1)
    seq.num_computed_tokens += 1


# --- BlockPool ------------------------------------------------------------------------------


def test_pool_allocate_gives_distinct_blocks_with_one_reference() -> None:
    pool = BlockPool(4)
    blocks = [pool.allocate() for _ in range(4)]
    assert sorted(blocks) == [0, 1, 2, 3]
    assert all(pool.ref_counts[b] == 1 for b in blocks)
    assert pool.num_free == 0
    assert pool.num_used == 4


def test_pool_block_is_freed_exactly_when_refcount_reaches_zero() -> None:
    pool = BlockPool(2)
    block = pool.allocate()
    pool.incref(block)
    pool.incref(block)
    assert pool.ref_counts[block] == 3
    pool.decref(block)
    pool.decref(block)
    assert pool.ref_counts[block] == 1
    assert pool.num_free == 1, "a block still referenced once must not be free"
    pool.decref(block)
    assert pool.ref_counts[block] == 0
    assert pool.num_free == 2


def test_pool_freed_block_can_be_allocated_again() -> None:
    pool = BlockPool(1)
    block = pool.allocate()
    pool.decref(block)
    assert pool.allocate() == block
    assert pool.ref_counts[block] == 1


def test_pool_double_free_is_an_assertion_error() -> None:
    pool = BlockPool(2)
    block = pool.allocate()
    pool.decref(block)
    with pytest.raises(AssertionError, match="already free"):
        pool.decref(block)
    assert pool.num_free == 2, "a refused double free must not put the block in the queue twice"


def test_pool_incref_of_a_free_block_is_an_assertion_error() -> None:
    pool = BlockPool(2)
    with pytest.raises(AssertionError, match="free"):
        pool.incref(0)
    assert pool.ref_counts == [0, 0]


def test_pool_allocate_from_an_empty_pool_raises() -> None:
    pool = BlockPool(1)
    pool.allocate()
    with pytest.raises(AssertionError, match="no free block"):
        pool.allocate()


def test_pool_with_no_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)


# --- KVCacheManager: growth -----------------------------------------------------------------


def test_prefill_allocates_just_enough_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq(10)
    assert kv.blocks_needed(seq, 10) == 3
    prefill(kv, seq)
    assert len(kv.block_tables[seq.seq_id]) == 3
    assert kv.num_free_blocks == 5


def test_blocks_are_allocated_one_at_a_time_as_a_sequence_grows() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq(1)
    prefill(kv, seq)
    for _ in range(20):
        decode(kv, seq)
        table = kv.block_tables[seq.seq_id]
        # Only the last block may be partly empty: exactly ceil(tokens / block_size) blocks.
        assert len(table) == -(-seq.num_computed_tokens // BLOCK_SIZE)
        assert len(set(table)) == len(table)
        assert kv.num_free_blocks == 8 - len(table)
    assert seq.num_computed_tokens == 21
    assert len(kv.block_tables[seq.seq_id]) == 6


def test_decode_into_a_partly_filled_block_needs_no_new_block() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    seq = make_seq(5)
    prefill(kv, seq)
    seq.token_ids.append(1)
    assert kv.blocks_needed(seq, 1) == 0
    before = list(kv.block_tables[seq.seq_id])
    kv.allocate(seq, 1)
    assert kv.block_tables[seq.seq_id] == before


def test_chunked_allocation_matches_one_shot_allocation() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq(11)
    for chunk in (3, 3, 5):
        kv.allocate(seq, chunk)
        seq.num_computed_tokens += chunk
        assert len(kv.block_tables[seq.seq_id]) == -(-seq.num_computed_tokens // BLOCK_SIZE)
    assert len(kv.block_tables[seq.seq_id]) == 3


def test_allocating_zero_tokens_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    seq = make_seq(4)
    assert kv.blocks_needed(seq, 0) == 0
    kv.allocate(seq, 0)
    assert kv.num_free_blocks == 4


# --- KVCacheManager: check/act pairs --------------------------------------------------------


def test_can_allocate_is_true_exactly_when_enough_blocks_are_free() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    assert kv.can_allocate(make_seq(12), 12)  # 3 blocks of 3
    assert not kv.can_allocate(make_seq(13), 13)  # 4 blocks of 3
    first = make_seq(5)
    prefill(kv, first)  # 2 blocks, 1 free
    assert kv.can_allocate(make_seq(4), 4)
    assert not kv.can_allocate(make_seq(5), 5)


def test_can_allocate_does_not_change_state() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    seq = make_seq(9)
    for _ in range(3):
        assert kv.can_allocate(seq, 9)
    assert kv.num_free_blocks == 3
    assert seq.seq_id not in kv.block_tables
    assert kv.take_copies() == []


def test_can_allocate_counts_only_the_missing_blocks_of_a_growing_sequence() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    seq = make_seq(8)
    prefill(kv, seq)  # 2 blocks, full
    seq.token_ids.extend([1] * 4)
    assert kv.blocks_needed(seq, 4) == 1
    assert kv.can_allocate(seq, 4)
    seq.token_ids.append(1)
    assert kv.blocks_needed(seq, 5) == 2
    assert not kv.can_allocate(seq, 5)


# --- fork and copy-on-write -----------------------------------------------------------------


def forked_pair(kv: KVCacheManager, num_tokens: int) -> tuple[Sequence, Sequence]:
    parent = make_seq(num_tokens, "parent")
    prefill(kv, parent)
    child = make_seq(num_tokens, "child")
    child.num_computed_tokens = parent.num_computed_tokens
    kv.fork(parent, child)
    return parent, child


def test_fork_shares_all_blocks_with_refcount_two() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    parent, child = forked_pair(kv, 10)
    parent_table = kv.block_tables[parent.seq_id]
    child_table = kv.block_tables[child.seq_id]
    assert child_table == parent_table
    assert child_table is not parent_table, "each sequence needs its own table to diverge"
    assert all(kv.pool.ref_counts[b] == 2 for b in parent_table)
    assert kv.num_free_blocks == 5, "a fork allocates nothing"


def test_fork_shares_blocks_until_write_then_copies_the_partial_last_block() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    parent, child = forked_pair(kv, 6)  # 2 blocks; the second holds 2 of 4 tokens
    shared_full, shared_last = kv.block_tables[parent.seq_id]

    child.token_ids.append(99)
    assert kv.blocks_needed(child, 1) == 1, "writing into a shared block needs a fresh copy"
    kv.allocate(child, 1)

    child_table = kv.block_tables[child.seq_id]
    assert child_table[0] == shared_full
    assert child_table[1] != shared_last
    assert kv.block_tables[parent.seq_id] == [shared_full, shared_last]
    assert kv.pool.ref_counts[shared_full] == 2
    assert kv.pool.ref_counts[shared_last] == 1
    assert kv.pool.ref_counts[child_table[1]] == 1
    assert kv.take_copies() == [(shared_last, child_table[1])]
    assert kv.take_copies() == [], "take_copies hands each copy over once"
    assert kv.num_free_blocks == 5


def test_after_copy_on_write_the_other_sequence_writes_in_place() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    parent, child = forked_pair(kv, 6)
    child.token_ids.append(99)
    kv.allocate(child, 1)
    kv.take_copies()

    parent_table = list(kv.block_tables[parent.seq_id])
    parent.token_ids.append(98)
    assert kv.blocks_needed(parent, 1) == 0
    kv.allocate(parent, 1)
    assert kv.block_tables[parent.seq_id] == parent_table
    assert kv.take_copies() == []


def test_no_copy_on_write_when_the_shared_last_block_is_full() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    parent, child = forked_pair(kv, 8)  # 2 full blocks
    shared = list(kv.block_tables[parent.seq_id])

    child.token_ids.append(99)
    assert kv.blocks_needed(child, 1) == 1
    kv.allocate(child, 1)

    child_table = kv.block_tables[child.seq_id]
    assert child_table[:2] == shared
    assert len(child_table) == 3 and child_table[2] not in shared
    assert all(kv.pool.ref_counts[b] == 2 for b in shared)
    assert kv.take_copies() == []


def test_can_allocate_counts_the_copy_on_write_block() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=BLOCK_SIZE)
    parent, child = forked_pair(kv, 6)  # both blocks used, the last one partial and shared
    child.token_ids.append(99)
    assert kv.num_free_blocks == 0
    assert not kv.can_allocate(child, 1), "the slot exists but is shared: a copy needs a block"


def test_copy_on_write_with_a_chunk_that_crosses_into_new_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    parent, child = forked_pair(kv, 6)
    shared_last = kv.block_tables[parent.seq_id][1]
    child.token_ids.extend([1, 2, 3, 4, 5])  # 11 tokens: fills the copy and one more block
    assert kv.blocks_needed(child, 5) == 2
    kv.allocate(child, 5)
    child_table = kv.block_tables[child.seq_id]
    assert len(child_table) == 3
    assert kv.take_copies() == [(shared_last, child_table[1])]


# --- free -----------------------------------------------------------------------------------


def test_free_returns_every_block() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq(13)
    prefill(kv, seq)
    assert kv.num_free_blocks == 4
    kv.free(seq)
    assert kv.num_free_blocks == 8
    assert seq.seq_id not in kv.block_tables
    kv.free(seq)  # freeing twice is harmless: the table is gone
    assert kv.num_free_blocks == 8


def test_freeing_one_of_two_forked_sequences_keeps_the_shared_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    parent, child = forked_pair(kv, 6)
    shared = list(kv.block_tables[parent.seq_id])
    kv.free(parent)
    assert all(kv.pool.ref_counts[b] == 1 for b in shared)
    assert kv.num_free_blocks == 6
    # The survivor now owns its last block alone and writes into it without a copy.
    child.token_ids.append(1)
    kv.allocate(child, 1)
    assert kv.block_tables[child.seq_id] == shared
    assert kv.take_copies() == []


def test_all_blocks_free_after_every_sequence_is_freed() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    parent, child = forked_pair(kv, 6)
    grandchild = make_seq(6, "grandchild")
    grandchild.num_computed_tokens = 6
    kv.fork(child, grandchild)
    other = make_seq(9, "other")
    prefill(kv, other)
    for seq in (child, grandchild, parent, other):
        for _ in range(5):
            decode(kv, seq)
    for seq in (parent, other, grandchild, child):
        kv.free(seq)
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert kv.pool.ref_counts == [0] * kv.pool.num_blocks
    assert kv.block_tables == {}


# --- BlockPool: prefix cache ----------------------------------------------------------------

TOKENS = (1, 2, 3, 4)


def test_pool_lookup_finds_a_registered_block_by_hash_and_tokens() -> None:
    pool = BlockPool(4, enable_caching=True)
    block = pool.allocate()
    pool.register(block, 1234, TOKENS)
    assert pool.num_cached == 1
    assert pool.lookup(1234, TOKENS) == block
    assert pool.lookup(1234, (1, 2, 3, 5)) is None, "a hash hit with other tokens is a miss"
    assert pool.lookup(999, TOKENS) is None


def test_pool_without_caching_registers_nothing() -> None:
    pool = BlockPool(4)
    block = pool.allocate()
    pool.register(block, 1234, TOKENS)
    assert pool.num_cached == 0
    assert pool.lookup(1234, TOKENS) is None


def test_pool_first_block_registered_with_a_content_wins() -> None:
    pool = BlockPool(4, enable_caching=True)
    first, second = pool.allocate(), pool.allocate()
    pool.register(first, 1234, TOKENS)
    pool.register(second, 1234, TOKENS)
    assert pool.lookup(1234, TOKENS) == first
    assert pool.num_cached == 1
    pool.decref(second)
    pool.allocate()  # reusing the duplicate evicts nothing
    assert pool.num_evictions == 0
    assert pool.lookup(1234, TOKENS) == first


def test_pool_freed_cached_block_is_revived_by_take() -> None:
    pool = BlockPool(3, enable_caching=True)
    block = pool.allocate()
    pool.register(block, 1234, TOKENS)
    pool.decref(block)
    assert pool.is_free(block) and pool.num_free == 3
    assert pool.lookup(1234, TOKENS) == block, "a free block keeps its content"
    pool.take(block)
    assert pool.ref_counts[block] == 1
    assert not pool.is_free(block)
    assert pool.num_free == 2, "a revived block leaves the free queue"
    others = [pool.allocate(), pool.allocate()]
    assert block not in others
    with pytest.raises(AssertionError):
        pool.allocate()
    pool.take(block)  # a block in use is shared
    assert pool.ref_counts[block] == 2
    assert pool.num_evictions == 0
    assert pool.lookup(1234, TOKENS) == block


def test_pool_reuses_the_least_recently_freed_block_first_and_counts_evictions() -> None:
    pool = BlockPool(4, enable_caching=True)
    blocks = [pool.allocate() for _ in range(3)]
    for i, block in enumerate(blocks):
        pool.register(block, 100 + i, (i,))
    for i in (1, 0, 2):
        pool.decref(blocks[i])
    assert pool.num_cached == 3
    # The never-used block comes first and evicts nothing.
    assert pool.allocate() not in blocks
    assert pool.num_evictions == 0
    assert pool.allocate() == blocks[1]
    assert pool.lookup(101, (1,)) is None, "the reused block's content is forgotten"
    assert (pool.num_evictions, pool.num_cached) == (1, 2)
    assert pool.allocate() == blocks[0]
    assert (pool.num_evictions, pool.num_cached) == (2, 1)
    assert pool.lookup(102, (2,)) == blocks[2]
    pool.register(blocks[0], 100, (0,))  # an evicted content may be registered again
    assert pool.lookup(100, (0,)) == blocks[0]


# --- KVCacheManager: prefix cache -----------------------------------------------------------


def computed(kv: KVCacheManager, seq: Sequence) -> Sequence:
    """Prefill `seq` whole and register the full blocks it filled, as an engine step does."""
    prefill(kv, seq)
    kv.register_computed(seq)
    return seq


def test_cached_prefix_covers_the_full_blocks_of_an_earlier_sequence() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    first = computed(kv, make_seq(10))
    table = list(kv.block_tables[first.seq_id])
    assert kv.pool.num_cached == 2, "only full blocks are cached"
    assert kv.cached_prefix(make_seq(10)) == table[:2]
    assert kv.cached_prefix(make_seq(7)) == table[:1]
    other = make_seq(10)
    other.token_ids[1] = 99  # the first block differs: no later block can match
    assert kv.cached_prefix(other) == []
    kv.free(first)
    assert kv.cached_prefix(make_seq(10)) == table[:2], "freed blocks stay cached"


def test_cached_prefix_never_covers_the_last_token() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    first = computed(kv, make_seq(8))
    table = kv.block_tables[first.seq_id]
    assert kv.pool.num_cached == 2
    # The same 8 tokens: the second block holds the last token, whose logits are needed.
    assert kv.cached_prefix(make_seq(8)) == table[:1]
    assert kv.cached_prefix(make_seq(9)) == table[:2]
    assert kv.cached_prefix(make_seq(4)) == []
    assert kv.cached_prefix(make_seq(5)) == table[:1]


def test_cached_prefix_is_empty_when_prompt_logprobs_are_asked_for() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    computed(kv, make_seq(10))
    assert kv.cached_prefix(make_seq(10, params=SamplingParams(prompt_logprobs=0))) == []
    assert kv.cached_prefix(make_seq(10, params=SamplingParams(prompt_logprobs=3))) == []
    assert len(kv.cached_prefix(make_seq(10, params=SamplingParams(logprobs=3)))) == 2


def test_cached_prefix_is_empty_without_prefix_caching_or_for_an_allocated_sequence() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = computed(kv, make_seq(10))
    assert kv.pool.num_cached == 0
    assert kv.cached_prefix(make_seq(10)) == []
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    first = computed(kv, make_seq(10))
    assert kv.cached_prefix(first) == [], "a sequence with blocks has no prefix to look up"


def test_allocate_with_a_cached_prefix_shares_its_blocks_and_skips_its_tokens() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    first = computed(kv, make_seq(10))
    shared = kv.block_tables[first.seq_id][:2]
    kv.free(first)
    seq = make_seq(11)
    hit = kv.cached_prefix(seq)
    assert hit == shared
    # Three tokens left; one new block, plus the two cached blocks taken out of the free queue.
    assert kv.blocks_needed(seq, 3, hit) == 3
    assert kv.can_allocate(seq, 3, hit)
    kv.allocate(seq, 3, hit)
    assert seq.num_computed_tokens == 8
    table = kv.block_tables[seq.seq_id]
    assert table[:2] == shared and len(table) == 3
    assert [kv.pool.ref_counts[b] for b in table] == [1, 1, 1]
    assert kv.num_free_blocks == 1
    assert (kv.prefix_queried_tokens, kv.prefix_hit_tokens) == (10 + 11, 8)

    # A second sequence with the same prefix shares the blocks while they are in use.
    again = make_seq(9)
    hit = kv.cached_prefix(again)
    assert hit == shared
    assert kv.blocks_needed(again, 1, hit) == 1
    kv.allocate(again, 1, hit)
    assert [kv.pool.ref_counts[b] for b in shared] == [2, 2]


def test_freeing_drops_a_cached_prefix_from_its_tail() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    first = computed(kv, make_seq(12))
    table = list(kv.block_tables[first.seq_id])
    kv.free(first)
    assert kv.pool.num_cached == 3
    other = Sequence("other", [1, 2, 3, 4], SamplingParams())
    computed(kv, other)  # takes one block: the tail of the freed prefix
    assert kv.pool.num_evictions == 1
    assert kv.cached_prefix(make_seq(13)) == table[:2], "the head of the prefix is still cached"


def test_tokens_held_and_shared_blocks_count_each_shared_block_once() -> None:
    """The KV-waste figures: a forked pair shares its full block and its partial last block
    (counted once); after copy-on-write each holds its own last block; an allocated block not
    yet computed holds nothing."""
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    parent, child = forked_pair(kv, 6)  # blocks [4 tokens, 2 tokens], both shared
    assert kv.tokens_held([parent, child]) == 6
    assert kv.num_shared_blocks() == 2
    decode(kv, child)  # the child's copy of the last block now holds 3
    assert kv.tokens_held([parent, child]) == 4 + 2 + 3
    assert kv.num_shared_blocks() == 1
    loner = make_seq(5, "loner")
    kv.allocate(loner, 5)  # two blocks allocated, no token computed yet
    assert kv.tokens_held([parent, child, loner]) == 9
    loner.num_computed_tokens = 5
    assert kv.tokens_held([parent, child, loner]) == 9 + 5
    assert kv.tokens_held([loner]) == 5
