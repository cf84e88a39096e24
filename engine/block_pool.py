"""The pool of physical KV-cache blocks: free queue and reference counts."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Blocks are ints; a block is free exactly when its reference count is zero."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache must hold at least one block")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        block = self._free.popleft()
        assert self.ref_counts[block] == 0, f"free block {block} has references"
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} is free and cannot be shared"
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} is already free"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free.append(block)
