"""Continuous batching: which requests run this step, and how many tokens each sequence gets.

Every sequence is described by two numbers, its tokens and how many of them are in the cache;
a step computes `num_new_tokens` more of them. That one rule covers prefill, chunked prefill,
decode and recomputation after preemption. A request's sequences (parallel samples, beams) are
admitted and preempted together, and step together once forked. The scheduler never touches
tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.sequence import Sequence, SequenceGroup, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)  # per scheduled sequence
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    num_preempted: int = 0
    out_of_memory: list[SequenceGroup] = field(default_factory=list)  # can never fit: ended

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
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []  # kept in arrival order
        self.num_preemptions = 0

    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running_seqs(self) -> int:
        return sum(self._seats(g) for g in self.running)

    @staticmethod
    def _seats(group: SequenceGroup) -> int:
        """Sequences the request will run at once: a fresh prompt forks into best_of."""
        return len(group.unfinished) if group.forked else group.params.best_of

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # Running requests first, oldest first; if blocks run out, the newest is preempted.
        i = 0
        while i < len(self.running) and budget > 0:
            group = self.running[i]
            plan = self._plan(group, budget)
            if not plan:
                break
            while not self.kv_cache.can_allocate_all(plan):
                victim = self.running.pop()
                if victim is group and not self.running:
                    # Alone and still short of blocks: its sequences together outgrow the
                    # cache, and recomputing would only bring it back here.
                    self._release(group)
                    out.out_of_memory.append(group)
                    break
                self._preempt(victim)
                out.num_preempted += 1
                if victim is group:
                    break
            else:
                budget -= self._commit(plan, out)
                i += 1
                continue
            break

        # Then waiting ones in arrival order, unless this step had to preempt.
        seats = self.max_num_seqs - self.num_running_seqs
        while self.waiting and not out.num_preempted and budget > 0:
            group = self.waiting[0]
            if self._seats(group) > seats:
                break
            cached = {s.seq_id: self.kv_cache.cached_prefix(s) for s in group.unfinished}
            plan = self._plan(group, budget, cached)
            if not plan or not self.kv_cache.can_allocate_all(plan):
                break
            self.waiting.popleft()
            for seq in group.unfinished:
                seq.status = SequenceStatus.RUNNING
            self.running.append(group)
            seats -= self._seats(group)
            budget -= self._commit(plan, out)
        self.running.sort(key=lambda g: g.arrival_time)
        # Copies: the runner (and other ranks) must not see the manager's lists change.
        out.block_tables = [list(self.kv_cache.block_tables[s.seq_id]) for s in out.seqs]
        out.block_copies = self.kv_cache.take_copies()
        return out

    def _plan(
        self, group: SequenceGroup, budget: int, cached: dict[int, list[int]] | None = None
    ) -> list[tuple[Sequence, int, list[int]]]:
        """How many tokens each unfinished sequence of `group` computes this step.

        Sequences of a forked group sample together (beam search needs every beam's next
        token at once), so each first catches up to its last token, then all take that last
        token in the same step, all or none."""
        cached = cached or {}
        seqs = group.unfinished
        joint = len(seqs) > 1
        catching_up = joint and any(s.num_computed_tokens < s.num_tokens - 1 for s in seqs)
        plan = []
        for seq in seqs:
            hit = cached.get(seq.seq_id, [])
            computed = len(hit) * self.kv_cache.block_size if hit else seq.num_computed_tokens
            target = seq.num_tokens - 1 if catching_up else seq.num_tokens
            n = min(target - computed, budget)
            if n <= 0:
                continue
            if n < target - computed and not self._may_split(seq, group):
                return []
            plan.append((seq, n, hit))
            budget -= n
        if joint and not catching_up and len(plan) < len(seqs):
            return []  # the joint sampling step does not fit: wait
        return plan

    def _may_split(self, seq: Sequence, group: SequenceGroup) -> bool:
        # Without chunked prefill a prompt runs whole; a preempted sequence that grew past
        # the budget is still recomputed in chunks, or it could never run again.
        return self.chunked_prefill or group.forked

    def _commit(self, plan, out: SchedulerOutput) -> int:
        self.kv_cache.allocate_all(plan)
        for seq, n, _ in plan:
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
        return sum(n for _, n, _ in plan)

    def _preempt(self, group: SequenceGroup) -> None:
        """Recompute later: drop the request's cache, keep its tokens, put it first in line."""
        for seq in group.seqs:
            self.kv_cache.free(seq)
            seq.num_computed_tokens = 0
            if not seq.is_finished:
                seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(group)
        self.num_preemptions += 1

    def _release(self, group: SequenceGroup) -> None:
        for seq in group.seqs:
            self.kv_cache.free(seq)

    def free_seq(self, seq: Sequence) -> None:
        """Release one finished sequence's blocks (its group may go on)."""
        self.kv_cache.free(seq)

    def finish(self, group: SequenceGroup) -> None:
        """Release a finished or aborted request wherever it is."""
        if group in self.running:
            self.running.remove(group)
        elif group in self.waiting:
            self.waiting.remove(group)
        self._release(group)
