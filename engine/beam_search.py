"""Beam search over paged sequences with transformers' semantics (`num_beams`,
`length_penalty`, `early_stopping`), so the same model gives the same beams in the same order.

Each step every live beam proposes its best continuations; the best `keep` candidates overall
are ranked; those ending in EOS (or at the length limit) among the top `width` become finished
hypotheses, and the best `width` others become the next beams. The engine forks a beam that is
continued more than once (its blocks shared, copy-on-write) and frees one that is not: no
sequence is ever copied or recomputed."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.engine.sampler import Sample
from pagedserve.engine.sequence import Sequence

_NEG = -1.0e9  # transformers' "never choose this" score


@dataclass
class Hypothesis:
    score: float  # cumulative logprob / generated length ** length_penalty
    finished: bool  # False for the placeholders that fill empty slots
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    eos: bool = False
    logprobs: list[dict[int, float]] | None = None  # per generated token, when asked for


@dataclass
class Candidate(Sample):
    """A continuation of `parent` by `token` (`top`: the parent's step distribution)."""

    score: float = field(kw_only=True)  # the beam's cumulative logprob plus this token's
    parent: Sequence = field(kw_only=True)


@dataclass
class BeamSearch:
    width: int
    prompt_len: int
    max_len: int  # prompt plus the most tokens that may be generated
    eos_token_ids: frozenset[int]
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    logprobs: int | None = None  # top-k alternatives to report per token (None: none)
    scores: dict[int, float] = field(default_factory=dict)  # live beam seq_id -> score
    # live beam seq_id -> its tokens' logprobs entries (when `logprobs` asks for them)
    token_logprobs: dict[int, list[dict[int, float]]] = field(default_factory=dict)
    hyps: list[Hypothesis] = field(init=False)
    improvable: bool = True
    done: bool = False

    def __post_init__(self) -> None:
        self.hyps = [Hypothesis(_NEG, False) for _ in range(self.width)]

    @property
    def keep(self) -> int:
        """Candidates ranked per step: enough that `width` survive even if some end."""
        return max(2, 1 + len(self.eos_token_ids)) * self.width

    def step(self, beams: list[Sequence], samples: dict[int, Sample]) -> list[Candidate]:
        """One step: `samples[seq_id].top` maps each beam's best next tokens to their logprobs.
        Returns the next beams' (parent, token) in rank order; updates the hypotheses."""
        cur_len = beams[0].num_tokens
        ranked = sorted(
            (
                Candidate(
                    tok,
                    lp,
                    samples[b.seq_id].top,
                    score=self.scores.get(b.seq_id, 0.0) + lp,
                    parent=b,
                )
                for b in beams
                for tok, lp in samples[b.seq_id].top.items()
            ),
            key=lambda c: -c.score,
        )[: self.keep]
        at_limit = cur_len + 1 >= self.max_len
        hits = [at_limit or c.token in self.eos_token_ids for c in ranked]

        order = sorted(
            range(len(ranked)), key=lambda i: -(ranked[i].score + (_NEG if hits[i] else 0.0))
        )
        running = [ranked[i] for i in order[: self.width]]
        running_scores = [ranked[i].score + (_NEG if hits[i] else 0.0) for i in order[: self.width]]

        self._add_finished(ranked, hits, cur_len)
        self.scores = {}  # filled by the engine once the beams have their sequences
        self._running_scores = running_scores
        self._update_improvable(running_scores[0], cur_len + 1)
        all_finished = all(h.finished for h in self.hyps)
        self.done = (
            not self.improvable or (all_finished and self.early_stopping is True) or all(hits)
        )
        return running

    def extend_logprobs(self, beams: list[tuple[int, Candidate]]) -> None:
        """The next beams (seq_id, and the candidate it continues with) take their parents'
        logprobs entries plus their new token's."""
        if self.logprobs is None:
            return
        old = self.token_logprobs
        self.token_logprobs = {
            seq_id: old.get(c.parent.seq_id, []) + [c.logprobs_entry(self.logprobs)]
            for seq_id, c in beams
        }

    def running_score(self, rank: int) -> float:
        return self._running_scores[rank]

    def _add_finished(self, ranked: list[Candidate], hits: list[bool], cur_len: int) -> None:
        blocked = (
            all(h.finished for h in self.hyps) and self.early_stopping is True
        ) or not self.improvable
        new = []
        for i, c in enumerate(ranked):
            if i < self.width and hits[i] and not blocked:
                score = c.score / ((cur_len + 1 - self.prompt_len) ** self.length_penalty)
                tokens = c.parent.token_ids + [c.token]
                logprobs = None
                if self.logprobs is not None:
                    logprobs = self.token_logprobs.get(c.parent.seq_id, []) + [
                        c.logprobs_entry(self.logprobs)
                    ]
                eos = c.token in self.eos_token_ids
                new.append(Hypothesis(score, True, tokens, c.score, eos, logprobs))
        merged = self.hyps + new
        # A stable sort keeps earlier entries first on ties, as transformers' topk does here.
        self.hyps = sorted(merged, key=lambda h: -h.score)[: self.width]

    def _update_improvable(self, best_running: float, cur_len: int) -> None:
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = self.max_len - self.prompt_len
        else:
            best_len = cur_len - self.prompt_len
        best_possible = best_running / best_len**self.length_penalty
        if all(h.finished for h in self.hyps):
            worst = min(h.score for h in self.hyps)
        else:  # an empty slot can always be filled
            worst = _NEG
        if not best_possible > worst:
            self.improvable = False

    def finish_live(self, beams: list[Sequence]) -> None:
        """End early (the cache is full): the live beams compete with the finished ones."""
        for beam in beams:
            generated = max(beam.num_tokens - self.prompt_len, 1)
            score = self.scores.get(beam.seq_id, 0.0)
            self.hyps.append(
                Hypothesis(
                    score / generated**self.length_penalty,
                    True,
                    list(beam.token_ids),
                    score,
                    logprobs=None
                    if self.logprobs is None
                    else list(self.token_logprobs.get(beam.seq_id, [])),
                )
            )
        self.hyps = sorted(self.hyps, key=lambda h: -h.score)[: self.width]
        self.done = True

    def best(self, n: int) -> list[Hypothesis]:
        return [h for h in self.hyps if h.finished][:n]
