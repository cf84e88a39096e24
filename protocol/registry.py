"""Wire models of the worker <-> controller protocol (FastChat 0.2.36's, extended).

Both sides import this module: the controller to validate what workers send, pagedserve's
workers to build what they send, the gateway to read the controller's worker list. FastChat's
own workers and tools keep working because every FastChat field keeps its name, type and
meaning; pagedserve's additions are optional fields.

FastChat shapes kept here:
  POST /register_worker     {"worker_name": URL, "check_heart_beat": bool,
                             "worker_status": {"model_names", "speed", "queue_length"} | null,
                             "multimodal": bool}
  POST /receive_heart_beat  {"worker_name": URL, "queue_length": int}  ->  {"exist": bool}
  POST /list_models         -> {"models": [...]}
  POST /get_worker_address  {"model": str}  ->  {"address": URL or ""}
pagedserve's own: GET /workers (WorkersResponse), POST /workers/{id}/drain (DrainResponse).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pagedserve.protocol.fastchat import FastChatModel, WorkerState, WorkerStatus

WorkerKind = Literal["pagedserve", "fastchat"]


def _check_address(value: str) -> str:
    value = value.strip().rstrip("/")
    if not value.startswith(("http://", "https://")) or len(value) <= len("http://"):
        raise ValueError(
            f"worker_name must be the worker's base URL, such as http://127.0.0.1:21002; got {value!r}"
        )
    return value


class RegisterWorkerRequest(FastChatModel):
    worker_name: str
    check_heart_beat: bool = True
    worker_status: WorkerStatus | None = None
    multimodal: bool = False

    _addr = field_validator("worker_name")(_check_address)


class RegisterWorkerResponse(FastChatModel):
    registered: bool
    worker_id: str


class HeartbeatRequest(FastChatModel):
    """FastChat's heartbeat ({"worker_name", "queue_length"}) plus pagedserve's load report."""

    worker_name: str
    queue_length: int = Field(ge=0)
    worker_id: str | None = Field(default=None, min_length=1, max_length=128)
    running: int | None = Field(default=None, ge=0)
    waiting: int | None = Field(default=None, ge=0)
    kv_usage: float | None = Field(default=None, ge=0.0, le=1.0)
    state: WorkerState | None = None

    _addr = field_validator("worker_name")(_check_address)


class HeartbeatResponse(FastChatModel):
    exist: bool


class UnregisterWorkerRequest(FastChatModel):
    worker_name: str

    _addr = field_validator("worker_name")(_check_address)


class ModelRequest(FastChatModel):
    """Body of /get_worker_address (and the `model` field of generate params)."""

    model: str = Field(min_length=1)
    # pagedserve additions: what prefix-aware routing and sticky sessions go by.
    prompt: str | None = None
    session_id: str | None = Field(default=None, min_length=1, max_length=256)


class ListModelsResponse(FastChatModel):
    models: list[str]


class WorkerAddressResponse(FastChatModel):
    address: str
    # pagedserve addition, present when address is "": why no worker was found.
    error_code: int | None = None
    text: str | None = None


class WorkerInfo(FastChatModel):
    """One registry entry: what the stores persist and what GET /workers lists."""

    worker_name: str
    worker_id: str
    model_names: list[str]
    kind: WorkerKind = "pagedserve"
    speed: int = 1
    queue_length: int = 0
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    state: WorkerState = "ready"  # as the worker reports it
    drain_requested: bool = False  # set through POST /workers/{id}/drain
    ready: bool = True  # result of the last active health check
    health_failures: int = 0  # consecutive failed health checks
    dispatched: int = 0  # requests sent its way since its last heartbeat
    check_heart_beat: bool = True
    multimodal: bool = False
    context_length: int | None = None
    registered_at: float = 0.0
    last_heart_beat: float = 0.0

    @property
    def accepting(self) -> bool:
        """May new requests be sent to it?"""
        return self.state == "ready" and not self.drain_requested and self.ready

    @property
    def effective_state(self) -> str:
        """ready, draining (worker or operator said so) or unready (failed its /ready check)."""
        if self.state == "draining" or self.drain_requested:
            return "draining"
        return "ready" if self.ready else "unready"


class WorkerView(WorkerInfo):
    """GET /workers entry: the registry entry plus derived fields."""

    status: str = "ready"  # effective_state: ready | draining | unready
    seconds_since_heart_beat: float = 0.0


class WorkersResponse(FastChatModel):
    workers: list[WorkerView]


class DrainResponse(FastChatModel):
    worker_id: str
    worker_name: str
    status: str
