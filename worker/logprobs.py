"""The engine's logprobs in the wire's shapes: OpenAI's chat `logprobs.content`, and the legacy
(completions-style) object that OpenAI's /v1/completions and FastChat's workers both send.

Each formats one output `c` (a delta or a whole answer, engine/outputs.py). A resumed answer
has logprobs for its new tokens only: the last len(c.logprobs) of its tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from pagedserve.protocol.openai import (
    ChatCompletionTokenLogprob,
    ChoiceLogprobs,
    CompletionLogprobs,
    TopLogprob,
)


def finite_logprob(logprob: float | None) -> float:
    """A logprob JSON can carry: -inf and NaN (a degenerate penalty) become -9999.0, as
    OpenAI's floor for impossible tokens."""
    if logprob is None or not math.isfinite(logprob):
        return -9999.0
    return max(logprob, -9999.0)


class LogprobFormatter:
    """Holds each token's text as OpenAI and FastChat show it in logprobs (a SentencePiece
    word start keeps its space), decoded once per token id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
                text = " " + text
            self._texts[token_id] = text
        return text

    def legacy(self, c: Any, k: int, offset: int) -> CompletionLogprobs:
        """The legacy object of `c`'s tokens, top `k` alternatives each, their text offsets
        counted from `offset` (the characters already before them)."""
        # every field set explicitly: streamed chunks leave out fields that were not set
        out = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        for token_id, entry in _entries(c):
            text = self.token_text(token_id)
            out.tokens.append(text)
            out.token_logprobs.append(finite_logprob(entry.get(token_id)))
            out.top_logprobs.append(
                {self.token_text(t): finite_logprob(lp) for t, lp in _top(entry, k)}
            )
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def chat(self, c: Any, k: int) -> ChoiceLogprobs:
        content = []
        for token_id, entry in _entries(c):
            text = self.token_text(token_id)
            content.append(
                ChatCompletionTokenLogprob(
                    token=text,
                    logprob=finite_logprob(entry.get(token_id)),
                    bytes=list(text.encode("utf-8")),
                    top_logprobs=[
                        TopLogprob(
                            token=self.token_text(t),
                            logprob=finite_logprob(lp),
                            bytes=list(self.token_text(t).encode("utf-8")),
                        )
                        for t, lp in _top(entry, k)
                    ],
                )
            )
        return ChoiceLogprobs(content=content)


def _entries(c: Any) -> Iterator[tuple[int, dict[int, float]]]:
    """(token id, logprobs entry) of each of `c`'s tokens that has one."""
    entries = c.logprobs or []
    first = max(len(c.token_ids) - len(entries), 0)
    return zip(c.token_ids[first:], entries, strict=False)


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]
