"""Wire models of FastChat's worker API (FastChat 0.2.36's, extended).

Both sides import this module: pagedserve's workers to validate what they are sent and to
answer in these shapes, their clients (the benchmarks, for one) to build requests. FastChat's own
tools keep working because every FastChat field keeps its name, type and meaning; pagedserve's
additions are optional fields. The controller's side of FastChat's protocol (registration,
heartbeats) is in `registry.py`, which builds on the base model and `WorkerStatus` here; the
error codes serve both.

FastChat shapes kept here:
  POST /worker_generate_stream    params  ->  JSON objects each followed by a NUL byte
  POST /worker_generate           params  ->  one such object
  POST /worker_get_status         -> {"model_names", "speed", "queue_length"}
  POST /count_token               {"prompt": str}
  POST /worker_get_conv_template  -> {"conv": {...}}
  errors                          {"text": str, "error_code": int}
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

WorkerState = Literal["ready", "draining"]


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


class FastChatModel(BaseModel):
    # FastChat clients send fields we do not know (and future ones): ignore them.
    model_config = ConfigDict(extra="ignore")


class ErrorBody(FastChatModel):
    """FastChat's error shape, used by every FastChat-protocol route on a 4xx/5xx."""

    text: str
    error_code: int


class WorkerStatus(FastChatModel):
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


# -- what /worker_generate_stream and friends take and return ---------------------------------


class GenerateParams(FastChatModel):
    """Body of a worker's /worker_generate_stream and /worker_generate (FastChat's names and
    defaults). The engine honours every one of them but `images`: a worker refuses images with
    a 400 that names them (see `unsupported`)."""

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
        """Names of the parameters set to something the engine cannot do: images (it takes
        text only)."""
        return ["images"] if self.images else []


class Usage(FastChatModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateFrame(FastChatModel):
    """One message of /worker_generate_stream (each followed by a NUL byte), and the body of
    /worker_generate. `text` is cumulative (prompt included when echo is true)."""

    text: str
    error_code: int = 0
    usage: Usage | None = None
    finish_reason: str | None = None


class CountTokenRequest(FastChatModel):
    prompt: str


class ConvTemplate(FastChatModel):
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
