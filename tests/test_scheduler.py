"""Tests for engine/scheduler.py: continuous batching, chunked prefill, preemption by recompute."""

from __future__ import annotations

import pytest

from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.engine.sequence import Sequence, SequenceStatus

BLOCK_SIZE = 4
NEW_TOKEN = 3


def make_seq(name: str, num_tokens: int, arrival: float, max_tokens: int = 16) -> Sequence:
    return Sequence(
        name,
        None,
        list(range(100, 100 + num_tokens)),
        SamplingParams(max_tokens=max_tokens),
        arrival_time=arrival,
    )


def make_scheduler(
    num_blocks: int = 64,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    chunked: bool = True,
) -> Scheduler:
    return Scheduler(
        KVCacheManager(num_blocks, BLOCK_SIZE), max_num_seqs, max_num_batched_tokens, chunked
    )


def add_all(sched: Scheduler, *sizes: int) -> list[Sequence]:
    seqs = [make_seq(f"s{i}", n, arrival=float(i)) for i, n in enumerate(sizes)]
    for seq in seqs:
        sched.add(seq)
    return seqs


def step(sched: Scheduler) -> SchedulerOutput:
    """One scheduler step plus the engine's bookkeeping (a fake token is 'sampled')."""
    out = sched.schedule()
    check_output(sched, out)
    for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(NEW_TOKEN)
            if seq.num_output_tokens >= seq.params.max_tokens:
                seq.finish("length")
                sched.finish(seq)
    return out


def check_output(sched: Scheduler, out: SchedulerOutput) -> None:
    """Invariants every step must keep."""
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    assert len(out.seqs) == len(set(id(s) for s in out.seqs))
    assert len(out.seqs) == len(out.num_new_tokens) == len(out.block_tables)
    for seq, n, table in zip(out.seqs, out.num_new_tokens, out.block_tables, strict=True):
        assert seq.status == SequenceStatus.RUNNING
        assert 1 <= n <= seq.num_tokens - seq.num_computed_tokens
        # The blocks cover every token the step will write.
        assert len(table) * BLOCK_SIZE >= seq.num_computed_tokens + n
        assert table == sched.kv_cache.block_tables[seq.seq_id]
    # Running sequences stay in arrival order.
    arrivals = [s.arrival_time for s in sched.running]
    assert arrivals == sorted(arrivals)


def scheduled(out: SchedulerOutput) -> dict[str, int]:
    return {s.request_id: n for s, n in zip(out.seqs, out.num_new_tokens, strict=True)}


def kv_free(sched: Scheduler) -> int:
    return sched.kv_cache.num_free_blocks


# --- batching limits ------------------------------------------------------------------------


def test_max_num_seqs_caps_the_running_batch() -> None:
    sched = make_scheduler(max_num_seqs=2)
    add_all(sched, 4, 4, 4, 4, 4)
    out = step(sched)
    assert scheduled(out) == {"s0": 4, "s1": 4}
    assert [s.request_id for s in sched.waiting] == ["s2", "s3", "s4"]
    out = step(sched)
    assert scheduled(out) == {"s0": 1, "s1": 1}, "decodes keep the batch full; nobody is admitted"


def test_finished_sequence_frees_its_place_for_a_waiting_one() -> None:
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq("short", 4, 0.0, max_tokens=1), make_seq("long", 4, 1.0)]
    seqs.append(make_seq("next", 4, 2.0))
    for seq in seqs:
        sched.add(seq)
    step(sched)  # "short" finishes after its first token
    assert seqs[0].is_finished
    out = step(sched)
    assert scheduled(out) == {"long": 1, "next": 4}


def test_max_num_batched_tokens_caps_the_tokens_of_a_step() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    add_all(sched, 10, 10, 10)
    out = step(sched)
    assert scheduled(out) == {"s0": 10, "s1": 6}
    out = step(sched)
    assert scheduled(out) == {"s0": 1, "s1": 4, "s2": 10}
    out = step(sched)
    assert scheduled(out) == {"s0": 1, "s1": 1, "s2": 1}


