"""A model worker's configuration: one dataclass, filled from `pagedserve worker` flags.

The engine's own settings stay in `EngineConfig` (its flags map onto its fields one to one),
held whole in `engine`; this adds what the worker process needs: names, addresses,
heartbeats, draining.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pagedserve.engine.config import EngineConfig
from pagedserve.protocol.control_token import check_control_token


@dataclass
class WorkerConfig:
    model_path: str
    # Names the model is served under; default: the model folder's name.
    model_names: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 21002
    # None: run alone, register with no controller (FastChat's --no-register).
    controller_address: str | None = "http://127.0.0.1:21001"
    # The URL the controller and clients use to reach this worker; default http://HOST:PORT.
    worker_address: str | None = None
    # The id it registers under; None: a random one. A supervisor names its replicas, so that
    # a restarted replica keeps its id.
    worker_id: str | None = None
    heartbeat_interval: float = 10.0
    # On SIGTERM: seconds to let requests in flight finish before they are aborted.
    drain_timeout: float = 30.0
    # --chat-template: a built-in (FastChat) template's name or a Jinja file; None: the
    # tokenizer's own template, else the built-in one the model's name matches.
    chat_template: str | None = None
    # Seconds a client has to send a request's headers (then 408 and close: slow clients
    # cannot hold connections), and the largest request body (413 beyond, never read whole).
    header_timeout: float = 10.0
    # Room for a gateway's 1 MiB body plus a resumed stream's token ids.
    max_body_bytes: int = 8 << 20
    # The engine's settings, whose model is model_path; None: EngineConfig's defaults.
    engine: EngineConfig | None = None
    # Shared control-plane token (protocol/control_token.py): required on the generate routes and
    # presented to the controller; None: every route open. Kept out of repr.
    control_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_control_token(self.control_token)
        self.model_path = str(self.model_path)
        if not self.model_path:
            raise ValueError("model_path must name a model folder or file")
        if not self.model_names:
            self.model_names = [Path(self.model_path.rstrip("/")).name]
        if any(not n.strip() for n in self.model_names):
            raise ValueError(f"model_names must not contain empty names; got {self.model_names}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535; got {self.port}")
        if self.worker_id is not None and not 0 < len(self.worker_id) <= 128:
            raise ValueError("worker_id must be 1 to 128 characters")
        if self.heartbeat_interval <= 0:
            raise ValueError(
                f"heartbeat_interval must be > 0 seconds; got {self.heartbeat_interval}"
            )
        if self.header_timeout <= 0:
            raise ValueError(f"header_timeout must be > 0 seconds; got {self.header_timeout}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1; got {self.max_body_bytes}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0 seconds; got {self.drain_timeout}")
        for name in ("controller_address", "worker_address"):
            value = getattr(self, name)
            if value is not None:
                if not value.startswith(("http://", "https://")):
                    raise ValueError(f"{name} must be an http(s) URL; got {value!r}")
                setattr(self, name, value.rstrip("/"))
        if self.worker_address is None:
            if self.host in ("0.0.0.0", "::", ""):
                raise ValueError(
                    f"host {self.host!r} listens on every interface; give --worker-address, the "
                    "URL at which the controller and clients reach this worker"
                )
            host = f"[{self.host}]" if ":" in self.host else self.host
            self.worker_address = f"http://{host}:{self.port}"
        if self.chat_template is not None and not str(self.chat_template).strip():
            raise ValueError("chat_template must name a built-in template or a file")
        if self.engine is None:
            self.engine = EngineConfig(model=self.model_path)
        elif str(self.engine.model) != self.model_path:
            raise ValueError(
                f"engine.model {self.engine.model!r} differs from model_path {self.model_path!r}; "
                "the worker serves model_path"
            )
