"""Tests for engine/scheduler.py: continuous batching, chunked prefill, preemption by recompute,
and requests of several sequences (parallel samples, beams) that step and are preempted together."""

from __future__ import annotations

import pytest

from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.engine.sequence import Sequence, SequenceGroup, SequenceStatus

BLOCK_SIZE = 4
NEW_TOKEN = 3


def make_seq(name: str, num_tokens: int, arrival: float, max_tokens: int = 16) -> Sequence:
    return Sequence(
        name,
        list(range(100, 100 + num_tokens)),
        SamplingParams(max_tokens=max_tokens),
        arrival_time=arrival,
    )


def make_scheduler(
    num_blocks: int = 64,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    chunked: bool = True,
    prefix_caching: bool = False,
) -> Scheduler:
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=prefix_caching)
    return Scheduler(kv, max_num_seqs, max_num_batched_tokens, chunked)


def add(sched: Scheduler, seq: Sequence) -> SequenceGroup:
    group = SequenceGroup([seq])
    sched.add(group)
    return group


def add_all(sched: Scheduler, *sizes: int) -> list[Sequence]:
    seqs = [make_seq(f"s{i}", n, arrival=float(i)) for i, n in enumerate(sizes)]
    for seq in seqs:
        add(sched, seq)
    return seqs


def group_of(sched: Scheduler, seq: Sequence) -> SequenceGroup:
    (group,) = [g for g in [*sched.running, *sched.waiting] if any(s is seq for s in g.seqs)]
    return group


def add_forking(
    sched: Scheduler, name: str, num_tokens: int, arrival: float, n: int, max_tokens: int = 16
) -> SequenceGroup:
    """A request for `n` parallel samples: one sequence that fans out once its prompt is done."""
    params = SamplingParams(n=n, max_tokens=max_tokens)
    seq = Sequence(name, list(range(100, 100 + num_tokens)), params, arrival_time=arrival)
    seq.fan_out = params.best_of  # as EngineCore.add does
    return add(sched, seq)


def step(sched: Scheduler) -> SchedulerOutput:
    """One scheduler step plus the engine's bookkeeping: the KV of the step is registered, a
    fake token is 'sampled' (a fresh prompt fans out into `fan_out` sequences that share its
    blocks and differ in their last token), finished sequences and requests are released."""
    out = sched.schedule()
    check_output(sched, out)
    done = []
    for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
        seq.num_computed_tokens += n
        sched.kv_cache.register_computed(seq)
        if seq.num_computed_tokens < seq.num_tokens:
            continue
        group = group_of(sched, seq)
        targets = [seq]
        for _ in range(1, seq.fan_out):
            child = seq.fork()
            sched.kv_cache.fork(seq, child)
            group.seqs.append(child)
            targets.append(child)
        seq.fan_out = 1
        for i, target in enumerate(targets):
            target.token_ids.append(NEW_TOKEN + i)
            if target.num_output_tokens >= target.params.max_tokens:
                target.finish("length")
                sched.free_seq(target)
                done.append(group)
    for group in done:
        if group.is_finished and group in sched.running:
            sched.finish(group)
    return out


def check_output(sched: Scheduler, out: SchedulerOutput) -> None:
    """Invariants every step must keep."""
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert sched.num_running_seqs <= sched.max_num_seqs
    assert len(out.seqs) == len(set(id(s) for s in out.seqs))
    assert len(out.seqs) == len(out.num_new_tokens) == len(out.block_tables)
    pool = sched.kv_cache.pool
    for seq, n, table in zip(out.seqs, out.num_new_tokens, out.block_tables, strict=True):
        assert seq.status == SequenceStatus.RUNNING
        assert 1 <= n <= seq.num_tokens - seq.num_computed_tokens
        # The blocks cover every token the step will write.
        assert len(table) * BLOCK_SIZE >= seq.num_computed_tokens + n
        assert table == sched.kv_cache.block_tables[seq.seq_id]
        # No step writes into a block that another sequence also holds (copy on write).
        first = seq.num_computed_tokens // BLOCK_SIZE
        last = (seq.num_computed_tokens + n - 1) // BLOCK_SIZE
        for block in table[first : last + 1]:
            assert pool.ref_counts[block] == 1, f"{seq.request_id} writes into shared {block}"
    # Every scheduled sequence belongs to a running request, and the running requests stay
    # in arrival order.
    running = {id(s) for g in sched.running for s in g.seqs}
    assert all(id(s) in running for s in out.seqs)
    arrivals = [g.arrival_time for g in sched.running]
    assert arrivals == sorted(arrivals)


