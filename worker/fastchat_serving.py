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

from pagedserve.controller.protocol import (
    ConvTemplate,
    ErrorCode,
    GenerateFrame,
    GenerateParams,
    Usage,
)
from pagedserve.worker.requests import EngineRequests, RequestError, RequestStream

# FastChat's SeparatorStyle numbers (fastchat/conversation.py)
_ADD_COLON_SINGLE, _CHATML = 1, 9


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


class FastChatServing:
    def __init__(self, engine: Any, requests: EngineRequests, model_names: list[str]) -> None:
        self.engine = engine
        self.requests = requests
        self.model_names = model_names
        self.conv = conv_template_for(engine.tokenizer)

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
        prompt_ids, sampling = self._convert(params)
        stream = await self.requests.start(prompt_ids, sampling, uuid.uuid4().hex, route)
        return self._frames(stream, params, len(prompt_ids))

    async def generate(self, params: GenerateParams, route: str) -> dict[str, Any]:
        frames = [f async for f in await self.generate_stream(params, route)]
        return json.loads(frames[-1][:-1])

    def _convert(self, params: GenerateParams) -> tuple[list[int], Any]:
        from pagedserve.engine import SamplingParams

        if params.model is not None and params.model not in self.model_names:
            raise RequestError(
                404,
                f"this worker serves {self.model_names}, not {params.model!r}",
                param="model",
                error_code=ErrorCode.INVALID_MODEL,
            )
        unsupported = params.unsupported()
        if unsupported:
            raise RequestError(
                400,
                "not supported by pagedserve's engine yet: " + ", ".join(unsupported),
                param=unsupported[0],
            )
        prompt_ids = self.engine.tokenizer.encode(params.prompt)
        if len(prompt_ids) >= self.engine.max_model_len:
            raise RequestError(
                400,
                f"This model's maximum context length is {self.engine.max_model_len} tokens. "
                f"However, your prompt has {len(prompt_ids)} tokens.",
                param="prompt",
                error_code=ErrorCode.CONTEXT_OVERFLOW,
            )
        # FastChat's vLLM worker: near-zero temperature is greedy, top_p is kept above 0.
        greedy = params.temperature <= 1e-5
        try:
            sampling = SamplingParams(
                temperature=0.0 if greedy else params.temperature,
                top_p=1.0 if greedy else max(params.top_p, 1e-5),
                top_k=-1 if params.top_k is None else params.top_k,
                max_tokens=params.max_new_tokens,
                stop=params.stop or None,
                stop_token_ids=params.stop_token_ids,
                seed=params.seed,
            )
        except ValueError as e:
            raise RequestError(400, str(e)) from e
        return prompt_ids, sampling

    async def _frames(
        self, stream: RequestStream, params: GenerateParams, n_prompt: int
    ) -> AsyncIterator[bytes]:
        sent = None
        try:
            async for out in stream:
                c = out.outputs[0]
                text = params.prompt + c.text if params.echo else c.text
                if text == sent and not out.finished:
                    continue
                sent = text
                body = GenerateFrame(
                    text=text,
                    usage=Usage(
                        prompt_tokens=n_prompt,
                        completion_tokens=len(c.token_ids),
                        total_tokens=n_prompt + len(c.token_ids),
                    ),
                ).model_dump()
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
