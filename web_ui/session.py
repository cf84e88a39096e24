"""One person's arena round, without Gradio: the two sides, their conversations, the rules
for sending, regenerating and voting, and the parallel streaming of both answers.

A `Round` is plain data kept in the session's `gr.State`. Every rule that guards the store
(vote once, vote only when both answers are complete, nothing for an empty or over-long
prompt) lives here, so the UI only shows what these functions say.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from pagedserve.web_ui.battle_log import Battle, ChatLog, Message, new_id, reveals_identity
from pagedserve.web_ui.gateway_client import ChatParams, GatewayClient, GatewayError, StreamResult

VOTES = {
    "leftvote": "model_a",
    "rightvote": "model_b",
    "tievote": "tie",
    "bothbad_vote": "tie (bothbad)",
}


def sample_pair(
    models: Sequence[str], weight: Callable[[str], float], rng: random.Random
) -> tuple[str, str]:
    """Two different models, each drawn with probability proportional to its weight (the first
    from all, the second from the rest), in random order. Raises ValueError if fewer than two
    models have a positive weight."""
    pool = [m for m in dict.fromkeys(models) if weight(m) > 0]
    if len(pool) < 2:
        raise ValueError(
            "A battle needs two models with a positive sampling weight; "
            f"available: {', '.join(pool) or 'none'}."
        )
    first = rng.choices(pool, weights=[weight(m) for m in pool])[0]
    rest = [m for m in pool if m != first]
    second = rng.choices(rest, weights=[weight(m) for m in rest])[0]
    return (first, second) if rng.random() < 0.5 else (second, first)


@dataclass
class Side:
    model: str
    messages: list[Message] = field(default_factory=list)
    streaming: bool = False
    error: str | None = None
    finish_reason: str | None = None
    # Sent as x-session-id: the gateway keeps a conversation on the worker that has it cached.
    conversation_id: str = field(default_factory=new_id)

    @property
    def answered(self) -> bool:
        """The last message is a complete answer."""
        return (
            not self.streaming
            and self.error is None
            and bool(self.messages)
            and self.messages[-1]["role"] == "assistant"
        )

    def display(self) -> list[Message]:
        """What the chat shows: the conversation, and an error as the answer it replaced."""
        shown = [dict(m) for m in self.messages]
        if self.error:
            shown.append({"role": "assistant", "content": f"⚠️ **Error:** {self.error}"})
        return shown


@dataclass
class Round:
    """A conversation with two models; `anony` hides their names until the vote."""

    sides: list[Side]
    anony: bool
    session_id: str
    round_id: str = field(default_factory=new_id)
    winner: str | None = None  # set by the vote, once
    leaked_identity: bool = False

    @classmethod
    def start(cls, model_a: str, model_b: str, anony: bool, session_id: str) -> Round:
        return cls([Side(model_a), Side(model_b)], anony, session_id)

    @property
    def mode(self) -> str:
        return "anony" if self.anony else "named"

    @property
    def turns(self) -> int:
        return sum(m["role"] == "user" for m in self.sides[0].messages)

    @property
    def busy(self) -> bool:
        return any(s.streaming for s in self.sides)

    @property
    def failed(self) -> bool:
        return any(s.error for s in self.sides)

    # -- the rules ----------------------------------------------------------------------------

    def refuse_prompt(self, prompt: str, max_chars: int, max_turns: int) -> str | None:
        """Why this prompt cannot be sent now, or None."""
        if self.winner is not None:
            return "This round is over: you voted. Click “New round” to start another."
        if self.busy:
            return "Wait until both answers are complete."
        if self.failed:
            return "An answer failed. Click “Regenerate” to try it again, or start a new round."
        return check_prompt(prompt, max_chars) or (
            f"This conversation reached {max_turns} turns; please vote or start a new round."
            if self.turns >= max_turns
            else None
        )

    def refuse_vote(self) -> str | None:
        if self.winner is not None:
            return "You already voted in this round. Click “New round” to play again."
        if not self.turns:
            return "Ask something first: vote once both models have answered."
        if self.busy:
            return "Wait until both answers are complete, then vote."
        if self.failed:
            return "An answer failed, so this round cannot be voted on. Regenerate or start anew."
        if not all(s.answered for s in self.sides):
            return "Both answers must be complete before you vote."
        return None

    def refuse_regenerate(self) -> str | None:
        if self.winner is not None:
            return "This round is over: you voted. Click “New round” to start another."
        if self.busy:
            return "Wait until both answers are complete."
        if not self.turns:
            return "Nothing to regenerate yet."
        return None

    # -- the actions ----------------------------------------------------------------------------

    def add_prompt(self, prompt: str) -> list[int]:
        for side in self.sides:
            side.messages.append({"role": "user", "content": prompt.strip()})
        return [0, 1]

    def rewind(self) -> list[int]:
        """Drop the last answers to regenerate them: only the failed sides if any failed, else
        both. Returns the sides to stream."""
        which = [i for i, s in enumerate(self.sides) if s.error] or [0, 1]
        for i in which:
            side = self.sides[i]
            side.error = None
            if side.messages and side.messages[-1]["role"] == "assistant":
                side.messages.pop()
        return which

    def vote(self, vote_type: str, judge: str, known_models: Sequence[str] = ()) -> Battle:
        """Close the round with a vote (one of VOTES) and return the record to store. Call
        refuse_vote first; a second vote raises."""
        if vote_type not in VOTES:
            raise ValueError(f"vote must be one of {sorted(VOTES)}; got {vote_type!r}")
        refused = self.refuse_vote()
        if refused:
            raise ValueError(refused)
        answers = [m["content"] for s in self.sides for m in s.messages if m["role"] == "assistant"]
        self.leaked_identity = self.anony and reveals_identity(
            answers, [s.model for s in self.sides] + list(known_models)
        )
        self.winner = VOTES[vote_type]
        return Battle(
            model_a=self.sides[0].model,
            model_b=self.sides[1].model,
            winner=self.winner,
            conversation_a=[dict(m) for m in self.sides[0].messages],
            conversation_b=[dict(m) for m in self.sides[1].messages],
            judge=judge,
            anony=self.anony,
            tstamp=time.time(),
            battle_id=self.round_id,
            leaked_identity=self.leaked_identity,
        )


def check_prompt(prompt: str | None, max_chars: int) -> str | None:
    """Why a prompt is refused before it is sent, or None."""
    if not prompt or not prompt.strip():
        return "Please type a prompt first."
    if len(prompt) > max_chars:
        return f"That prompt has {len(prompt)} characters; the limit is {max_chars}. Shorten it."
    return None


async def stream_sides(
    client: GatewayClient,
    sides: Sequence[Side],
    params: ChatParams,
    on_finished: Callable[[int, Side], None] | None = None,
) -> AsyncIterator[None]:
    """Stream an answer for each side at once, appending to its last assistant message; yield
    whenever some text arrived. A side that fails keeps its error and the others go on.
    Cancelling the iteration cancels every request."""
    queue: asyncio.Queue[tuple[int, str | None, str | None]] = asyncio.Queue()

    async def run(i: int, side: Side) -> None:
        result = StreamResult()
        error = None
        try:
            history = [dict(m) for m in side.messages]
            async with aclosing(
                client.stream_chat(
                    side.model, history, params, result, session_id=side.conversation_id
                )
            ) as it:
                async for text in it:
                    queue.put_nowait((i, text, None))
        except GatewayError as e:
            error = str(e)
        except Exception as e:  # never let one side's surprise stop the other
            error = f"unexpected error: {type(e).__name__}: {e}"
        side.finish_reason = result.finish_reason
        queue.put_nowait((i, None, error or ""))

    for side in sides:
        side.streaming, side.error, side.finish_reason = True, None, None
        side.messages.append({"role": "assistant", "content": ""})
    tasks = [asyncio.create_task(run(i, s)) for i, s in enumerate(sides)]
    pending = len(tasks)
    try:
        while pending:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            for i, text, error in items:
                side = sides[i]
                if text is not None:
                    side.messages[-1]["content"] += text
                    continue
                pending -= 1
                side.streaming = False
                if error:
                    side.error = error
                    side.messages.pop()  # the error takes the place of the half answer
                if on_finished is not None:
                    on_finished(i, side)
            yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for side in sides:
            if side.streaming:  # cancelled half-way: keep no half answer
                side.streaming = False
                side.error = "stopped before the answer was complete"
                if side.messages and side.messages[-1]["role"] == "assistant":
                    side.messages.pop()


def chat_log(
    round_or_mode: Round | str, side: Side, session_id: str, params: ChatParams
) -> ChatLog:
    """The log record of a side's finished turn."""
    mode = round_or_mode.mode if isinstance(round_or_mode, Round) else round_or_mode
    messages = [dict(m) for m in side.messages]
    return ChatLog(
        session_id=session_id,
        mode=mode,
        model=side.model,
        messages=messages,
        params={
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        },
        finish_reason=side.finish_reason if not side.error else None,
        error=side.error,
        round_id=round_or_mode.round_id if isinstance(round_or_mode, Round) else None,
    )
