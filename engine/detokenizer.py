"""Incremental detokenization and stop strings.

Decoding only a short window of recent tokens keeps each step O(1); the window starts a few
tokens back so tokenizers that merge spaces or bytes across tokens render exactly, and text is
held back while it ends in an incomplete UTF-8 character."""

from __future__ import annotations

from pagedserve.engine.sequence import Sequence


def update_text(tokenizer, seq: Sequence) -> str:
    """Extend `seq.output_text` with its newest token; returns the text added."""
    ids = seq.token_ids
    skip = seq.params.skip_special_tokens
    prefix = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip)
    full = tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=skip)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    new_text = full[len(prefix) :]
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    seq.output_text += new_text
    return new_text


def find_stop_string(seq: Sequence, num_new_chars: int) -> str | None:
    """If a stop string now appears, cut the text before it and return it."""
    text = seq.output_text
    best: tuple[int, str] | None = None
    for stop in seq.params.stop_strings:
        # Only the new characters, plus enough before them for a stop string spanning both.
        start = max(len(text) - num_new_chars - len(stop) + 1, 0)
        at = text.find(stop, start)
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    if best is None:
        return None
    seq.output_text = text[: best[0]]
    return best[1]


def visible_len(seq: Sequence) -> int:
    """While running, hold back a tail that might still become a stop string."""
    if seq.is_finished or not seq.params.stop_strings:
        return len(seq.output_text)
    hold = max(len(s) for s in seq.params.stop_strings) - 1
    return max(len(seq.output_text) - hold, 0)


def visible_text(seq: Sequence) -> str:
    return seq.output_text[: visible_len(seq)]
