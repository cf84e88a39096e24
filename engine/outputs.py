"""What the engine hands back, shaped like vLLM's outputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sequence's answer: all of it so far, or with RequestOutputKind.DELTA only what is
    new (text, token ids and logprobs entries since its previous output; a resumed answer's
    first delta starts where the client's copy ends)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: the chosen one and the top-k
    num_output_tokens: int = -1  # output tokens so far, a resumed answer's too (for usage)

    def __post_init__(self) -> None:
        if self.num_output_tokens < 0:
            self.num_output_tokens = len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    prompt_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks_total: int
    num_blocks_used: int
    block_size: int
    tokens_in_cache: int  # tokens whose K/V are held
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_blocks_shared: int = 0  # blocks referenced by more than one sequence
    num_blocks_cached: int = 0  # blocks whose content the prefix cache can hand out
    num_cow_copies: int = 0
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        queried = self.prefix_cache_queried_tokens
        return 0.0 if queried == 0 else self.prefix_cache_hit_tokens / queried

    @property
    def num_blocks_free(self) -> int:
        return self.num_blocks_total - self.num_blocks_used

    @property
    def kv_cache_usage(self) -> float:
        return self.num_blocks_used / self.num_blocks_total

    @property
    def kv_waste(self) -> float:
        """Fraction of allocated slots that hold no token (the PagedAttention paper's waste)."""
        slots = self.num_blocks_used * self.block_size
        return 0.0 if slots == 0 else 1.0 - self.tokens_in_cache / slots
