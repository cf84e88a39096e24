"""Incremental detokenization and stop strings.

Decoding only a short window of recent tokens keeps each step O(1); the window starts a few
tokens back so tokenizers that merge spaces or bytes across tokens render exactly, and text is
held back while it ends in an incomplete UTF-8 character."""

from __future__ import annotations

from collections.abc import Sequence

WINDOW = 5  # prompt tokens decoded before the first output token, for its context


class BackendDecoder:
    """A fast tokenizer's `decode`, straight from its `tokenizers` backend: what transformers'
    decode returns when its own `_decode` runs and cleans up no spaces, without its per-call
    conversions (3 -> 1 us a call; detokenizing decodes twice per token)."""

    def __init__(self, backend):
        self.backend = backend

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def fast_decoder(tokenizer):
    """`tokenizer`, or a BackendDecoder where that decodes exactly as it does."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return tokenizer
    if (
        isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer)._decode is TokenizersBackend._decode
        and type(tokenizer).decode is TokenizersBackend.decode
        and not tokenizer.clean_up_tokenization_spaces
    ):
        return BackendDecoder(tokenizer.backend_tokenizer)
    return tokenizer


class IncrementalText:
    """One sequence's output text, grown a token at a time."""

    def __init__(self, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self.ids = list(prompt_token_ids[-WINDOW:])  # the prompt's tail, then the output
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.skip_special_tokens = skip_special_tokens
        self.text = ""

    def append(self, tokenizer, token: int) -> str:
        """Extend the text with the next token; returns the text added."""
        self.ids.append(token)
        skip = self.skip_special_tokens
        prefix = tokenizer.decode(
            self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip
        )
        full = tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        new_text = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += new_text
        return new_text

    def cut_at_stop(self, stops: Sequence[str], num_new_chars: int) -> str | None:
        """If a stop string now appears, cut the text before it and return it."""
        text = self.text
        best: tuple[int, str] | None = None
        for stop in stops:
            # Only the new characters, plus enough before them for a stop string spanning both.
            start = max(len(text) - num_new_chars - len(stop) + 1, 0)
            at = text.find(stop, start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        self.text = text[: best[0]]
        return best[1]

    def visible_len(self, stops: Sequence[str], finished: bool) -> int:
        """While running, hold back a tail that might still become a stop string."""
        if finished or not stops:
            return len(self.text)
        hold = max(len(s) for s in stops) - 1
        return max(len(self.text) - hold, 0)

    def visible(self, stops: Sequence[str], finished: bool) -> str:
        return self.text[: self.visible_len(stops, finished)]
