"""The gateway's configuration: one dataclass, filled from `pagedserve gateway` flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.controller.dispatch import check_policy_name
from pagedserve.protocol.control_token import check_control_token

# The protocol refuses n > 16 for every server (protocol/openai.py).
PROTOCOL_MAX_N = 16


@dataclass
class GatewayConfig:
    controller_address: str = "http://127.0.0.1:21001"
    host: str = "127.0.0.1"
    port: int = 8000
    # JSON-lines key file (see api_gateway/auth.py); None: no keys, every request is served.
    api_keys_file: str | None = None
    # Shared per-key rate limits for several gateway replicas; None keeps them in memory.
    redis_url: str | None = None
    redis_prefix: str = "pagedserve:gateway"
    # Serve /metrics without a key even when keys are on.
    public_metrics: bool = False
    # Requests in flight at once, all keys together; beyond it: 503 at once, never a queue.
    max_concurrent_requests: int = 256
    # Request limits: body bytes (413), prompt tokens per prompt, max_tokens and n (400).
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None
    max_n: int = PROTOCOL_MAX_N
    # Seconds a client has to send a request's headers (then 408 and close).
    header_timeout: float = 10.0
    # Timeouts (seconds): connecting to a worker, from sending a request to its first streamed
    # byte, and the whole request (fail-overs and streaming included).
    connect_timeout: float = 5.0
    first_token_timeout: float = 60.0
    total_timeout: float = 600.0
    # Fail-over: further workers tried when one fails before the first byte, and the share of
    # recent requests that retries may add (plus a floor per second), so that a sick cluster
    # is not flooded with retries (a retry after a connection failed or lost, which left no
    # work behind, spends none: forwarding.py).
    max_retries: int = 2
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_second: float = 2.0
    # Circuit breaker: failures in a row after which a worker is skipped for `cooldown` s.
    breaker_threshold: int = 3
    breaker_cooldown: float = 10.0
    # The controller's view of workers is fetched this often (and at once on a miss or fault).
    routing_refresh_interval: float = 2.0
    controller_timeout: float = 3.0
    # Which worker gets a request: see controller/dispatch.py (the controller's policies).
    routing_policy: str = "least_load"
    # Shared control-plane token (protocol/control_token.py), presented on every call to the
    # controller and the workers; never an API key. None: none presented. Kept out of repr.
    control_token: str | None = field(default=None, repr=False)
    # Scale from zero: a request for a model with no worker asks this supervisor (its admin
    # API) to wake the model, and waits up to `cold_start_timeout` s for its first worker.
    supervisor_url: str | None = None
    cold_start_timeout: float = 180.0

    def __post_init__(self) -> None:
        check_control_token(self.control_token)
        if not self.controller_address.startswith(("http://", "https://")):
            raise ValueError(
                f"controller_address must be an http(s) URL; got {self.controller_address!r}"
            )
        self.controller_address = self.controller_address.rstrip("/")
        if self.supervisor_url is not None:
            if not self.supervisor_url.startswith(("http://", "https://")):
                raise ValueError(
                    f"supervisor_url must be an http(s) URL; got {self.supervisor_url!r}"
                )
            self.supervisor_url = self.supervisor_url.rstrip("/")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535; got {self.port}")
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(
                f"redis_url must look like redis://HOST:PORT/DB; got {self.redis_url!r}"
            )
        if not self.redis_prefix:
            raise ValueError("redis_prefix must not be empty")
        for name in ("max_concurrent_requests", "max_body_bytes", "breaker_threshold"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_tokens_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or unset for no limit); got {value}")
        if not 1 <= self.max_n <= PROTOCOL_MAX_N:
            raise ValueError(f"max_n must be in 1..{PROTOCOL_MAX_N}; got {self.max_n}")
        for name in (
            "connect_timeout",
            "first_token_timeout",
            "total_timeout",
            "breaker_cooldown",
            "routing_refresh_interval",
            "controller_timeout",
            "header_timeout",
            "cold_start_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds; got {getattr(self, name)}")
        check_policy_name(self.routing_policy)
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0; got {self.max_retries}")
        if not 0 <= self.retry_budget_ratio <= 1:
            raise ValueError(f"retry_budget_ratio must be in [0, 1]; got {self.retry_budget_ratio}")
        if self.retry_budget_min_per_second < 0:
            raise ValueError(
                f"retry_budget_min_per_second must be >= 0; got {self.retry_budget_min_per_second}"
            )
