"""Per-sequence block tables over the block pool: grow on demand, share by fork, copy on write.

The scheduler asks `can_allocate` first and only then calls `allocate` (check/act pairs)."""

from __future__ import annotations

from pagedserve.engine.block_pool import BlockPool
from pagedserve.engine.sequence import Sequence


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.block_tables: dict[int, list[int]] = {}
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) to copy before the next step

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        table = self.block_tables.get(seq.seq_id, [])
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        needed = max(total - len(table), 0)
        if self._writes_into_shared_block(seq, table, num_new_tokens):
            needed += 1
        return needed

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.pool.num_free

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for `num_new_tokens` more tokens of `seq` in the cache."""
        table = self.block_tables.setdefault(seq.seq_id, [])
        if self._writes_into_shared_block(seq, table, num_new_tokens):
            shared = table[-1]
            table[-1] = self.pool.allocate()
            self.pending_copies.append((shared, table[-1]))
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

    def free(self, seq: Sequence) -> None:
        for block in self.block_tables.pop(seq.seq_id, []):
            self.pool.decref(block)

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _writes_into_shared_block(self, seq: Sequence, table: list[int], num_new: int) -> bool:
        partial = seq.num_computed_tokens % self.block_size != 0
        return num_new > 0 and partial and bool(table) and self.pool.ref_counts[table[-1]] > 1

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free
