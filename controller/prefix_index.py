"""Which workers recently served which prompt prefixes: the memory behind prefix-aware routing.

A prompt is cut into blocks of about 16 tokens (16 token ids, or 64 characters of text, at
about 4 characters a token) and each block is named by a hash chained over the blocks before
it and the model, as the engine's prefix cache names its KV blocks. Each block maps to the
workers that were sent a prompt containing it, so the workers that share a prompt's first k
blocks probably hold about 16k of its tokens in their prefix caches. The index is bounded: past
`max_blocks` entries the least recently used block goes, whatever its model.

A worker that leaves is not purged: lookups only ask about the workers routing may choose
now, and its entries age out. Only estimates come out of it: a worker may have evicted a block since, or run with prefix
caching off. Routing weighs the estimate against load, so a wrong one costs a little
prefill, never a wrong answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

# Tokens per block, and the characters of text that stand for them.
BLOCK_TOKENS = 16
CHARS_PER_TOKEN = 4
BLOCK_CHARS = BLOCK_TOKENS * CHARS_PER_TOKEN

Prompt = str | Sequence[int]


def block_keys(model: str, prompt: Prompt) -> list[int]:
    """The chained hashes of the prompt's full blocks (a partial last block is not cached)."""
    if isinstance(prompt, str):
        size, pieces = BLOCK_CHARS, prompt
    else:
        size, pieces = BLOCK_TOKENS, tuple(prompt)
    keys = []
    parent = hash(model)
    for start in range(0, len(pieces) - size + 1, size):
        parent = hash((parent, pieces[start : start + size]))
        keys.append(parent)
    return keys


class PrefixIndex:
    def __init__(self, max_blocks: int = 100_000) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1; got {max_blocks}")
        self.max_blocks = max_blocks
        self._holders: OrderedDict[int, set[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def holders(self, key: int) -> set[str]:
        """The workers that were sent the block `key` (a prompt's first block: who may hold
        any of it), without touching its recency."""
        return set(self._holders.get(key, ()))

    def cached_tokens(self, keys: Sequence[int], worker_ids: Iterable[str]) -> dict[str, int]:
        """Expected cached prompt tokens on each of `worker_ids`: its run of leading blocks."""
        matched = dict.fromkeys(worker_ids, 0)
        alive = set(matched)
        for depth, key in enumerate(keys, start=1):
            holders = self._holders.get(key)
            if holders is None:
                break
            alive &= holders
            if not alive:
                break
            for worker_id in alive:
                matched[worker_id] = depth * BLOCK_TOKENS
        return matched

    def record(self, keys: Sequence[int], worker_id: str) -> None:
        """`worker_id` was sent a prompt made of these blocks: it now caches them. The first block
        is touched last, so that eviction takes a chain's tail before its head."""
        holders = self._holders
        for key in reversed(keys):
            entry = holders.get(key)
            if entry is None:
                holders[key] = {worker_id}
            else:
                entry.add(worker_id)
                holders.move_to_end(key)
        while len(holders) > self.max_blocks:
            holders.popitem(last=False)
