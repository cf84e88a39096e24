"""Wire models of the worker <-> controller protocol (FastChat 0.2.36's, extended).

Both sides import this module: the controller to validate what workers send, pagedserve's
workers to build what they send. FastChat's own workers and tools keep working because every
FastChat field keeps its name, type and meaning; pagedserve's additions are optional fields.

FastChat shapes kept here:
  POST /register_worker     {"worker_name": URL, "check_heart_beat": bool,
                             "worker_status": {"model_names", "speed", "queue_length"} | null,
                             "multimodal": bool}
  POST /receive_heart_beat  {"worker_name": URL, "queue_length": int}  ->  {"exist": bool}
  POST /list_models         -> {"models": [...]}
  POST /get_worker_address  {"model": str}  ->  {"address": URL or ""}
  POST /worker_generate_stream  params  ->  JSON objects each followed by a NUL byte
  errors                    {"text": str, "error_code": int}
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

WorkerState = Literal["ready", "draining"]
WorkerKind = Literal["pagedserve", "fastchat"]


class ErrorCode(IntEnum):
    """FastChat's error codes (fastchat/constants.py), same numbers."""

    VALIDATION_TYPE_ERROR = 40001
    INVALID_AUTH_KEY = 40101
    INCORRECT_AUTH_KEY = 40102
    NO_PERMISSION = 40103
    INVALID_MODEL = 40301
    PARAM_OUT_OF_RANGE = 40302
    CONTEXT_OVERFLOW = 40303
    RATE_LIMIT = 42901
    QUOTA_EXCEEDED = 42902
    ENGINE_OVERLOADED = 42903
    INTERNAL_ERROR = 50001
    CUDA_OUT_OF_MEMORY = 50002
    GRADIO_REQUEST_ERROR = 50003
    GRADIO_STREAM_UNKNOWN_ERROR = 50004
    CONTROLLER_NO_WORKER = 50005
    CONTROLLER_WORKER_TIMEOUT = 50006


class _Wire(BaseModel):
    # FastChat clients send fields we do not know (and future ones): ignore them.
    model_config = ConfigDict(extra="ignore")


def _check_address(value: str) -> str:
    value = value.strip().rstrip("/")
    if not value.startswith(("http://", "https://")) or len(value) <= len("http://"):
        raise ValueError(
            f"worker_name must be the worker's base URL, such as http://127.0.0.1:21002; got {value!r}"
        )
    return value


def default_worker_id(worker_name: str) -> str:
    """A stable id for a worker that did not send one (FastChat workers): from its address."""
    return hashlib.sha1(worker_name.encode()).hexdigest()[:12]


class ErrorBody(_Wire):
    """FastChat's error shape, used by every FastChat-protocol route on a 4xx/5xx."""

    text: str
    error_code: int


class WorkerStatus(_Wire):
    """FastChat's `worker_status` (POST /worker_get_status), plus pagedserve's load fields."""

    model_names: list[str] = Field(min_length=1)
    speed: int = Field(default=1, ge=0)
    queue_length: int = Field(default=0, ge=0)
    # pagedserve additions (absent from FastChat workers)
    worker_id: str | None = Field(default=None, min_length=1, max_length=128)
    running: int = Field(default=0, ge=0)
    waiting: int = Field(default=0, ge=0)
    kv_usage: float = Field(default=0.0, ge=0.0, le=1.0)
    state: WorkerState = "ready"
    context_length: int | None = Field(default=None, ge=1)

    @field_validator("model_names")
    @classmethod
    def _names_not_blank(cls, names: list[str]) -> list[str]:
        if any(not n or not n.strip() for n in names):
            raise ValueError("model_names must not contain empty names")
        return names


class RegisterWorkerRequest(_Wire):
    worker_name: str
    check_heart_beat: bool = True
    worker_status: WorkerStatus | None = None
    multimodal: bool = False

    _addr = field_validator("worker_name")(_check_address)


class RegisterWorkerResponse(_Wire):
    registered: bool
    worker_id: str


class HeartbeatRequest(_Wire):
    """FastChat's heartbeat ({"worker_name", "queue_length"}) plus pagedserve's load report."""

    worker_name: str
    queue_length: int = Field(ge=0)
    worker_id: str | None = Field(default=None, min_length=1, max_length=128)
    running: int | None = Field(default=None, ge=0)
    waiting: int | None = Field(default=None, ge=0)
    kv_usage: float | None = Field(default=None, ge=0.0, le=1.0)
    state: WorkerState | None = None

    _addr = field_validator("worker_name")(_check_address)


class HeartbeatResponse(_Wire):
    exist: bool


class UnregisterWorkerRequest(_Wire):
    worker_name: str

    _addr = field_validator("worker_name")(_check_address)


