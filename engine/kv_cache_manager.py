"""Per-sequence block tables over the block pool: grow on demand, share by fork or by a cached
prefix, copy on write.

The scheduler asks `can_allocate` first and only then calls `allocate` (check/act pairs)."""

from __future__ import annotations

from collections.abc import Iterable

from pagedserve.engine.block_pool import BlockPool
from pagedserve.engine.sequence import Sequence

_ROOT_HASH = 0


def block_hash(parent: int, tokens: tuple[int, ...], extra: object = None) -> int:
    """A full block's identity: its tokens, everything before them (through the parent's hash),
    and anything else that changes its K/V (`extra`, e.g. a LoRA id one day)."""
    return hash((parent, tokens, extra))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[int, list[int]] = {}
        self._hashes: dict[int, list[int]] = {}  # per sequence, hashes of its full blocks
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) to copy before the next step
        self.num_cow_copies = 0
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    # --- prefix cache ---------------------------------------------------------------------
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks already holding `seq`'s longest cached prefix; nothing changes until
        `allocate`. The last token is always left to compute: its logits are needed."""
        if not self.enable_prefix_caching or seq.seq_id in self.block_tables:
            return []
        if seq.params.prompt_logprobs is not None:  # every prompt position must be computed
            return []
        bs, parent, blocks = self.block_size, _ROOT_HASH, []
        for start in range(0, seq.num_tokens - 1 - bs + 1, bs):
            tokens = tuple(seq.token_ids[start : start + bs])
            parent = block_hash(parent, tokens)
            block = self.pool.lookup(parent, tokens)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def register_computed(self, seq: Sequence) -> None:
        """After a step: remember the content of blocks the step filled."""
        if not self.enable_prefix_caching:
            return
        table, hashes, bs = (
            self.block_tables[seq.seq_id],
            self._hashes.setdefault(seq.seq_id, []),
            self.block_size,
        )
        for i in range(len(hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            hashes.append(block_hash(hashes[-1] if hashes else _ROOT_HASH, tokens))
            self.pool.register(table[i], hashes[-1], tokens)

    # --- allocation -----------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> int:
        table = self.block_tables.get(seq.seq_id, cached)
        computed = (
            seq.num_computed_tokens
            if seq.seq_id in self.block_tables
            else len(cached) * self.block_size
        )
        total = -(-(computed + num_new_tokens) // self.block_size)
        needed = max(total - len(table), 0)
        if self._writes_into_shared_block(computed, table, num_new_tokens):
            needed += 1
        # A cached block that sits in the free queue is taken out of it.
        return needed + sum(1 for b in cached if self.pool.is_free(b))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        return self.blocks_needed(seq, num_new_tokens, cached) <= self.pool.num_free

    def can_allocate_all(self, plan: Iterable[tuple[Sequence, int, list[int]]]) -> bool:
        return sum(self.blocks_needed(s, n, c) for s, n, c in plan) <= self.pool.num_free

    def allocate_all(self, plan: Iterable[tuple[Sequence, int, list[int]]]) -> None:
        """`allocate` for several sequences; every cached block is taken before any fresh one
        is allocated, or a fresh allocation could evict a block another sequence counts on."""
        plan = list(plan)
        for seq, _, cached in plan:
            self._adopt(seq, cached)
        for seq, n, _ in plan:
            self.allocate(seq, n)

    def _adopt(self, seq: Sequence, cached: list[int]) -> None:
        """A new (or recomputing) sequence starts with its cached prefix."""
        if seq.seq_id in self.block_tables:
            return
        for block in cached:
            self.pool.take(block)
        self.block_tables[seq.seq_id] = list(cached)
        seq.num_computed_tokens = len(cached) * self.block_size
        self.prefix_queried_tokens += seq.num_tokens
        self.prefix_hit_tokens += seq.num_computed_tokens
        self.register_computed(seq)

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> None:
        """Make room for `num_new_tokens` more tokens of `seq` (after its cached prefix)."""
        self._adopt(seq, cached)
        table = self.block_tables[seq.seq_id]
        if self._writes_into_shared_block(seq.num_computed_tokens, table, num_new_tokens):
            shared = table[-1]
            table[-1] = self.pool.allocate()
            self.pending_copies.append((shared, table[-1]))
            self.num_cow_copies += 1
            self.pool.decref(shared)
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        while len(table) < total:
            table.append(self.pool.allocate())

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares every block of `parent` until one of them writes into a shared block."""
        table = self.block_tables[parent.seq_id]
        for block in table:
            self.pool.incref(block)
        self.block_tables[child.seq_id] = list(table)
        self._hashes[child.seq_id] = list(self._hashes.get(parent.seq_id, []))

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so the eviction order drops a prefix's tail before its head.
        for block in reversed(self.block_tables.pop(seq.seq_id, [])):
            self.pool.decref(block)
        self._hashes.pop(seq.seq_id, None)

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _writes_into_shared_block(self, computed: int, table: list[int], num_new: int) -> bool:
        partial = computed % self.block_size != 0
        return num_new > 0 and partial and bool(table) and self.pool.ref_counts[table[-1]] > 1

    # --- figures --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def num_shared_blocks(self) -> int:
        counts = self.pool.ref_counts  # counted in C: the stats are read every step
        return len(counts) - counts.count(0) - counts.count(1)

    def tokens_held(self, seqs: Iterable[Sequence]) -> int:
        """Tokens stored in the blocks of `seqs`, each shared block counted once: a sequence's
        blocks are full up to its last, which holds the rest."""
        bs = self.block_size
        full: set[int] = set()
        last: dict[int, int] = {}  # partly filled block -> the most tokens a sequence has there
        for seq in seqs:
            table = self.block_tables.get(seq.seq_id, [])
            whole, rest = divmod(seq.num_computed_tokens, bs)
            full.update(table[:whole])
            if rest and whole < len(table):
                last[table[whole]] = max(last.get(table[whole], 0), rest)
        return len(full) * bs + sum(n for block, n in last.items() if block not in full)
