"""The arena's configuration: one dataclass, filled from `pagedserve ui` flags."""

from __future__ import annotations

from dataclasses import dataclass, field

# Shown after a vote reveals the names, and on the leaderboard. `--model-descriptions`
# adds to or overrides these.
DEFAULT_DESCRIPTIONS = {
    "smollm2-135m-instruct": (
        "SmolLM2-135M-Instruct by Hugging Face: a real 135M-parameter chat model (Q4_1 GGUF)"
    ),
    "tiny-llama": "random weights, for speed tests: its answers are noise",
}


def parse_weights(text: str | None) -> dict[str, float]:
    """'a=2,b=0.5' -> {"a": 2.0, "b": 0.5}."""
    weights: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"model weights are name=weight pairs; got {item!r}")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"the weight of {name.strip()!r} is not a number: {value!r}") from None
    return weights


def parse_descriptions(text: str | None) -> dict[str, str]:
    """'a=first model;b=second, with commas' -> {"a": ..., "b": ...} (';' separates)."""
    out: dict[str, str] = {}
    for item in (text or "").split(";"):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"model descriptions are name=text pairs; got {item!r}")
        out[name.strip()] = value.strip()
    return out


@dataclass
class ArenaConfig:
    gateway_url: str
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    # Votes and logs: SQLite at db_path unless redis_url is given.
    db_path: str = "arena.db"
    redis_url: str | None = None
    redis_prefix: str = "pagedserve:arena"
    # Battle sampling weights by model name; models not named weigh 1, weight 0 leaves a model
    # out of anonymous battles (it can still be picked by name).
    model_weights: dict[str, float] = field(default_factory=dict)
    model_descriptions: dict[str, str] = field(default_factory=dict)
    # Offer these models instead of the gateway's /v1/models list.
    models: list[str] = field(default_factory=list)
    # Sampling of the arena's answers (direct chat has its own sliders).
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    max_prompt_chars: int = 4000
    max_turns: int = 10
    request_timeout: float = 120.0
    # How long a /v1/models answer is reused before asking again.
    models_ttl: float = 10.0
    # Leaderboard: bootstrap rounds, and the Bradley-Terry prior (rating points; 0: pure MLE).
    bootstrap_rounds: int = 100
    bt_prior_sd: float = 400.0
    # Concurrent streaming events across all sessions.
    concurrency: int = 16
    seed: int | None = None
    # Seconds a client has to send a request's headers (then 408 and close: slow clients
    # cannot hold connections), and the largest request body (413 beyond, never read whole).
    header_timeout: float = 10.0
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not self.gateway_url.startswith(("http://", "https://")):
            raise ValueError(f"gateway_url must be an http(s) URL; got {self.gateway_url!r}")
        self.gateway_url = self.gateway_url.rstrip("/")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535; got {self.port}")
        bad = {k: w for k, w in self.model_weights.items() if not w >= 0}
        if bad:
            raise ValueError(f"model weights must be >= 0; got {bad}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2]; got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.header_timeout <= 0:
            raise ValueError(f"header_timeout must be > 0 seconds; got {self.header_timeout}")
        for name in (
            "max_tokens",
            "max_prompt_chars",
            "max_turns",
            "concurrency",
            "max_body_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.bootstrap_rounds < 1:
            raise ValueError(f"bootstrap_rounds must be >= 1; got {self.bootstrap_rounds}")
        if self.bt_prior_sd < 0:
            raise ValueError(f"bt_prior_sd must be >= 0 (0: pure MLE); got {self.bt_prior_sd}")
        if self.request_timeout <= 0 or self.models_ttl < 0:
            raise ValueError("request_timeout must be > 0 and models_ttl >= 0")
        self.model_descriptions = {**DEFAULT_DESCRIPTIONS, **self.model_descriptions}

    def describe(self, model: str) -> str:
        return self.model_descriptions.get(model, "no description given")

    def weight(self, model: str) -> float:
        return self.model_weights.get(model, 1.0)