def scheduled(out: SchedulerOutput) -> dict[str, int]:
    """Tokens per request, for outputs with one sequence per request."""
    ids = [s.request_id for s in out.seqs]
    assert len(ids) == len(set(ids)), "use per_seq() for requests with several sequences"
    return {s.request_id: n for s, n in zip(out.seqs, out.num_new_tokens, strict=True)}


def per_seq(out: SchedulerOutput) -> dict[int, int]:
    return {s.seq_id: n for s, n in zip(out.seqs, out.num_new_tokens, strict=True)}


def seqs_of(groups) -> list[list[Sequence]]:
    return [g.seqs for g in groups]


def kv_free(sched: Scheduler) -> int:
    return sched.kv_cache.num_free_blocks


# --- batching limits ------------------------------------------------------------------------


def test_max_num_seqs_caps_the_running_batch() -> None:
    sched = make_scheduler(max_num_seqs=2)
    add_all(sched, 4, 4, 4, 4, 4)
    out = step(sched)
    assert scheduled(out) == {"s0": 4, "s1": 4}
    assert [g.request_id for g in sched.waiting] == ["s2", "s3", "s4"]
    out = step(sched)
    assert scheduled(out) == {"s0": 1, "s1": 1}, "decodes keep the batch full; nobody is admitted"


def test_finished_sequence_frees_its_place_for_a_waiting_one() -> None:
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq("short", 4, 0.0, max_tokens=1), make_seq("long", 4, 1.0)]
    seqs.append(make_seq("next", 4, 2.0))
    for seq in seqs:
        add(sched, seq)
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
    add(sched, late)
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
    assert seqs_of(sched.waiting) == [[new], [queued]], "the victim goes first in line"
    assert seqs_of(sched.running) == [[old]]
    assert sched.num_preemptions == 1


def test_preempted_sequence_resumes_by_recomputing_all_its_tokens() -> None:
    sched = make_scheduler(num_blocks=3, max_num_seqs=2)
    old, new = add_all(sched, 4, 4)
    step(sched)
    step(sched)  # "new" is preempted with 5 tokens
    old.finish("abort")
    sched.finish(group_of(sched, old))
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
    assert seqs_of(sched.waiting) == [[new]]
    assert kv_free(sched) == 1
    out = step(sched)
    assert out.num_preempted == 0
    assert scheduled(out) == {"s0": 1, "s1": 4}


def test_preemption_under_memory_pressure_drops_nothing() -> None:
    sched = make_scheduler(num_blocks=10, max_num_seqs=6, max_num_batched_tokens=12)
    seqs = [make_seq(f"s{i}", 3 + 2 * i, float(i), max_tokens=12) for i in range(6)]
    for seq in seqs:
        add(sched, seq)
    steps = 0
    while sched.has_unfinished():
        step(sched)
        steps += 1
        assert steps < 500, "the scheduler stopped making progress"
        live = list(sched.waiting) + sched.running
        assert len(live) == len(set(map(id, live)))
        live_seqs = [id(s) for g in live for s in g.seqs]
        for seq in seqs:
            assert seq.is_finished or id(seq) in live_seqs, f"{seq.request_id} was dropped"
        used = sum(len(t) for t in sched.kv_cache.block_tables.values())
        assert used + kv_free(sched) == 10
    assert sched.num_preemptions > 0, "the test must exercise preemption"
    for i, seq in enumerate(seqs):
        assert seq.num_output_tokens == 12
        assert seq.token_ids[: 3 + 2 * i] == list(range(100, 103 + 2 * i))
    assert kv_free(sched) == 10
    assert sched.kv_cache.block_tables == {}


def test_a_request_that_cannot_fit_even_alone_is_ended_not_requeued() -> None:
    # Recomputing it would bring it straight back here: the scheduler hands it to the engine
    # to end (the engine refuses single sequences that could not fit at all up front).
    sched = make_scheduler(num_blocks=2, max_num_seqs=1)
    (seq,) = add_all(sched, 8)
    step(sched)  # 8 tokens, both blocks full; the next token needs a third block
    out = step(sched)
    assert out.is_empty
    assert out.num_preempted == 0
    assert [g.seqs for g in out.out_of_memory] == [[seq]]
    assert sched.running == [] and not sched.waiting
    assert kv_free(sched) == 2


# --- chunked prefill disabled ---------------------------------------------------------------


def test_without_chunked_prefill_a_prompt_that_does_not_fit_the_budget_waits() -> None:
    sched = make_scheduler(max_num_batched_tokens=16, chunked=False)
    add_all(sched, 10, 10)
    out = step(sched)
    assert scheduled(out) == {"s0": 10}, "s1 is not split into a 6-token chunk"
    assert [g.request_id for g in sched.waiting] == ["s1"]
    out = step(sched)
    assert scheduled(out) == {"s0": 1, "s1": 10}


