"""OpenAI API wire models: requests, responses, stream chunks and errors.

One module for every server that speaks OpenAI's API (the worker's own /v1 routes and the
gateway), so both accept and return exactly the same shapes. Requests validate ranges here
(temperature, top_p, n, ...); what the engine cannot do yet is refused by the serving code
with a 400 that says so, never silently ignored.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

# The gateway names each request (the client's id when it is sane) and sends it to the worker.
REQUEST_ID_HEADER = "X-Request-Id"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def completion_id(prefix: str, request_id: str | None) -> str:
    """`<prefix>-<the gateway's request id>` when there is a sane one, so that a stream
    resumed on another worker keeps its id; a random one otherwise."""
    if request_id and SANE_REQUEST_ID.fullmatch(request_id):
        return f"{prefix}-{request_id}"
    return random_id(prefix)


class OpenAIModel(BaseModel):
    # Clients send fields this server does not model (new OpenAI parameters): ignore them.
    model_config = ConfigDict(extra="ignore")


class WithTokenIds(OpenAIModel):
    """A response part that may carry pagedserve's token ids (`return_token_ids`): they are
    left out of the JSON when not asked for, never sent as null."""

    _omit_when_none: ClassVar[tuple[str, ...]] = ("token_ids", "prompt_token_ids")

    @model_serializer(mode="wrap")
    def _omit_absent_token_ids(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in self._omit_when_none:
                if data.get(name, 0) is None:
                    del data[name]
        return data


# -- errors --------------------------------------------------------------------------------------


class ErrorDetail(OpenAIModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    """{"error": {"message", "type", "param", "code"}}, as OpenAI sends it."""

    error: ErrorDetail


# -- models --------------------------------------------------------------------------------------


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# -- shared pieces -------------------------------------------------------------------------------


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamOptions(OpenAIModel):
    include_usage: bool = False


Stop = str | list[str] | None
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class ResumeFrom(OpenAIModel):
    """pagedserve's extension: serve this request as if this worker had already generated
    `output_token_ids` for its one choice and streamed the first `sent_chars` characters
    (Python str length) of their text. The gateway sends it to continue a stream whose
    worker died; the answer comes out as the uninterrupted one would have."""

    output_token_ids: list[TokenId]
    sent_chars: int = Field(default=0, ge=0)


class SamplingFields(OpenAIModel):
    """Sampling parameters common to both endpoints (OpenAI's, plus vLLM's extras)."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    min_tokens: int = Field(default=0, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    best_of: int | None = Field(default=None, ge=1)
    use_beam_search: bool = False
    # pagedserve's extensions, for a stream that survives its worker
    return_token_ids: bool = False  # token ids on each choice, the prompt's on the first chunk
    resume: ResumeFrom | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: Stop) -> Stop:
        if isinstance(stop, list) and any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        if stop == "":
            raise ValueError("a stop string must not be empty")
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and any(t < 0 for t in ids):
            raise ValueError("stop_token_ids must be non-negative token ids")
        return ids

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


# -- /v1/completions -----------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and (not prompt or any(p == [] for p in prompt)):
            raise ValueError("prompt must not be empty")
        return prompt


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(WithTokenIds):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(WithTokenIds):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = None


class CompletionResponseStreamChoice(WithTokenIds):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    token_ids: list[int] | None = None


class CompletionStreamResponse(WithTokenIds):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None


# -- /v1/chat/completions ------------------------------------------------------------------------


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ImageURL(OpenAIModel):
    url: str
    detail: str | None = None


class ImageContentPart(OpenAIModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = TextContentPart | ImageContentPart


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text; images are refused by the serving code before this is used."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextContentPart))

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(
            isinstance(p, ImageContentPart) for p in self.content
        )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    # vLLM's extras for the chat template
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIModel):
    content: list[ChatCompletionTokenLogprob] | None = None


class ChatCompletionResponseChoice(WithTokenIds):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(WithTokenIds):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = None


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionResponseStreamChoice(WithTokenIds):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    token_ids: list[int] | None = None


class ChatCompletionStreamResponse(WithTokenIds):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None
