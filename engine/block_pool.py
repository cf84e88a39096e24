"""The pool of physical KV-cache blocks: reference counts, a free queue, and the prefix cache.

A block is free exactly when its reference count is zero. With prefix caching, a full block
keeps its content hash after it is freed, so a later request with the same prefix can take it
back; free blocks are reused least-recently-freed first, which evicts the oldest content."""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = False):
        if num_blocks < 1:
            raise ValueError("the KV cache must hold at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_of: list[int | None] = [None] * num_blocks
        self._tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # content hash -> block
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self) -> int:
        assert self._free, "no free block: the scheduler must ask can_allocate first"
        block, _ = self._free.popitem(last=False)
        assert self.ref_counts[block] == 0, f"free block {block} has references"
        self._evict(block)
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} is free and cannot be shared"
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} is already free"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free[block] = None

    # --- prefix cache ---------------------------------------------------------------------
    def lookup(self, content_hash: int, tokens: tuple[int, ...]) -> int | None:
        """The block holding exactly these tokens after this prefix, if it is still cached."""
        block = self._cached.get(content_hash)
        if block is None or self._tokens_of[block] != tokens:  # a hash collision is a miss
            return None
        return block

    def take(self, block: int) -> None:
        """Take a reference to a cached block, reviving it if it was free."""
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def is_free(self, block: int) -> bool:
        return self.ref_counts[block] == 0

    def register(self, block: int, content_hash: int, tokens: tuple[int, ...]) -> None:
        """Record a newly filled block's content; the first block with given content wins."""
        if not self.enable_caching or content_hash in self._cached:
            return
        self._cached[content_hash] = block
        self._hash_of[block], self._tokens_of[block] = content_hash, tokens

    def _evict(self, block: int) -> None:
        content_hash = self._hash_of[block]
        if content_hash is not None:
            del self._cached[content_hash]
            self._hash_of[block] = self._tokens_of[block] = None
            self.num_evictions += 1