def test_without_chunked_prefill_later_prompts_do_not_jump_the_queue() -> None:
    sched = make_scheduler(max_num_batched_tokens=16, chunked=False)
    add_all(sched, 10, 10, 2)
    out = step(sched)
    assert scheduled(out) == {"s0": 10}
    assert [g.request_id for g in sched.waiting] == ["s1", "s2"]


@pytest.mark.parametrize("chunked", [True, False])
def test_preempted_sequence_longer_than_the_budget_is_resumed(chunked: bool) -> None:
    # A prompt that fits the budget can grow past it by generating; after a preemption its
    # recomputation must still be scheduled, or the request hangs forever.
    # Both decode until "old" needs a third block of four; "new" is preempted with 8 tokens.
    sched = make_scheduler(num_blocks=4, max_num_seqs=2, max_num_batched_tokens=6, chunked=chunked)
    old, new = make_seq("old", 4, 0.0, max_tokens=12), make_seq("new", 4, 1.0, max_tokens=12)
    add(sched, old)
    add(sched, new)
    steps = 0
    while sched.has_unfinished():
        step(sched)
        steps += 1
        assert steps < 200, (
            f"stuck: waiting={[(g.request_id, g.seqs[0].num_tokens) for g in sched.waiting]}"
        )
    assert sched.num_preemptions > 0
    assert old.num_output_tokens == new.num_output_tokens == 12


# --- requests of several sequences ----------------------------------------------------------


def test_a_request_fans_out_only_after_its_prompt_and_shares_the_prompt_blocks() -> None:
    sched = make_scheduler()
    group = add_forking(sched, "r", 6, 0.0, n=3)
    (parent,) = group.seqs
    assert scheduled(step(sched)) == {"r": 6}
    assert len(group.seqs) == 3
    tables = [sched.kv_cache.block_tables[s.seq_id] for s in group.seqs]
    assert tables[0] == tables[1] == tables[2], "the samples share the prompt's blocks"
    assert all(sched.kv_cache.pool.ref_counts[b] == 3 for b in tables[0])
    assert [s.output_token_ids for s in group.seqs] == [[NEW_TOKEN + i] for i in range(3)]
    assert sched.num_running_seqs == 3


def test_a_forked_request_steps_all_its_sequences_together_or_not_at_all() -> None:
    # "a" decodes; "b" fans out into three samples. With a budget of 3 tokens the step after
    # the fan-out has room for "a" and only two of the samples: "b" then waits whole.
    sched = make_scheduler(max_num_batched_tokens=3)
    a = make_seq("a", 2, 0.0, max_tokens=3)
    add(sched, a)
    b = add_forking(sched, "b", 2, 1.0, n=3)
    assert scheduled(step(sched)) == {"a": 2, "b": 1}
    assert scheduled(step(sched)) == {"a": 1, "b": 1}  # "b" completes its prompt and forks
    assert len(b.seqs) == 3
    shared = sched.kv_cache.block_tables[b.seqs[0].seq_id][-1]

    out = step(sched)  # "a" generates its last token; two tokens are left, not three
    assert scheduled(out) == {"a": 1}
    assert a.is_finished
    assert [(s.num_computed_tokens, s.num_tokens) for s in b.seqs] == [(2, 3)] * 3

    out = step(sched)
    assert per_seq(out) == {s.seq_id: 1 for s in b.seqs}, "every sample steps at once"
    # They all write into the prompt's shared last block: all but one get a copy of it.
    assert len(out.block_copies) == 2
    assert all(src == shared for src, _ in out.block_copies)
    assert [s.num_output_tokens for s in b.seqs] == [2, 2, 2]


