"""The arena's rules without a browser: rounds (send, vote once, only when both answers are
complete), pair sampling by weight, parallel streaming where one side fails, and the gateway
client's readable errors (mock transport, and a real closed port)."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter

import httpx
import pytest
from servers import free_port

from pagedserve.web_ui.config import ArenaConfig, parse_descriptions, parse_weights
from pagedserve.web_ui.gateway_client import ChatParams, GatewayClient, GatewayError
from pagedserve.web_ui.session import Round, Side, check_prompt, sample_pair, stream_sides


def answered_round(anony: bool = True) -> Round:
    rnd = Round.start("alpha", "bravo", anony=anony, session_id="s1")
    rnd.add_prompt("  hello  ")
    for side, text in zip(rnd.sides, ["hi from A", "hi from B"], strict=True):
        side.messages.append({"role": "assistant", "content": text})
    return rnd


# -- rounds -------------------------------------------------------------------------------------


def test_prompts_are_checked_before_anything_is_sent() -> None:
    assert check_prompt("", 10) == "Please type a prompt first."
    assert check_prompt("   \n", 10) == "Please type a prompt first."
    assert "11 characters; the limit is 10" in check_prompt("x" * 11, 10)
    assert check_prompt("fine", 10) is None
    rnd = Round.start("a", "b", anony=True, session_id="s")
    assert rnd.refuse_prompt("ok", 100, max_turns=1) is None
    rnd.add_prompt("ok")
    assert rnd.sides[0].messages == [{"role": "user", "content": "ok"}]


def test_vote_only_once_and_only_when_both_answers_are_complete() -> None:
    rnd = Round.start("alpha", "bravo", anony=True, session_id="s1")
    assert "Ask something first" in rnd.refuse_vote()
    rnd.add_prompt("hello")
    rnd.sides[0].messages.append({"role": "assistant", "content": "done"})
    rnd.sides[1].streaming = True
    rnd.sides[1].messages.append({"role": "assistant", "content": "half"})
    assert "Wait until both answers are complete" in rnd.refuse_vote()
    with pytest.raises(ValueError, match="Wait"):
        rnd.vote("leftvote", "judge")
    rnd.sides[1].streaming = False
    rnd.sides[1].error = "model down"
    assert "failed" in rnd.refuse_vote()
    assert rnd.winner is None

    rnd = answered_round()
    battle = rnd.vote("rightvote", "arena_user_s1", known_models=["alpha", "bravo"])
    assert battle.winner == "model_b" and battle.battle_id == rnd.round_id
    assert battle.conversation_a[0] == {"role": "user", "content": "hello"}
    assert battle.turn == 1 and battle.anony and battle.rated
    assert "already voted" in rnd.refuse_vote()
    with pytest.raises(ValueError, match="already voted"):
        rnd.vote("tievote", "judge")
    assert "round is over" in rnd.refuse_prompt("more", 100, 10)
    assert "round is over" in rnd.refuse_regenerate()


def test_a_vote_after_an_answer_named_a_model_is_not_rated() -> None:
    rnd = answered_round()
    rnd.sides[1].messages[-1]["content"] = "I am Bravo, or rather bravo."
    battle = rnd.vote("tievote", "j", known_models=["alpha", "bravo", "charlie"])
    assert battle.leaked_identity and not battle.rated and battle.winner == "tie"
    named = answered_round(anony=False)
    assert named.vote("bothbad_vote", "j").winner == "tie (bothbad)"
    with pytest.raises(ValueError, match="vote must be one of"):
        answered_round().vote("upvote", "j")


def test_turn_limit_and_regenerate_rewinds_failed_sides_only() -> None:
    rnd = answered_round()
    assert "reached 1 turns" in rnd.refuse_prompt("again", 100, max_turns=1)
    assert rnd.rewind() == [0, 1]  # nothing failed: both answers go
    assert [s.messages[-1]["role"] for s in rnd.sides] == ["user", "user"]
    rnd = answered_round()
    rnd.sides[0].messages.pop()
    rnd.sides[0].error = "rate limited"
    assert "An answer failed" in rnd.refuse_prompt("next", 100, 10)
    assert rnd.rewind() == [0]
    assert rnd.sides[0].error is None and rnd.sides[1].messages[-1]["content"] == "hi from B"


def test_sample_pair_follows_weights_and_needs_two_models() -> None:
    rng = random.Random(0)
    weights = {"a": 1.0, "b": 1.0, "c": 6.0, "off": 0.0}
    counts: Counter[str] = Counter()
    sides: Counter[str] = Counter()
    for _ in range(3000):
        a, b = sample_pair(list(weights), weights.get, rng)
        assert a != b and "off" not in (a, b)
        counts.update([a, b])
        sides[a] += 1
    # c is drawn first 75% of the time and second in most of the rest
    assert counts["c"] / 3000 > 0.9
    assert abs(counts["a"] - counts["b"]) < 200
    assert 1300 < sides["c"] < 1700  # the order is random: c is model A about half the time
    with pytest.raises(ValueError, match="two models"):
        sample_pair(["a", "off"], weights.get, rng)


def test_config_parses_and_validates_flags() -> None:
    assert parse_weights("a=2, b=0.5,") == {"a": 2.0, "b": 0.5}
    assert parse_descriptions("a=first, with commas; b = second") == {
        "a": "first, with commas",
        "b": "second",
    }
    with pytest.raises(ValueError, match="not a number"):
        parse_weights("a=x")
    with pytest.raises(ValueError, match="name=weight"):
        parse_weights("a")
    with pytest.raises(ValueError, match=">= 0"):
        ArenaConfig("http://x", model_weights={"a": -1})
    with pytest.raises(ValueError, match="http"):
        ArenaConfig("localhost:8000")
    config = ArenaConfig("http://127.0.0.1:8000/", model_descriptions={"m": "mine"})
    assert config.gateway_url == "http://127.0.0.1:8000"
    assert config.describe("m") == "mine" and "random weights" in config.describe("tiny-llama")
    assert config.weight("unlisted") == 1.0


# -- streaming both sides ------------------------------------------------------------------------


class FakeClient:
    """stream_chat yields words with a pause; model 'down' fails after its first word."""

    def __init__(self) -> None:
        self.sessions: dict[str, str | None] = {}

    async def stream_chat(self, model, messages, params, result=None, session_id=None):
        self.sessions[model] = session_id
        for i, word in enumerate(["one ", "two ", "three"]):
            await asyncio.sleep(0.01)
            if model == "down" and i == 1:
                raise GatewayError("The model 'down' is down or overloaded (HTTP 503): gone")
            yield word
        if result is not None:
            result.finish_reason = "stop"


def test_one_side_failing_leaves_the_other_streaming() -> None:
    rnd = Round.start("up", "down", anony=True, session_id="s")
    rnd.add_prompt("go")
    finished: list[tuple[int, str | None]] = []

    client = FakeClient()

    async def run() -> int:
        updates = 0
        it = stream_sides(
            client, rnd.sides, ChatParams(), lambda i, s: finished.append((i, s.error))
        )
        async for _ in it:
            updates += 1
        return updates

    assert asyncio.run(run()) >= 2
    up, down = rnd.sides
    assert up.messages[-1] == {"role": "assistant", "content": "one two three"}
    assert up.finish_reason == "stop" and up.answered
    assert down.messages[-1] == {"role": "user", "content": "go"}  # no half answer kept
    assert "HTTP 503" in down.error and not down.streaming
    assert down.display()[-1]["content"].startswith("⚠️ **Error:** The model 'down'")
    assert sorted(i for i, _ in finished) == [0, 1]
    assert rnd.refuse_vote() is not None
    # each side's conversation is a session of its own, kept on one worker by the gateway
    assert client.sessions == {"up": up.conversation_id, "down": down.conversation_id}
    assert up.conversation_id != down.conversation_id


def test_cancelling_the_stream_keeps_no_half_answer() -> None:
    side = Side("up", [{"role": "user", "content": "go"}])

    async def run() -> None:
        it = stream_sides(FakeClient(), [side], ChatParams())
        await it.__anext__()
        await it.aclose()

    asyncio.run(run())
    assert not side.streaming and side.error and side.messages[-1]["role"] == "user"


# -- the gateway client --------------------------------------------------------------------------


def sse(*events: dict | str) -> bytes:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return "".join(lines).encode()


def chunk(text: str | None = None, finish: str | None = None) -> dict:
    delta = {"content": text} if text is not None else {}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def collect(handler, model: str = "m") -> tuple[str, GatewayError | None, list[dict]]:
    seen: list[dict] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append({"headers": dict(request.headers), **json.loads(request.content)})
        return handler(request)

    async def run() -> tuple[str, GatewayError | None]:
        client = GatewayClient("http://gw", api_key="k1", transport=httpx.MockTransport(record))
        text = ""
        try:
            async for piece in client.stream_chat(
                model, [{"role": "user", "content": "hi"}], ChatParams(0.5, 0.9, 7)
            ):
                text += piece
        except GatewayError as e:
            return text, e
        finally:
            await client.aclose()
        return text, None

    text, error = asyncio.run(run())
    return text, error, seen


def test_stream_chat_sends_openai_requests_and_joins_deltas() -> None:
    body = sse(
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        chunk("Hel"),
        chunk("lo"),
        chunk(finish="stop"),
        "[DONE]",
    )
    text, error, seen = collect(lambda r: httpx.Response(200, content=body))
    assert text == "Hello" and error is None
    req = seen[0]
    assert req["headers"]["authorization"] == "Bearer k1"
    assert req["stream"] is True and req["model"] == "m"
    assert (req["temperature"], req["top_p"], req["max_tokens"]) == (0.5, 0.9, 7)


@pytest.mark.parametrize(
    "status, message, expect",
    [
        (
            429,
            "Rate limit exceeded for key",
            "Rate limit reached (HTTP 429) for model 'm': Rate limit exceeded for key Wait a",
        ),
        (404, "The model 'm' does not exist", "not available right now (HTTP 404)"),
        (503, "no worker serves m", "down or overloaded (HTTP 503): no worker serves m"),
        (500, "boom", "down or overloaded (HTTP 500)"),
        (401, "bad key", "refused the API key (HTTP 401)"),
        (400, "maximum context length is 256 tokens", "refused this request (HTTP 400)"),
    ],
)
def test_http_errors_become_readable_messages(status: int, message: str, expect: str) -> None:
    body = {"error": {"message": message, "type": "x", "param": None, "code": None}}
    text, error, _ = collect(lambda r: httpx.Response(status, json=body))
    assert text == "" and error is not None and expect in str(error)
    assert error.status == status


def test_stream_errors_and_cut_streams_become_readable_messages() -> None:
    failing = sse(
        chunk("Hi"), {"error": {"message": "generation failed: OOM", "type": "server_error"}}
    )
    text, error, _ = collect(lambda r: httpx.Response(200, content=failing))
    assert text == "Hi" and "failed while answering: generation failed: OOM" in str(error)
    cut = sse(chunk("Hi"))
    text, error, _ = collect(lambda r: httpx.Response(200, content=cut))
    assert text == "Hi" and "cut off" in str(error)


def test_a_gateway_that_is_down_is_named_in_the_message() -> None:
    port = free_port()  # nothing listens here

    async def run() -> tuple[GatewayError, GatewayError]:
        client = GatewayClient(f"http://127.0.0.1:{port}", connect_timeout=2.0)
        try:
            with pytest.raises(GatewayError) as listing:
                await client.list_models()
            with pytest.raises(GatewayError) as chat:
                async for _ in client.stream_chat("m", [], ChatParams()):
                    pass
        finally:
            await client.aclose()
        return listing.value, chat.value

    listing, chat = asyncio.run(run())
    for e in (listing, chat):
        assert f"Cannot reach the gateway at http://127.0.0.1:{port}" in str(e)
        assert "Is it running?" in str(e)
