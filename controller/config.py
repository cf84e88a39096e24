"""The controller's configuration: one dataclass, filled from `pagedserve controller` flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.controller.dispatch import check_policy_name
from pagedserve.protocol.control_token import check_control_token


@dataclass
class ControllerConfig:
    host: str = "127.0.0.1"
    port: int = 21001
    # least_load (default), round_robin or prefix_aware (controller/dispatch.py); FastChat's
    # names lottery and shortest_queue too.
    routing_policy: str = "least_load"
    # A worker whose heartbeats stop for this long is removed (3 x the worker's default 10 s).
    heartbeat_expiration: float = 30.0
    # Active health checks: GET {worker}/ready every interval (0 turns them off); a worker that
    # cannot be reached `failure_threshold` times in a row is removed, one that answers
    # "not ready" gets no new requests until it is ready again.
    health_check_interval: float = 5.0
    health_check_timeout: float = 2.0
    health_check_failure_threshold: int = 3
    # Shared registry for several controller replicas; None keeps the registry in memory.
    redis_url: str | None = None
    redis_prefix: str = "pagedserve:controller"
    # Read timeout when the controller proxies /worker_generate_stream to a worker.
    worker_api_timeout: float = 100.0
    # Seconds a client has to send a request's headers (then 408 and close: slow clients
    # cannot hold connections), and the largest request body (413 beyond, never read whole).
    header_timeout: float = 10.0
    # Its bodies are registrations, heartbeats and relayed generate requests (a gateway's 1 MiB
    # plus a resumed stream's token ids).
    max_body_bytes: int = 8 << 20
    # Shared control-plane token (protocol/control_token.py); None: every route open, as FastChat's.
    # Kept out of repr so that logging a config never shows it.
    control_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_policy_name(self.routing_policy)
        check_control_token(self.control_token)
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535; got {self.port}")
        if self.heartbeat_expiration <= 0:
            raise ValueError(
                f"heartbeat_expiration must be > 0 seconds; got {self.heartbeat_expiration}"
            )
        if self.health_check_interval < 0:
            raise ValueError(
                "health_check_interval must be >= 0 seconds (0 turns checks off); "
                f"got {self.health_check_interval}"
            )
        if self.health_check_timeout <= 0:
            raise ValueError(
                f"health_check_timeout must be > 0 seconds; got {self.health_check_timeout}"
            )
        if self.health_check_failure_threshold < 1:
            raise ValueError(
                "health_check_failure_threshold must be >= 1; "
                f"got {self.health_check_failure_threshold}"
            )
        if self.header_timeout <= 0:
            raise ValueError(f"header_timeout must be > 0 seconds; got {self.header_timeout}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1; got {self.max_body_bytes}")
        if self.worker_api_timeout <= 0:
            raise ValueError(
                f"worker_api_timeout must be > 0 seconds; got {self.worker_api_timeout}"
            )
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(
                f"redis_url must look like redis://HOST:PORT/DB; got {self.redis_url!r}"
            )
        if not self.redis_prefix:
            raise ValueError("redis_prefix must not be empty")

    @property
    def sweep_interval(self) -> float:
        """How often expired workers are looked for: a tenth of the expiration, at most 1 s."""
        return max(0.05, min(1.0, self.heartbeat_expiration / 10))
