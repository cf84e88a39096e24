"""Requests in: what a caller gives the engine -> an `EngineRequest` it can run, or a refusal.

`InputProcessor.process` runs every check that needs no engine state, once, in this order:
sampling params' type, tokenization (text, token ids, or a dict of either), an empty prompt,
token ids outside the vocabulary, THE context-length check (a prompt must leave one token to
generate), a prompt one step cannot hold without chunked prefill, and a best_of/beam width one
step cannot run. `render_chat` turns messages into prompt token ids with the model's chat
template. A refusal is an `InvalidRequestError` saying what to change; the engine is untouched.
What needs engine state (a request id in use, the seeded generator, replaying a resumed
answer) is the engine's (llm_engine.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.engine.chat_templates import ChatTemplate
    from pagedserve.engine.resume import Resume

PromptType = str | Seq[int] | dict


class InvalidRequestError(ValueError):
    """A request the engine refuses as given; nothing in the engine changed. `param` names
    the part of the request at fault when it is not the prompt; `code` is OpenAI's error code
    where one fits ("context_length_exceeded")."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class EngineRequest:
    """A request the input processor has accepted: what the engine core runs."""

    request_id: str
    prompt: str | None  # the prompt's text, when it came as text
    prompt_token_ids: list[int]
    params: SamplingParams
    resume: Resume | None = None
    arrival_time: float = field(default_factory=time.monotonic)


class InputProcessor:
    def __init__(
        self,
        tokenizer: Any,
        chat_template: ChatTemplate,
        *,
        max_model_len: int,
        vocab_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        resume: Resume | None = None,
    ) -> EngineRequest:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling params must be a SamplingParams")
        text, token_ids = self.tokenize(prompt)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        self._check_context_length(len(token_ids))
        budget = self.max_num_batched_tokens
        if not self.enable_chunked_prefill and len(token_ids) > budget:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens, more than max_num_batched_tokens="
                f"{budget} without chunked prefill"
            )
        width = params.best_of
        if width > self.max_num_seqs or width > budget:
            raise InvalidRequestError(
                f"best_of/beam width {width} exceeds what one step can run (max_num_seqs="
                f"{self.max_num_seqs}, max_num_batched_tokens={budget})"
            )
        return EngineRequest(request_id, text, token_ids, params, resume)

    def _check_context_length(self, num_tokens: int) -> None:
        limit = self.max_model_len
        if num_tokens >= limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"has {num_tokens} tokens, and one token must be left to generate: give at most "
                f"{limit - 1} (max_model_len={limit}).",
                code="context_length_exceeded",
            )

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(the prompt's text if it came as text, its token ids)."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt) if prompt else []
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _token_ids(prompt["prompt_token_ids"])
            return self.tokenize(prompt.get("prompt", ""))
        return None, _token_ids(prompt)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The prompt token ids of OpenAI-style messages ({"role", "content"}) as the chat
        template renders them; `chat_template_kwargs` go to a Jinja template's variables."""
        template = self.chat_template
        try:
            text = template.render(messages, add_generation_prompt, **(chat_template_kwargs or {}))
        except Exception as e:  # no template, or it refuses (roles out of order, ...)
            message = str(e)
            if "chat template" not in message:
                message = f"the chat template could not render these messages: {message}"
            raise InvalidRequestError(message, param="messages") from e
        return self.tokenizer.encode(text, add_special_tokens=template.add_special_tokens)


def _token_ids(ids: Any) -> list[int]:
    if (
        isinstance(ids, (str, bytes))
        or not isinstance(ids, Seq)
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
    ):
        raise InvalidRequestError(
            "a prompt is a string, a list of integer token ids, or a dict holding one"
        )
    return list(ids)
