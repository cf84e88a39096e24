"""Worker faults under load, on the real stack (tiny Llama workers on loopback ports).

Each scenario sends a bounded number of greedy streamed completions, every one under its own
deadline, and sorts each outcome (live_stack.Outcome.verdict): a whole answer (with the
expected text where there is a reference), a clear error (an HTTP error status, or an error
event before [DONE]), or a loss (hung, cut off without a word, wrong text). Nothing may be
lost; the ledger records the rest.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ledger import Ledger, scaled
from live_stack import (
    EXPIRY,
    Outcome,
    Peak,
    Stack,
    account,
    completion,
    engine_idle,
    rss_kib,
    served_alone,
    stack,
    stream_all,
)
from servers import metric, wait_until


@pytest.fixture(scope="module")
def one_worker(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One worker behind a controller and the gateway, shared by the scenarios that break
    nothing lasting (each waits for the engine to be idle again before it ends)."""
    with stack(tiny_llama, tmp_path_factory.mktemp("one-worker")) as s:
        yield s


def under_way(outcomes: list[Outcome], worker_id: str, at: float) -> list[Outcome]:
    """The streams that worker `worker_id` had begun answering and not ended at time `at`."""
    return [
        o
        for o in outcomes
        if o.worker_id == worker_id
        and o.started_at is not None
        and o.started_at < at
        and (o.ended_at is None or o.ended_at > at)
    ]


