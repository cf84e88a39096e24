"""Resuming an answer that another engine began (its worker died mid-stream).

The new sequence starts with those tokens already in its output, as a sequence preempted
with recompute does: the scheduler prefills prompt and outputs together, and max_tokens,
min_tokens, penalties and stop checks count the whole answer. The tokens go through the
stop checks and the detokenizer one by one, exactly as if this engine had sampled them, so
the text and the state it carries on from are the uninterrupted run's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pagedserve.engine.sampler import skip_draws
from pagedserve.engine.sequence import Sequence


@dataclass(frozen=True)
class Resume:
    output_token_ids: list[int]  # the answer's tokens so far
    sent_chars: int = 0  # characters of their text the client has already been sent


def replay(
    seq: Sequence,
    resume: Resume,
    check_stop: Callable[[Sequence, int], None],
    take_text: Callable[[int, bool], str | None],
    vocab_size: int,
    max_model_len: int,
) -> None:
    """Take `resume`'s tokens into a fresh `seq` and advance its generator past them; raise
    ValueError, saying why, when they cannot be resumed. `check_stop(seq, token)` is the
    engine core's (EOS, stop tokens, length); `take_text(token, ended)` the output
    processor's: it detokenizes the token and returns the stop string it completes."""
    params, ids = seq.params, resume.output_token_ids
    if params.best_of > 1 or params.use_beam_search:
        raise ValueError("resume continues one sequence: it takes n=1, best_of=1, no beam search")
    if any(not 0 <= t < vocab_size for t in ids):
        raise ValueError(f"resume.output_token_ids must be token ids in [0, {vocab_size})")
    if params.max_tokens is not None and len(ids) >= params.max_tokens:
        raise ValueError(
            f"the {len(ids)} resumed tokens already reach max_tokens={params.max_tokens}; "
            "nothing is left to generate"
        )
    if seq.num_tokens + len(ids) >= max_model_len:
        raise ValueError(
            f"the prompt ({seq.num_tokens} tokens) and the {len(ids)} resumed tokens already "
            f"fill the context (max_model_len={max_model_len}); nothing is left to generate"
        )
    for i, token in enumerate(ids):
        seq.token_ids.append(token)
        check_stop(seq, token)
        stop = take_text(token, seq.finish_reason == "stop")
        if stop is not None:
            seq.finish("stop", stop)
        if seq.is_finished:
            raise ValueError(
                f"the answer already ended at resumed token {i} (finish_reason "
                f"{seq.finish_reason!r}, stop {seq.stop_reason!r}); nothing is left to generate"
            )
    if seq.generator is not None:
        skip_draws(seq.generator, vocab_size, len(ids))
