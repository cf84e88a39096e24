"""Sampling parameters with vLLM's names and meanings, validated on creation."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # the most top-k alternatives a request may ask for, per token
MAX_TOKEN_ID = 2**31 - 1  # token ids and top_k travel as int32/int64 tensors: bound them there


class RequestOutputKind(enum.Enum):
    """What each output of a request holds (vLLM's names). Beam search and best_of > n
    choose their answers at the end, so they give one output, when they finish, whatever
    the kind."""

    CUMULATIVE = "cumulative"  # the whole answer so far
    DELTA = "delta"  # only what is new since the request's previous output
    FINAL_ONLY = "final_only"  # one output, the whole answer, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1  # sequences returned
    best_of: int | None = None  # sequences generated (the n with the best cumulative logprob win)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0  # EOS and stop_token_ids are banned until then (with ignore_eos too)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    use_beam_search: bool = False  # beam width = best_of (or n)
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as in transformers
    logprobs: int | None = None  # top-k alternatives per generated token (0: the chosen only)
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_counts()
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not -1 <= self.top_k <= MAX_TOKEN_ID:
            raise ValueError(
                f"top_k must be -1 or 0 (off) or a positive number, got {self.top_k} "
                f"(at most {MAX_TOKEN_ID})"
            )
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        self.stop_strings = stops
        if self.stop_token_ids is not None and any(
            not isinstance(t, int) or not 0 <= t <= MAX_TOKEN_ID for t in self.stop_token_ids
        ):
            raise ValueError(
                f"stop_token_ids must be a list of non-negative token ids (at most {MAX_TOKEN_ID})"
            )
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._check_penalties()
        self._check_beam_search()
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            kinds = ", ".join(k.value for k in RequestOutputKind)
            raise ValueError(
                f"output_kind must be one of {kinds}, got {self.output_kind!r}"
            ) from None

    def _check_counts(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.best_of is None:
            self.best_of = self.n
        if not isinstance(self.best_of, int) or self.best_of < 1:
            raise ValueError(f"best_of must be at least 1, got {self.best_of}")
        if self.n > self.best_of:
            raise ValueError(f"n ({self.n}) must not exceed best_of ({self.best_of})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not 0.0 < self.repetition_penalty <= 2.0 or math.isnan(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        bias = self.logit_bias or {}
        if any(
            not isinstance(t, int) or not 0 <= t <= MAX_TOKEN_ID or not -100 <= b <= 100
            for t, b in bias.items()
        ):
            raise ValueError("logit_bias maps token ids (>= 0) to biases in [-100, 100]")
        self.logit_bias = {int(t): float(b) for t, b in bias.items()}

    def _check_beam_search(self) -> None:
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(
                f"early_stopping must be True, False or 'never', got {self.early_stopping!r}"
            )
        if not self.use_beam_search:
            return
        if self.temperature != 0.0:
            raise ValueError("beam search is deterministic: set temperature to 0")
        if self.top_p < 1.0 or self.top_k > 0 or self.min_p > 0:
            raise ValueError("beam search takes no top_p, top_k or min_p")
        if self.best_of < 2:
            raise ValueError("beam search needs a beam width (best_of) of at least 2")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def beam_width(self) -> int:
        return self.best_of if self.use_beam_search else 1

    @property
    def needs_penalties(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
            or self.logit_bias
        )  # fmt: skip
