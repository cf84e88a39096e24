"""The asyncio engine: streaming, abort, and serving on after a bad request."""

from __future__ import annotations

import asyncio

import pytest

from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return AsyncEngine(
        EngineConfig(model=str(tiny_llama), max_model_len=512, kv_cache_memory=1 << 24)
    )


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_streams_growing_outputs_that_end_finished(engine):
    async def main():
        seen = []
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        async for out in engine.generate("Once upon a time", params, "stream-1"):
            seen.append(out)
        return seen

    seen = run(main())
    lengths = [len(o.outputs[0].token_ids) for o in seen]
    assert lengths == list(range(1, 11))
    assert [o.finished for o in seen] == [False] * 9 + [True]
    texts = [o.outputs[0].text for o in seen]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert seen[-1].outputs[0].finish_reason == "length"


def test_concurrent_requests_match_one_at_a_time(engine):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["The river", "A small garden of herbs", "東京", "In 1969 the"]

    async def one(prompt, rid):
        last = None
        async for out in engine.generate(prompt, params, rid):
            last = out
        return last.outputs[0].token_ids

    async def main():
        together = await asyncio.gather(*(one(p, f"c{i}") for i, p in enumerate(prompts)))
        alone = [await one(p, f"a{i}") for i, p in enumerate(prompts)]
        return together, alone

    together, alone = run(main())
    assert together == alone


def test_abort_frees_blocks_at_once(engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        stream = engine.generate("a long story " * 20, params, "to-abort")
        out = await stream.__anext__()
        assert engine.stats().num_blocks_used > 0
        await engine.abort("to-abort")
        after = engine.stats()
        rest = [o async for o in stream]  # outputs already queued, then the aborted end
        return out, after, rest[-1]

    first, after, last = run(main())
    assert not first.finished
    assert after.num_blocks_used == 0 and after.num_running == 0
    assert last.finished and last.outputs[0].finish_reason == "abort"


def test_consumer_that_walks_away_releases_its_request(engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        async for _ in engine.generate("walk away", params, "walker"):
            break  # the consumer stops listening, as a disconnected client would
        for _ in range(200):
            if engine.stats().num_running == 0 and not engine.engine.requests:
                return True
            await asyncio.sleep(0.01)
        return False

    assert run(main())
    assert engine.stats().num_blocks_used == 0


def test_bad_request_fails_alone_and_engine_keeps_serving(engine):
    async def main():
        with pytest.raises(ValueError, match="empty"):
            async for _ in engine.generate("", SamplingParams(max_tokens=4), "bad"):
                pass
        with pytest.raises(ValueError, match="at most"):
            async for _ in engine.generate([7] * 600, SamplingParams(max_tokens=4), "too-long"):
                pass
        outs = [
            o
            async for o in engine.generate(
                "fine", SamplingParams(max_tokens=4, ignore_eos=True), "good"
            )
        ]
        return outs[-1]

    last = run(main())
    assert last.finished and len(last.outputs[0].token_ids) == 4
    assert not engine.engine.requests