class ModelRequest(_Wire):
    """Body of /get_worker_address (and the `model` field of generate params)."""

    model: str = Field(min_length=1)
    # pagedserve additions: what prefix-aware routing and sticky sessions go by.
    prompt: str | None = None
    session_id: str | None = Field(default=None, min_length=1, max_length=256)


class ListModelsResponse(_Wire):
    models: list[str]


class WorkerAddressResponse(_Wire):
    address: str
    # pagedserve addition, present when address is "": why no worker was found.
    error_code: int | None = None
    text: str | None = None


class WorkerInfo(_Wire):
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


class WorkersResponse(_Wire):
    workers: list[WorkerView]


class DrainResponse(_Wire):
    worker_id: str
    worker_name: str
    status: str


# -- the worker side: what /worker_generate_stream and friends take and return ------------------


class GenerateParams(_Wire):
    """Body of a worker's /worker_generate_stream and /worker_generate (FastChat's names and
    defaults). Parameters FastChat sends but the engine cannot honour yet are accepted only at
    their neutral values; the worker refuses anything else with a 400 that names them."""

    model: str | None = None
    prompt: str
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    top_k: int | None = Field(default=-1, ge=-1)
    max_new_tokens: int | None = Field(default=256, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    echo: bool = True
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0
    logprobs: int | None = None
    best_of: int | None = None
    use_beam_search: bool | None = False
    images: list[Any] | None = None

    def unsupported(self) -> list[str]:
        """Names of the parameters set to something the engine cannot do."""
        bad = []
        if self.presence_penalty not in (None, 0.0):
            bad.append("presence_penalty")
        if self.frequency_penalty not in (None, 0.0):
            bad.append("frequency_penalty")
        if self.repetition_penalty not in (None, 1.0):
            bad.append("repetition_penalty")
        if self.logprobs not in (None, 0):
            bad.append("logprobs")
        if self.best_of not in (None, 1):
            bad.append("best_of")
        if self.use_beam_search:
            bad.append("use_beam_search")
        if self.images:
            bad.append("images")
        return bad


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateFrame(_Wire):
    """One message of /worker_generate_stream (each followed by a NUL byte), and the body of
    /worker_generate. `text` is cumulative (prompt included when echo is true)."""

    text: str
    error_code: int = 0
    usage: Usage | None = None
    finish_reason: str | None = None


class CountTokenRequest(_Wire):
    prompt: str


class ConvTemplate(_Wire):
    """FastChat's Conversation dataclass as /worker_get_conv_template sends it."""

    name: str
    system_template: str = "{system_message}"
    system_message: str = ""
    roles: list[str] = Field(default_factory=lambda: ["USER", "ASSISTANT"])
    messages: list[list[str]] = Field(default_factory=list)
    offset: int = 0
    sep_style: int = 1  # SeparatorStyle.ADD_COLON_SINGLE
    sep: str = "\n"
    sep2: str | None = None
    stop_str: str | list[str] | None = None
    stop_token_ids: list[int] | None = None


# -- the control token ----------------------------------------------------------------------------
# Opt-in (--control-token or $PAGEDSERVE_CONTROL_TOKEN): the controller and the workers then refuse
# control-plane calls that do not present it as `Authorization: Bearer TOKEN`, and every part
# presents it on its own calls. Without one, every route stays open, as FastChat's are.


def check_control_token(token: str | None) -> None:
    """ValueError unless `token` is None or fits in an HTTP header as one word."""
    if token is not None and not (
        token.isascii() and token.isprintable() and token.split() == [token]
    ):
        raise ValueError("control_token must be one word of printable ASCII (no spaces)")


def control_headers(token: str | None) -> dict[str, str]:
    """The header that presents the control token on a call; none without a token."""
    return {"authorization": f"Bearer {token}"} if token else {}


def check_bearer(authorization: bytes | None, token: str) -> bool:
    """Whether an `Authorization` header's value is `Bearer TOKEN` (compared in constant time)."""
    scheme, _, secret = (authorization or b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(secret.strip(), token.encode())


Asgi = Callable[[dict, Callable, Callable], Awaitable[None]]


class ControlTokenGate:
    """ASGI middleware: an HTTP request to any path but `open_paths` must present `token`, else
    `refuse(scope)` answers it (a 401 in the route family's error format) before anything
    reads its body."""

    def __init__(
        self, app: Asgi, token: str, open_paths: frozenset[str], refuse: Callable[[dict], Asgi]
    ) -> None:
        self.app = app
        self.token = token
        self.open_paths = open_paths
        self.refuse = refuse

    def allows(self, scope: dict) -> bool:
        if scope["path"] in self.open_paths:
            return True
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        return check_bearer(header, self.token)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or self.allows(scope):
            await self.app(scope, receive, send)
        else:
            await self.refuse(scope)(scope, receive, send)
