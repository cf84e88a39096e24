"""`pagedserve serve --config stack.yaml`: what the stack file may say, checked with pydantic.

A file describes the controller, the gateway, the arena, the supervisor's admin API, where
workers run (local processes or a Ray cluster), and per model its path, names, replicas,
engine settings (any `EngineConfig` field), tensor-parallel size and autoscaling. A mistake is
reported with the file, the line and the field (`ConfigError`), before anything starts.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from pagedserve.engine.config import EngineConfig

ENGINE_FIELDS = {f.name for f in fields(EngineConfig)} - {"model", "tensor_parallel_size"}
_ENGINE = TypeAdapter(EngineConfig)
RoutingPolicy = Literal["least_load", "round_robin", "prefix_aware"]


class ConfigError(ValueError):
    """A stack file that cannot be served; the message names the file, line and field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a no-op


class ControllerSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(21001, ge=1, le=65535)
    redis_url: str | None = None
    routing_policy: RoutingPolicy = "least_load"


class GatewaySection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: Path | None = None  # a JSONL file of keys; None: no keys (local use)
    redis_url: str | None = None
    routing_policy: RoutingPolicy = "least_load"
    # How long a request for a model scaled to zero waits for its first worker.
    cold_start_timeout: float = Field(180.0, gt=0)


class ArenaSection(_Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=1, le=65535)
    db: Path = Path("arena.db")
    max_tokens: int = Field(256, ge=1)


class AdminSection(_Section):
    """The supervisor's admin API, which `pagedserve workers ...` talks to."""

    host: str = "127.0.0.1"
    port: int = Field(21000, ge=1, le=65535)


class RaySection(_Section):
    """Where workers run when not as local processes: a cluster started with `ray start`."""

    address: str  # e.g. 127.0.0.1:6379
    cpus_per_worker: float = Field(1.0, gt=0)  # per rank, on CPU nodes
    gpus_per_rank: float = Field(
        1.0, ge=0
    )  # per rank, on GPU nodes (when the model's device is cuda)
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"


class AutoscaleSection(_Section):
    """Replicas follow load between the bounds: up when the queue per replica, the KV-cache
    use or the time to first token stays over its target for `up_after` seconds, down when all
    stay under half their target for `down_after` seconds; `cooldown` seconds between moves."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(ge=1)
    target_queue: float = Field(4.0, gt=0)  # requests waiting or running per replica
    target_kv_usage: float = Field(0.8, gt=0, le=1)
    target_ttft: float | None = Field(None, gt=0)  # seconds; None: not a signal
    up_after: float = Field(5.0, ge=0)
    down_after: float = Field(60.0, ge=0)
    cooldown: float = Field(15.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleSection:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )
        return self


class ModelSection(_Section):
    name: str = Field(min_length=1)
    model_path: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)  # more names it is served under
    replicas: int = Field(1, ge=0)
    tensor_parallel_size: int = Field(1, ge=1)
    chat_template: str | None = None
    engine: dict[str, Any] = Field(default_factory=dict)  # EngineConfig fields
    autoscale: AutoscaleSection | None = None

    @field_validator("model_path")
    @classmethod
    def _exists(cls, path: str) -> str:
        if not Path(path).expanduser().exists():
            raise ValueError(f"no model at {path!r} (a Hugging Face folder or a GGUF file)")
        return str(Path(path).expanduser())

    @field_validator("engine")
    @classmethod
    def _engine_fields(cls, engine: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(engine) - ENGINE_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown engine setting(s) {', '.join(unknown)}; known: {', '.join(sorted(ENGINE_FIELDS))}"
            )
        # The dataclass's types and its own checks; but whether CUDA is there is a question for
        # the machine the worker lands on, not this one (a Ray head may have no GPU).
        here = {**engine, "device": "auto"} if engine.get("device") == "cuda" else engine
        try:
            _ENGINE.validate_python({"model": "-", **here})
        except ValidationError as e:
            raise ValueError(
                "; ".join(
                    f"{_field(err['loc'])}: {_message(err)}".lstrip(": ") for err in e.errors()
                )
            ) from None
        return engine

    @model_validator(mode="after")
    def _replicas_in_bounds(self) -> ModelSection:
        if self.autoscale is not None:
            lo, hi = self.autoscale.min_replicas, self.autoscale.max_replicas
            self.replicas = min(max(self.replicas, lo), hi)
        return self

    @property
    def names(self) -> list[str]:
        return [self.name, *self.aliases]

    @property
    def max_replicas(self) -> int | None:
        return None if self.autoscale is None else self.autoscale.max_replicas

    @property
    def min_replicas(self) -> int:
        return 0 if self.autoscale is None else self.autoscale.min_replicas


class StackConfig(_Section):
    controller: ControllerSection = Field(default_factory=ControllerSection)
    gateway: GatewaySection = Field(default_factory=GatewaySection)
    arena: ArenaSection = Field(default_factory=ArenaSection)
    admin: AdminSection = Field(default_factory=AdminSection)
    ray: RaySection | None = None
    # One shared secret for the control plane; `$PAGEDSERVE_CONTROL_TOKEN` when not set here.
    control_token: str | None = Field(None, min_length=16)
    log_dir: Path = Path("logs")
    # Local workers take ports from here up, skipping those in use.
    worker_base_port: int = Field(21100, ge=1, le=65535)
    cpu_threads_per_worker: int | None = Field(None, ge=1)
    models: list[ModelSection] = Field(default_factory=list)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSection]) -> list[ModelSection]:
        seen: set[str] = set()
        for m in models:
            for name in m.names:
                if name in seen:
                    raise ValueError(f"model name {name!r} is used twice")
                seen.add(name)
        return models

    @model_validator(mode="after")
    def _token_where_exposed(self) -> StackConfig:
        if self.control_token is None:
            self.control_token = os.environ.get("PAGEDSERVE_CONTROL_TOKEN") or None
        if not _loopback(self.admin.host) and self.control_token is None:
            raise ValueError(
                f"the admin API binds {self.admin.host}, beyond this machine: set control_token "
                "(or $PAGEDSERVE_CONTROL_TOKEN) so that only its holders can scale and stop workers"
            )
        return self

    def model(self, name: str) -> ModelSection | None:
        return next((m for m in self.models if name in m.names), None)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_stack_config(path: Path) -> StackConfig:
    """The stack file at `path`, checked; ConfigError names the line and field of a mistake."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the file must be a mapping (controller:, models:, ...)")
    try:
        return StackConfig.model_validate(data)
    except ValidationError as e:
        root = yaml.compose(text)
        lines = [
            f"{path}:{_line(root, err['loc'])}: {_field(err['loc'])}: {_message(err)}"
            for err in e.errors()
        ]
        raise ConfigError("\n".join(lines)) from None


def _field(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(top level)"


def _message(err: dict) -> str:
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def _line(node: yaml.Node | None, loc: tuple) -> int:
    """The line of the deepest node along `loc` that the file has (a missing field: its parent)."""
    line = 1 if node is None else node.start_mark.line + 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            child = node.value[part] if part < len(node.value) else None
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line
