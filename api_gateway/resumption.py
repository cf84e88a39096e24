"""A stream that survives its worker: when a worker fails after its stream began, the request
goes on on another worker of the model, and the client sees one unbroken stream.

Resumable requests (streamed, one choice, no beam search) are sent with `return_token_ids`, so
that each chunk says which tokens it carries. `StreamResumer.observe` notes, event by event,
the output token ids and how many characters of text the client has received (and takes the
ids out again when the client did not ask for them). On a failure, `resume()` sends the same
request to another worker with

    "resume": {"output_token_ids": [...], "sent_chars": N}

and that worker serves it as if its own engine had generated those tokens and streamed those
characters: the rest of the answer is what the first worker would have produced (greedy or
seeded), with penalties, stop strings, max_tokens and usage counting the whole answer, no role
chunk repeated and the same completion id (the worker names it after x-request-id).

A non-streamed request needs none of this: its answer has not begun, so fail-over sends it
again whole (forwarding.py).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from pagedserve.api_gateway.errors import GatewayError
from pagedserve.api_gateway.forwarding import Forwarded, Forwarder
from pagedserve.api_gateway.upstream import OpenStream
from pagedserve.controller.dispatch import RouteRequest
from pagedserve.protocol.openai import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)

_IDS = b',"return_token_ids":true}'


def resumable(req: ChatCompletionRequest | CompletionRequest) -> bool:
    if not req.stream or req.n != 1 or req.use_beam_search or (req.best_of or 1) > 1:
        return False
    if getattr(req, "echo", False):  # the echoed prompt is text sent, but not the answer's
        return False
    # one prompt: a batch of completion prompts makes one choice per prompt
    prompt = getattr(req, "prompt", "")
    return isinstance(prompt, str) or all(isinstance(t, int) for t in prompt) or len(prompt) == 1


def asking_for_token_ids(body: bytes) -> bytes:
    """The body with return_token_ids set. Spliced before the object's closing brace rather
    than parsed and written again: the body passes through as the client sent it. A key the
    client sent too is overridden (the last of duplicate keys wins)."""
    return body[: body.rindex(b"}")] + _IDS


class StreamResumer:
    def __init__(
        self,
        forwarder: Forwarder,
        request: RouteRequest,
        path: str,
        body: bytes,
        headers: dict[str, str],
        deadline: float,
        client_wants_ids: bool,
        first: Forwarded,
    ) -> None:
        self.forwarder = forwarder
        self.request = request
        self.path = path
        self.body = body  # as the client sent it (after the gateway's own limits)
        self.headers = headers
        self.deadline = deadline
        self.client_wants_ids = client_wants_ids
        self.current = first
        self.tried = {first.worker.worker_id}
        self.token_ids: list[int] = []
        self.sent_chars = 0
        self.says_ids = False  # the worker's chunks carry token ids: it can be resumed from
        self.finished = False  # the answer's finish_reason went through: nothing to resume
        self._last: dict[str, Any] | None = None  # the last chunk with a choice, as a model
        self.resumes = 0

    # -- watching the stream ----------------------------------------------------------------

    def observe(self, block: bytes) -> bytes:
        """Note the tokens and text of whole events; return them as the client should see them."""
        events = block.split(b"\n\n")
        changed = False
        for i, event in enumerate(events):
            if not event.startswith(b"data: {"):
                continue
            try:
                chunk = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                continue
            stripped = self._take(chunk)
            if stripped and not self.client_wants_ids:
                events[i] = b"data: " + orjson.dumps(chunk)
                changed = True
        return b"\n\n".join(events) if changed else block

    def _take(self, chunk: dict[str, Any]) -> bool:
        """Record one chunk's tokens and text, and take out the id fields unless the client
        asked for them. True if it had any."""
        take = dict.get if self.client_wants_ids else dict.pop
        had = take(chunk, "prompt_token_ids", None) is not None
        if chunk.get("choices"):
            self._last = chunk
        self.says_ids |= had
        for choice in chunk.get("choices") or ():
            ids = take(choice, "token_ids", None)
            if ids is not None:
                had = self.says_ids = True
                self.token_ids.extend(ids)
            delta = choice.get("delta")
            text = delta.get("content") if delta is not None else choice.get("text")
            if text:
                self.sent_chars += len(text)
            if choice.get("finish_reason") is not None:
                self.finished = True
        return had

    def answer_end(self) -> bytes | None:
        """When the answer was whole before its worker went, what is left to send: nothing
        after its finish chunk, or the finish chunk the worker would have sent after
        max_tokens' last token. None when the answer goes on (another worker would refuse
        to go on from a whole one)."""
        if self.finished:
            return b""
        limit = self.request.max_tokens
        if self._last is None or limit is None or len(self.token_ids) < limit:
            return None
        chunk = {k: v for k, v in self._last.items() if k not in ("choices", "usage")}
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if "delta" in self._last["choices"][0]:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        chunk["choices"] = [choice]
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    # -- going on elsewhere -----------------------------------------------------------------

    async def resume(self, reason: str) -> OpenStream | None:
        """The stream of another worker going on from where the failed one stopped, or None."""
        failed = self.current.worker
        await self.forwarder.stream_failed(failed, reason)
        if not self.says_ids:  # a worker that does not say which tokens it sent (FastChat's)
            return None
        body = orjson.loads(self.body)
        body["return_token_ids"] = True
        body["resume"] = {"output_token_ids": self.token_ids, "sent_chars": self.sent_chars}
        try:
            forwarded = await self.forwarder.forward(
                self.request,
                self.path,
                orjson.dumps(body),
                self.headers,
                True,
                self.deadline,
                exclude=self.tried,
            )
        except GatewayError as e:
            logger.warning("stream from %s not resumed: %s", failed.worker_name, e.message)
            return None
        self.tried.add(forwarded.worker.worker_id)
        if not isinstance(forwarded.outcome, OpenStream):  # refused (4xx): cannot go on
            logger.warning(
                "stream from %s not resumed: %s refused it", failed.worker_name, forwarded.worker
            )
            return None
        self.resumes += 1
        self.forwarder.done(self.current)
        self.current = forwarded
        logger.info(
            "stream resumed on %s after %d tokens (%s failed: %s)",
            forwarded.worker.worker_name,
            len(self.token_ids),
            failed.worker_name,
            reason,
        )
        return forwarded.outcome
