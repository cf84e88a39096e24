"""FastChat's worker protocol served from the engine: /worker_generate_stream and friends.

Same JSON shapes and framing as FastChat 0.2.36's vLLM worker (fastchat/serve/vllm_worker.py):
each streamed message is a JSON object followed by a NUL byte, `text` is cumulative (with the
prompt in front when `echo` is true), and the finished message comes twice, first without a
finish_reason, so that FastChat's OpenAI server emits a separate closing chunk.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pagedserve.protocol.fastchat import (
    ConvTemplate,
    ErrorCode,
    GenerateFrame,
    GenerateParams,
    Usage,
)
from pagedserve.worker.engine_params import from_fastchat
from pagedserve.worker.logprobs import LogprobFormatter
from pagedserve.worker.requests import EngineRequests, RequestError, RequestStream

# FastChat's SeparatorStyle numbers (fastchat/conversation.py)
_ADD_COLON_SINGLE, _CHATML = 1, 9
_FASTCHAT_STYLES = {
    "add_colon_single": 1,
    "add_colon_two": 2,
    "no_colon_single": 4,
    "llama2": 7,
    "chatml": 9,
    "dolly": 11,
}


def frame(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode() + b"\0"


def conv_template_for(tokenizer: Any) -> ConvTemplate:
    """A FastChat conversation template that renders prompts as the model's own chat template
    does: ChatML when the tokenizer's template uses <|im_start|>, else FastChat's plain
    "USER: ... ASSISTANT:" layout."""
    template = getattr(tokenizer, "chat_template", None) or ""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "<|im_start|>" in template:
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        stop_ids = [im_end] if isinstance(im_end, int) and im_end >= 0 else []
        return ConvTemplate(
            name="chatml",
            system_template="<|im_start|>system\n{system_message}",
            roles=["<|im_start|>user", "<|im_start|>assistant"],
            sep_style=_CHATML,
            sep="<|im_end|>",
            stop_str="<|im_end|>",
            stop_token_ids=stop_ids + eos,
        )
    return ConvTemplate(name="pagedserve-plain", sep_style=_ADD_COLON_SINGLE, stop_token_ids=eos)


def conv_template_from(template: Any, tokenizer: Any) -> ConvTemplate:
    """The FastChat conversation template of a resolved chat template: a built-in (FastChat)
    format as itself, otherwise as `conv_template_for` approximates the tokenizer's."""
    fmt = getattr(template, "format", None)
    if fmt is None:
        return conv_template_for(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stop_ids = list(template.stop_token_ids) + [t for t in eos if t not in template.stop_token_ids]
    stop_str: list[str] | str | None = list(fmt.stop_str) or None
    if stop_str is not None and len(stop_str) == 1:
        stop_str = stop_str[0]
    return ConvTemplate(
        name=fmt.name,
        system_template=fmt.system_template,
        system_message=fmt.system_message,
        roles=list(fmt.roles),
        sep_style=_FASTCHAT_STYLES.get(fmt.style.value, _ADD_COLON_SINGLE),
        sep=fmt.sep,
        sep2=fmt.sep2,
        stop_str=stop_str,
        stop_token_ids=stop_ids,
    )


class FastChatServing:
    def __init__(self, engine: Any, requests: EngineRequests, model_names: list[str]) -> None:
        self.engine = engine
        self.requests = requests
        self.model_names = model_names
        self.conv = conv_template_from(engine.input_processor.chat_template, engine.tokenizer)
        self.logprobs = LogprobFormatter(engine.tokenizer)

    # -- small queries ----------------------------------------------------------------------

    def count_token(self, prompt: str) -> dict[str, int]:
        return {"count": len(self.engine.tokenizer.encode(prompt)), "error_code": 0}

    def conv_template(self) -> dict[str, Any]:
        return {"conv": self.conv.model_dump()}

    def model_details(self) -> dict[str, int]:
        return {"context_length": self.engine.max_model_len}

    # -- generation: validate -> convert -> stream or collect -> format -----------------------

    async def generate_stream(self, params: GenerateParams, route: str) -> AsyncIterator[bytes]:
        """Start the request (errors raise here, before any byte) and return its frames."""
        if params.model is not None and params.model not in self.model_names:
            raise RequestError(
                404,
                f"this worker serves {self.model_names}, not {params.model!r}",
                param="model",
                error_code=ErrorCode.INVALID_MODEL,
            )
        sampling = from_fastchat(params)
        stream = await self.requests.start(params.prompt, sampling, uuid.uuid4().hex, route)
        return self._frames(stream, params)

    async def generate(self, params: GenerateParams, route: str) -> dict[str, Any]:
        frames = [f async for f in await self.generate_stream(params, route)]
        return json.loads(frames[-1][:-1])

    async def _frames(self, stream: RequestStream, params: GenerateParams) -> AsyncIterator[bytes]:
        """FastChat's frames hold the whole answer so far: the engine's deltas added up."""
        n_prompt = len(stream.first.prompt_token_ids)
        texts = [params.prompt] if params.echo else []
        num_tokens = 0
        logprobs: dict[str, list[Any]] = {
            "text_offset": [],
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
        }
        offset = len(params.prompt) if params.echo else 0
        started = False
        try:
            async for out in stream:
                c = out.outputs[0]
                texts.append(c.text)
                num_tokens = c.num_output_tokens
                if params.logprobs is not None:
                    delta = self.logprobs.legacy(c, params.logprobs, offset)
                    for key, values in delta.model_dump().items():
                        logprobs[key] += values
                    offset += sum(len(t) for t in delta.tokens)
                if started and not c.text and not out.finished:
                    continue
                started = True
                text = "".join(texts)
                texts = [text]
                body = GenerateFrame(
                    text=text,
                    usage=Usage(
                        prompt_tokens=n_prompt,
                        completion_tokens=num_tokens,
                        total_tokens=n_prompt + num_tokens,
                    ),
                ).model_dump()
                if params.logprobs is not None:
                    body["logprobs"] = logprobs
                if out.finished:
                    yield frame(body)  # once without finish_reason, as FastChat's workers do
                    yield frame({**body, "finish_reason": c.finish_reason})
                else:
                    yield frame(body)
        except Exception as e:  # the engine failed mid-stream: say so in the stream
            yield frame(
                {"text": f"generation failed: {e}", "error_code": int(ErrorCode.INTERNAL_ERROR)}
            )
        finally:
            await stream.aclose()
