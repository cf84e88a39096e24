"""Continuous batching: which sequences run this step, and how many tokens each.

Every sequence is described by two numbers, its tokens and how many of them are in the cache;
a step computes `num_new_tokens` more of them. That one rule covers prefill, chunked prefill,
decode and recomputation after preemption. The scheduler never touches tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)  # per scheduled sequence
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ):
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept in arrival order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # Running sequences first, oldest first; if blocks run out, the newest is preempted.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv_cache.can_allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                self.kv_cache.allocate(seq, n)
                out.seqs.append(seq)
                out.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            break

        # Then waiting ones in arrival order, unless this step had to preempt.
        while self.waiting and not out.num_preempted and budget > 0:
            if len(self.running) >= self.max_num_seqs:
                break
            seq = self.waiting[0]
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = min(remaining, budget)
            # Without chunked prefill a prompt runs whole; a preempted sequence that grew past
            # the budget is still recomputed in chunks, or it could never run again.
            if n < remaining and not self.chunked_prefill and seq.num_output_tokens == 0:
                break
            if not self.kv_cache.can_allocate(seq, n):
                break
            self.waiting.popleft()
            self.kv_cache.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
        self.running.sort(key=lambda s: s.arrival_time)
        out.block_tables = [self.kv_cache.block_tables[s.seq_id] for s in out.seqs]
        out.block_copies = self.kv_cache.take_copies()
        return out

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: drop its cache, keep its tokens, put it first in line."""
        self.kv_cache.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv_cache.free(seq)
