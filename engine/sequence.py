"""Sequences and the groups they form: one request, its prompt, and the continuations that
share its KV blocks (parallel samples, best_of candidates, beams).

A sequence is the engine core's plain record of token ids and where they stand; their text,
logprobs and what the caller has been sent are the output processor's."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from pagedserve.engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or token that ended it
    generator: torch.Generator | None = None
    num_prompt_tokens: int = field(init=False)
    cumulative_logprob: float = 0.0
    first_token_time: float | None = None
    fan_out: int = 1  # samples to draw at the next sampling step (best_of for a fresh prompt)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def fork(self) -> Sequence:
        """A copy that continues from here; the KV cache manager shares the blocks."""
        child = Sequence(
            self.request_id, list(self.token_ids), self.params,
            arrival_time=self.arrival_time, status=self.status,
            num_computed_tokens=self.num_computed_tokens, generator=self.generator,
            cumulative_logprob=self.cumulative_logprob, first_token_time=self.first_token_time,
        )  # fmt: skip
        child.num_prompt_tokens = self.num_prompt_tokens
        return child


@dataclass
class SequenceGroup:
    """One request. It starts as one sequence; n > 1, best_of and beam search fork it once the
    prompt is computed, so every continuation shares the prompt's blocks."""

    seqs: list[Sequence]
    beam: object | None = None  # BeamSearch state for beam requests

    @property
    def request_id(self) -> str:
        return self.seqs[0].request_id

    @property
    def params(self) -> SamplingParams:
        return self.seqs[0].params

    @property
    def arrival_time(self) -> float:
        return self.seqs[0].arrival_time

    @property
    def unfinished(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def is_finished(self) -> bool:
        return not self.unfinished

    @property
    def forked(self) -> bool:
        """Whether the prompt has been sampled from (and, for best_of > 1, forked)."""
        return self.seqs[0].num_output_tokens > 0 or len(self.seqs) > 1