def test_chunked_prefill_splits_a_long_prompt_across_steps() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    (seq,) = add_all(sched, 50)
    chunks = []
    while seq.num_output_tokens == 0:
        out = step(sched)
        chunks.append(scheduled(out)["s0"])
        if seq.num_output_tokens == 0:
            assert seq.num_tokens == 50, "no token is sampled before the prompt is complete"
    assert chunks == [16, 16, 16, 2]
    assert seq.num_computed_tokens == 50


def test_decode_steps_compute_one_token_each() -> None:
    sched = make_scheduler()
    (seq,) = add_all(sched, 5)
    assert scheduled(step(sched)) == {"s0": 5}
    for i in range(6):
        assert scheduled(step(sched)) == {"s0": 1}
        assert seq.num_output_tokens == i + 2


def test_running_decodes_are_served_before_new_prefills() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    (first,) = add_all(sched, 8)
    step(sched)
    late = make_seq("late", 20, arrival=1.0)
    sched.add(late)
    out = step(sched)
    assert scheduled(out) == {"s0": 1, "late": 7}


def test_waiting_sequences_are_admitted_in_arrival_order() -> None:
    sched = make_scheduler(max_num_seqs=1)
    seqs = add_all(sched, 3, 3, 3, 3)
    admitted = []
    while sched.has_unfinished():
        out = step(sched)
        for seq in out.seqs:
            if seq.request_id not in admitted:
                admitted.append(seq.request_id)
    assert admitted == [s.request_id for s in seqs]


def test_scheduler_with_nothing_to_do_returns_an_empty_output() -> None:
    sched = make_scheduler()
    out = sched.schedule()
    assert out.is_empty
    assert out.num_batched_tokens == 0
    assert out.block_copies == []


# --- preemption -----------------------------------------------------------------------------


def test_newest_running_sequence_is_preempted_when_blocks_run_out() -> None:
    sched = make_scheduler(num_blocks=3, max_num_seqs=2)
    old, new, queued = add_all(sched, 4, 4, 4)
    step(sched)  # both prefill: one full block each, one block free; "queued" waits
    assert kv_free(sched) == 1
    out = step(sched)  # both need a second block; only one is free

    assert out.num_preempted == 1
    assert scheduled(out) == {"s0": 1}
    assert new.status == SequenceStatus.WAITING
    assert new.num_computed_tokens == 0, "recompute: the cache of the victim is dropped"
    assert new.seq_id not in sched.kv_cache.block_tables
    assert new.token_ids == list(range(100, 104)) + [NEW_TOKEN], "its tokens are kept"
    assert list(sched.waiting) == [new, queued], "the victim goes first in line"
    assert sched.running == [old]
    assert sched.num_preemptions == 1


def test_preempted_sequence_resumes_by_recomputing_all_its_tokens() -> None:
    sched = make_scheduler(num_blocks=3, max_num_seqs=2)
    old, new = add_all(sched, 4, 4)
    step(sched)
    step(sched)  # "new" is preempted with 5 tokens
    old.finish("abort")
    sched.finish(old)
    out = step(sched)
    assert scheduled(out) == {"s1": 5}, "prompt and generated token are recomputed together"
    assert new.num_output_tokens == 2


def test_no_sequence_is_admitted_in_a_step_that_preempted() -> None:
    # After the preemption in the third step, one block is free and the victim's next chunk
    # (4 tokens of budget left) would fit in it; it must still wait for the next step.
    sched = make_scheduler(num_blocks=3, max_num_batched_tokens=5)
    old, new = add_all(sched, 4, 4)
    assert scheduled(step(sched)) == {"s0": 4, "s1": 1}
    assert scheduled(step(sched)) == {"s0": 1, "s1": 3}
    out = step(sched)
    assert out.num_preempted == 1
    assert scheduled(out) == {"s0": 1}
    assert list(sched.waiting) == [new]
    assert kv_free(sched) == 1
    out = step(sched)
    assert out.num_preempted == 0
    assert scheduled(out) == {"s0": 1, "s1": 4}