def test_a_forked_request_is_preempted_and_resumed_as_a_whole() -> None:
    sched = make_scheduler(num_blocks=4)
    a = make_seq("a", 4, 0.0, max_tokens=2)
    add(sched, a)
    b = add_forking(sched, "b", 2, 1.0, n=3, max_tokens=2)
    step(sched)  # "a" fills a block; "b" forks: three samples share one partial block
    assert len(b.seqs) == 3
    assert kv_free(sched) == 2
    tokens = [list(s.token_ids) for s in b.seqs]

    # "a" needs a new block, the samples of "b" need a copy of their shared block each.
    out = step(sched)
    assert out.num_preempted == 1
    assert scheduled(out) == {"a": 1}
    assert sched.num_preemptions == 1
    assert seqs_of(sched.waiting) == [b.seqs], "the request is preempted with all its samples"
    for seq in b.seqs:
        assert seq.status == SequenceStatus.WAITING
        assert seq.num_computed_tokens == 0
        assert seq.seq_id not in sched.kv_cache.block_tables
    assert [s.token_ids for s in b.seqs] == tokens, "their tokens are kept"
    assert a.is_finished
    assert kv_free(sched) == 4

    # Resumed: each sample recomputes all but its last token, then all sample together.
    out = step(sched)
    assert per_seq(out) == {s.seq_id: 2 for s in b.seqs}
    assert [s.num_tokens for s in b.seqs] == [3, 3, 3], "nothing is sampled while catching up"
    out = step(sched)
    assert per_seq(out) == {s.seq_id: 1 for s in b.seqs}
    assert all(s.is_finished and s.num_output_tokens == 2 for s in b.seqs)
    assert not sched.has_unfinished()
    assert kv_free(sched) == 4
    assert sched.kv_cache.block_tables == {}


def test_a_request_that_fans_out_is_admitted_only_with_seats_for_all_its_samples() -> None:
    sched = make_scheduler(max_num_seqs=3)
    a = make_seq("a", 4, 0.0, max_tokens=2)
    add(sched, a)
    b = add_forking(sched, "b", 4, 1.0, n=3)
    out = step(sched)
    assert scheduled(out) == {"a": 4}, "three samples of 'b' do not fit beside 'a'"
    assert seqs_of(sched.waiting) == [b.seqs]
    step(sched)  # "a" finishes
    out = step(sched)
    assert scheduled(out) == {"b": 4}
    assert len(b.seqs) == 3
    assert sched.num_running_seqs == 3


# --- prefix caching -------------------------------------------------------------------------


def test_a_cached_prompt_prefix_is_not_recomputed() -> None:
    sched = make_scheduler(prefix_caching=True)
    first = make_seq("first", 9, 0.0, max_tokens=1)
    add(sched, first)
    out = step(sched)
    assert scheduled(out) == {"first": 9}
    (first_table,) = out.block_tables
    assert first.is_finished, "its blocks are free, but keep their content"
    again = make_seq("again", 9, 1.0, max_tokens=2)
    whole = make_seq("whole", 8, 2.0, max_tokens=2)
    add(sched, again)
    add(sched, whole)
    out = step(sched)
    # Two full blocks are cached; "whole" must still compute its last token for its logits,
    # so it reuses only the first block and recomputes the second.
    assert scheduled(out) == {"again": 1, "whole": 4}
    again_table, whole_table = out.block_tables
    assert again_table[:2] == first_table[:2]
    assert whole_table[0] == first_table[0]
    assert whole_table[1] not in first_table
    ref_counts = sched.kv_cache.pool.ref_counts
    assert (ref_counts[first_table[0]], ref_counts[first_table[1]]) == (2, 1)
    assert sched.kv_cache.prefix_hit_tokens == 8 + 4


def test_resumed_samples_never_write_into_a_block_reused_from_the_cache() -> None:
    # Engine bug: a request of two samples, preempted, comes back. "b" finds its prompt and
    # its first generated block ("x") in the prefix cache, "a" only the prompt block. When
    # the step is committed "a" takes fresh blocks first and the free queue hands it "x"
    # (evicting it), which "b" then takes as its cached block: "a" writes its tokens into
    # the block "b" reads as its own.
    sched = make_scheduler(num_blocks=6, prefix_caching=True)
    kv = sched.kv_cache
    prompt = [100, 101, 102, 103]
    for name, tokens in (("r", prompt + [1, 2, 3, 4, 5]), ("s", [9] * 12)):
        done = Sequence(name, tokens, SamplingParams())  # earlier requests, now gone
        kv.allocate(done, done.num_tokens)
        done.num_computed_tokens = done.num_tokens
        kv.register_computed(done)
        kv.free(done)
    probe = Sequence("probe", prompt + [1, 2, 3, 4, 5], SamplingParams())
    _, x = kv.cached_prefix(probe)  # "r"'s second block, free but cached
    params = SamplingParams(n=2)
    a = Sequence("g", prompt + [7, 7, 7, 7, 8, 9], params)
    b = Sequence("g", prompt + [1, 2, 3, 4, 5, 6], params)
    for seq in (a, b):
        seq.num_prompt_tokens = len(prompt)
    sched.add(SequenceGroup([a, b]))

    out = sched.schedule()
    assert per_seq(out) == {a.seq_id: 5, b.seq_id: 1}
    assert kv.block_tables[b.seq_id][1] == x, "b reuses its cached block"
    assert x not in kv.block_tables[a.seq_id], "a must not write into b's cached block"
    check_output(sched, out)