def busiest(outcomes: list[Outcome]) -> str | None:
    """Once 8 streams have begun: the worker serving the most streams that have begun and not
    ended (None until then, or while none is under way)."""
    if sum(o.events >= 2 for o in outcomes) < 8:
        return None
    counts: dict[str, int] = {}
    for o in outcomes:
        if o.started_at is not None and not o.done and o.worker_id:
            counts[o.worker_id] = counts.get(o.worker_id, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


# -- 1. kill -9 ---------------------------------------------------------------------------------


def test_kill_9_a_worker_while_its_requests_stream(
    tiny_llama: Path, tmp_path: Path, ledger: Ledger
) -> None:
    """Two workers serve one model behind the gateway; one is killed with -9 while its
    streams run. A request that had not begun streaming completes on the other worker; one
    that had either completes whole (the gateway resumed it) or ends with an error event."""
    n, tokens = scaled(64, 256), scaled(64, 128)
    late = set(range(n - n // 4, n))  # sent just after the kill
    # one in eight asks for two choices: a stream the gateway cannot resume
    bodies = [completion(i, tokens, n=2 if i % 8 == 7 else 1) for i in range(n)]
    with stack(tiny_llama, tmp_path, workers=2) as s:
        reference = stream_all(s.url, bodies)
        assert all(o.verdict() == ("complete", "") for o in reference), [
            o.verdict() for o in reference
        ]
        expected = [o.text for o in reference]
        killed: dict[str, object] = {}
        workers = s.workers_by_id()

        def kill(outcomes: list[Outcome]) -> None:
            victim_id = wait_until(
                lambda: busiest(outcomes), 60, interval=0.01, what="streams under way"
            )
            victim = workers[victim_id]
            killed.update(id=victim_id, url=victim.url, at=time.monotonic())  # before: no race
            victim.kill()
            watcher.start()

        def watch_registry() -> None:  # when the controller forgets the dead worker
            wait_until(
                lambda: killed["url"] not in s.registered(), EXPIRY + 10, what="dead worker gone"
            )
            killed["gone"] = time.monotonic()

        watcher = threading.Thread(target=watch_registry, daemon=True)

        ledger.send(n)
        outcomes = stream_all(s.url, bodies, held=late, during=kill, deadline=120)
        account(ledger, outcomes, expected)

        watcher.join(EXPIRY + 15)
        assert "gone" in killed, "the dead worker stayed in the registry"
        left_after = killed["gone"] - killed["at"]  # type: ignore[operator]
        assert httpx.post(s.controller.url + "/list_models").json() == {"models": ["tiny"]}
        resumed = metric(s.url, "pagedserve_gateway_resumed_streams_total", result="resumed")

    # The route header names the worker whose stream the gateway passed on (it commits to one
    # at its first byte): a request whose stream had not begun on the dead worker names the
    # other one, wherever it was sent first.
    on_victim = [o for o in outcomes if o.worker_id == killed["id"]]
    elsewhere = [o for o in outcomes if o.worker_id != killed["id"]]
    cut = [o for o in on_victim if o.ended_at is None or o.ended_at > killed["at"]]
    verdicts = {o.index: o.verdict(expected[o.index]) for o in outcomes}
    ledger.notes.update(
        streams_on_killed_worker=len(cut),  # by the client's clock: a few may have just ended
        completed_whole=sum(verdicts[o.index][0] == "complete" for o in cut),
        ended_with_error_event=sum(verdicts[o.index][0] == "error" for o in cut),
        unresumable_on_killed_worker=sum(o.body["n"] > 1 for o in cut),
        gateway_resumed_streams=resumed,
        sent_after_the_kill=len(late),
        left_registry_after_s=round(left_after, 1),
    )
    assert ledger.lost == 0, ledger.record()
    assert cut, "the killed worker was streaming nothing: the fault tested nothing"
    # a stream broken by the kill ends with an error event, or goes on elsewhere, whole
    assert all(verdicts[o.index][1].startswith("event_") for o in on_victim if o.error), verdicts
    # ... and one of one choice always goes on (a stream of two choices cannot)
    assert all(verdicts[o.index][0] == "complete" for o in cut if o.body["n"] == 1), verdicts
    # every other request, those sent after the kill among them, is served whole
    bad = [(o.index, verdicts[o.index]) for o in elsewhere if verdicts[o.index][0] != "complete"]
    assert not bad, bad
    assert all(o.worker_id != killed["id"] for o in outcomes if o.index in late)
    assert left_after <= EXPIRY + 2


# -- 2. a KV cache far too small ----------------------------------------------------------------


def test_a_kv_cache_far_too_small_serves_everything_through_preemption(
    tiny_llama: Path, tmp_path: Path, ledger: Ledger
) -> None:
    """12 KV blocks of 16 tokens (192 tokens) for requests that need ~6 blocks each, many at
    once: every request finishes, by preemption and recomputation, with the text it has when
    served alone; no crash, and every block is free afterwards."""
    blocks, block_bytes = 12, 8192  # tiny Llama: K,V x 2 layers x 2 heads x 16 dims x 4 B x 16
    n, tokens = scaled(16, 64), 64
    engine = {"kv_cache_memory": blocks * block_bytes, "max_model_len": 128}
    bodies = [completion(i, tokens) for i in range(n)]
    with stack(tiny_llama, tmp_path, controller=False, gateway=False, engine=engine) as s:
        worker = s.workers[0]
        ledger.notes["stack_start_s"] = s.started_in
        assert metric(worker.url, "pagedserve_worker_kv_blocks_total") == blocks
        t0 = time.monotonic()
        alone = served_alone(s.url, bodies)
        ledger.notes["served_alone_s"] = round(time.monotonic() - t0, 1)
        before = metric(worker.url, "pagedserve_worker_preemptions_total")

        ledger.send(n)
        t0 = time.monotonic()
        outcomes = stream_all(s.url, bodies, deadline=150)
        ledger.notes["load_s"] = round(time.monotonic() - t0, 1)
        account(ledger, outcomes, alone)

        preemptions = metric(worker.url, "pagedserve_worker_preemptions_total") - before
        load = engine_idle(worker.url)
        assert worker.alive
    need = n * -(-(10 + tokens) // 16)
    ledger.notes.update(kv_blocks=blocks, blocks_needed_at_once=need, preemptions=preemptions)
    assert ledger.lost == 0 and ledger.completed == n, ledger.record()
    assert need >= 5 * blocks
    assert preemptions > 0
    assert load == {"running": 0, "waiting": 0, "blocks_used": 0, "kv_usage": 0}


# -- 3. 256 streams on one CPU worker -----------------------------------------------------------

# What the worker may grow by while 256 streams run, over its RSS after a warm-up round:
# the KV cache is allocated whole at start-up, so growth is the batch's activations (256
# rows of a 64-wide model: well under 1 MiB), logits (256 x ~2k vocabulary x 4 bytes: ~2 MiB
# per step), and per-request state (sequence, detokenizer, SSE buffers: tens of KiB each, a
# few MiB for 256). 64 MiB leaves an order of magnitude for allocator slack; a leak of the
# KV cache or of per-request tensors would blow through it.
RSS_GROWTH_BOUND_MIB = 64


def test_256_concurrent_streams_on_one_cpu_worker(one_worker: Stack, ledger: Ledger) -> None:
    """256 streams straight to one worker at once, in rounds: all complete, and the worker's
    memory grows within a bound and keeps nothing from one round to the next."""
    n, tokens, rounds = 256, scaled(16, 64), scaled(2, 4)
    worker = one_worker.workers[0]
    assert worker.proc is not None
    pid = worker.proc.pid
    warm = stream_all(worker.url, [completion(i, tokens) for i in range(32)])
    assert all(o.verdict() == ("complete", "") for o in warm)
    baseline = rss_kib(pid)["VmRSS"]
    peaks, ends = [], []
    for r in range(rounds):
        bodies = [completion(r * n + i, tokens) for i in range(n)]
        ledger.send(n)
        with Peak(pid) as peak:
            outcomes = stream_all(worker.url, bodies, deadline=150)
            engine_idle(worker.url)
        account(ledger, outcomes)
        peaks.append(peak.peak_kib)
        ends.append(rss_kib(pid)["VmRSS"])
    hwm = rss_kib(pid)["VmHWM"]
    mib = 1024
    ledger.notes.update(
        rss_baseline_mib=round(baseline / mib, 1),
        rss_peak_mib_by_round=[round(p / mib, 1) for p in peaks],
        rss_end_mib_by_round=[round(e / mib, 1) for e in ends],
        rss_high_water_mib=round(hwm / mib, 1),
        rss_growth_bound_mib=RSS_GROWTH_BOUND_MIB,
    )
    assert ledger.lost == 0 and not ledger.errors and ledger.completed == n * rounds, (
        ledger.record()
    )
    assert max(peaks) - baseline <= RSS_GROWTH_BOUND_MIB * mib, ledger.record()
    # the second round and later grow nothing lasting: no memory kept per request
    assert ends[-1] - ends[0] <= RSS_GROWTH_BOUND_MIB // 4 * mib, ledger.record()


# -- 4. clients that leave mid-stream -----------------------------------------------------------


def test_clients_leaving_mid_stream_are_aborted_and_free_their_blocks(
    one_worker: Stack, ledger: Ledger
) -> None:
    """Half the clients of one worker, behind the gateway, picked at random, leave after a
    random number of events: the engine aborts their requests and frees their blocks, and
    the others complete with the text each has when served alone."""
    seed = 18
    rng = random.Random(seed)
    n, tokens, long = scaled(32, 128), 32, 400
    leavers = set(rng.sample(range(n), n // 2))
    leave_after = {i: rng.randint(1, 24) for i in leavers}
    bodies = [completion(i, long if i in leavers else tokens) for i in range(n)]
    stayers = [i for i in range(n) if i not in leavers]
    url, worker = one_worker.url, one_worker.workers[0]
    alone = dict(zip(stayers, served_alone(url, [bodies[i] for i in stayers]), strict=True))
    expected = [alone.get(i) for i in range(n)]
    aborted = "pagedserve_worker_requests_total"
    before = metric(worker.url, aborted, outcome="aborted")

    ledger.send(n)
    outcomes = stream_all(url, bodies, leave_after=leave_after, deadline=120)
    load = engine_idle(worker.url)
    aborts = metric(worker.url, aborted, outcome="aborted") - before
    for o in outcomes:
        if o.index in leavers:
            assert o.disconnected and o.failure is None and o.error is None, o
            ledger.error("client left on purpose")
        else:
            account(ledger, [o], expected)
    ledger.notes.update(seed=seed, clients_left=len(leavers), engine_aborts=aborts)
    assert ledger.lost == 0 and ledger.completed == len(stayers), ledger.record()
    assert aborts == len(leavers)
    assert load == {"running": 0, "waiting": 0, "blocks_used": 0, "kv_usage": 0}


# -- 5. SIGTERM under load ----------------------------------------------------------------------


def test_sigterm_drains_a_worker_under_load(
    tiny_llama: Path, tmp_path: Path, ledger: Ledger
) -> None:
    """SIGTERM to one of two workers while it streams: its requests in flight complete, it
    leaves the registry and exits 0, and the requests sent meanwhile go to the other."""
    n, tokens = scaled(48, 192), scaled(64, 128)
    late = set(range(n // 2, n))  # sent once the SIGTERM is in
    bodies = [completion(i, tokens) for i in range(n)]
    options = {"drain_timeout": 60}
    with stack(tiny_llama, tmp_path, workers=2, worker_options=options) as s:
        reference = stream_all(s.url, bodies)
        assert all(o.verdict() == ("complete", "") for o in reference)
        expected = [o.text for o in reference]
        termed: dict[str, object] = {}
        workers = s.workers_by_id()

        def term(outcomes: list[Outcome]) -> None:
            victim_id = wait_until(
                lambda: busiest(outcomes), 60, interval=0.01, what="streams under way"
            )
            victim = workers[victim_id]
            (survivor,) = set(workers) - {victim_id}
            termed.update(id=victim_id, worker=victim, at=time.monotonic(), survivor=survivor)
            victim.signal(signal.SIGTERM)
            wait_until(  # draining, or gone already when its streams were near their end
                lambda: s.registered().get(victim.url, {"status": "gone"})["status"] != "ready",
                10,
                interval=0.05,
                what="the controller sees the worker draining",
            )

        ledger.send(n)
        outcomes = stream_all(s.url, bodies, held=late, during=term, deadline=120)
        account(ledger, outcomes, expected)
        victim = termed["worker"]
        code = victim.wait(timeout=70)
        wait_until(lambda: victim.url not in s.registered(), 10, what="drained worker gone")

    in_flight = under_way(outcomes, termed["id"], termed["at"])
    sent_after = [o for o in outcomes if o.index in late]
    ledger.notes.update(
        in_flight_at_sigterm=len(in_flight),
        sent_after_sigterm=len(sent_after),
        exit_code=code,
    )
    assert ledger.lost == 0 and not ledger.errors and ledger.completed == n, ledger.record()
    assert in_flight, "the worker had nothing in flight: the drain tested nothing"
    assert code == 0
    assert {o.worker_id for o in sent_after} == {termed["survivor"]}