def test_preemption_under_memory_pressure_drops_nothing() -> None:
    sched = make_scheduler(num_blocks=10, max_num_seqs=6, max_num_batched_tokens=12)
    seqs = [make_seq(f"s{i}", 3 + 2 * i, float(i), max_tokens=12) for i in range(6)]
    for seq in seqs:
        sched.add(seq)
    steps = 0
    while sched.has_unfinished():
        step(sched)
        steps += 1
        assert steps < 500, "the scheduler stopped making progress"
        live = list(sched.waiting) + sched.running
        assert len(live) == len(set(map(id, live)))
        for seq in seqs:
            assert seq.is_finished or seq in live, f"{seq.request_id} was dropped"
        used = sum(len(t) for t in sched.kv_cache.block_tables.values())
        assert used + kv_free(sched) == 10
    assert sched.num_preemptions > 0, "the test must exercise preemption"
    for i, seq in enumerate(seqs):
        assert seq.num_output_tokens == 12
        assert seq.token_ids[: 3 + 2 * i] == list(range(100, 103 + 2 * i))
    assert kv_free(sched) == 10
    assert sched.kv_cache.block_tables == {}


def test_a_sequence_that_cannot_fit_alone_preempts_itself() -> None:
    sched = make_scheduler(num_blocks=2, max_num_seqs=1)
    (seq,) = add_all(sched, 8)
    step(sched)  # 8 tokens, both blocks full; the next token needs a third block
    out = step(sched)
    assert out.is_empty
    assert out.num_preempted == 1
    assert list(sched.waiting) == [seq]
    assert sched.running == []
    assert kv_free(sched) == 2


# --- chunked prefill disabled ---------------------------------------------------------------


def test_without_chunked_prefill_a_prompt_that_does_not_fit_the_budget_waits() -> None:
    sched = make_scheduler(max_num_batched_tokens=16, chunked=False)
    add_all(sched, 10, 10)
    out = step(sched)
    assert scheduled(out) == {"s0": 10}, "s1 is not split into a 6-token chunk"
    assert [s.request_id for s in sched.waiting] == ["s1"]
    out = step(sched)
    assert scheduled(out) == {"s0": 1, "s1": 10}


def test_without_chunked_prefill_later_prompts_do_not_jump_the_queue() -> None:
    sched = make_scheduler(max_num_batched_tokens=16, chunked=False)
    add_all(sched, 10, 10, 2)
    out = step(sched)
    assert scheduled(out) == {"s0": 10}
    assert [s.request_id for s in sched.waiting] == ["s1", "s2"]


@pytest.mark.parametrize("chunked", [True, False])
def test_preempted_sequence_longer_than_the_budget_is_resumed(chunked: bool) -> None:
    # A prompt that fits the budget can grow past it by generating; after a preemption its
    # recomputation must still be scheduled, or the request hangs forever.
    # Both decode until "old" needs a third block of four; "new" is preempted with 8 tokens.
    sched = make_scheduler(num_blocks=4, max_num_seqs=2, max_num_batched_tokens=6, chunked=chunked)
    old, new = make_seq("old", 4, 0.0, max_tokens=12), make_seq("new", 4, 1.0, max_tokens=12)
    sched.add(old)
    sched.add(new)
    steps = 0
    while sched.has_unfinished():
        step(sched)
        steps += 1
        assert steps < 200, (
            f"stuck: waiting={[(s.request_id, s.num_tokens) for s in sched.waiting]}"
        )
    assert sched.num_preemptions > 0
    assert old.num_output_tokens == new.num_output_tokens == 12
