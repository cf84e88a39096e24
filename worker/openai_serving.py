"""OpenAI's /v1/completions and /v1/chat/completions served from the engine.

Each request goes through the same steps: validate (model, parameters the engine cannot do),
convert (prompts to token ids, OpenAI parameters to SamplingParams, one engine request per
prompt and per choice), start (bad input fails here, before any byte), then stream
(Server-Sent Events ending with `data: [DONE]`) or collect, and format.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from pydantic import BaseModel

from pagedserve.api_gateway.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    UsageInfo,
    random_id,
)
from pagedserve.controller.protocol import ErrorCode
from pagedserve.worker.requests import EngineRequests, RequestError, RequestStream, merged

DONE = "data: [DONE]\n\n"


def sse(chunk: BaseModel | dict[str, Any]) -> str:
    if isinstance(chunk, BaseModel):
        return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
    return f"data: {json.dumps(chunk)}\n\n"


class _Job:
    """One engine request of an OpenAI request: which prompt, which choice."""

    def __init__(
        self, index: int, prompt_index: int, prompt_ids: list[int], prompt_text: str | None
    ):
        self.index = index
        self.prompt_index = prompt_index
        self.prompt_ids = prompt_ids
        self.prompt_text = prompt_text


class OpenAIServing:
    def __init__(self, engine: Any, requests: EngineRequests, model_names: list[str]) -> None:
        self.engine = engine
        self.requests = requests
        self.model_names = model_names
        # OpenAI's system_fingerprint: which backend configuration produced an answer.
        config = f"pagedserve:{model_names[0]}:{engine.max_model_len}"
        self.fingerprint = "fp_" + hashlib.sha256(config.encode()).hexdigest()[:10]

    def models(self) -> ModelList:
        root = self.model_names[0]
        return ModelList(
            data=[
                ModelCard(id=name, root=root, max_model_len=self.engine.max_model_len)
                for name in self.model_names
            ]
        )

    # -- /v1/completions --------------------------------------------------------------------

    async def completions(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        self._validate(req)
        if req.logprobs:
            raise RequestError(
                400, "logprobs are not supported by pagedserve's engine yet", param="logprobs"
            )
        if req.suffix:
            raise RequestError(400, "suffix is not supported", param="suffix")
        prompts = self._completion_prompts(req.prompt)
        jobs, streams = await self._start(req, prompts, "/v1/completions")
        request_id = random_id("cmpl")
        if req.stream:
            return self._stream_completion(req, request_id, jobs, streams)
        outputs = await self._collect(streams)
        choices = [
            CompletionResponseChoice(
                index=job.index,
                text=(job.prompt_text or "") + out.outputs[0].text
                if req.echo
                else out.outputs[0].text,
                finish_reason=out.outputs[0].finish_reason,
            )
            for job, out in zip(jobs, outputs, strict=True)
        ]
        return CompletionResponse(
            id=request_id,
            model=req.model,
            system_fingerprint=self.fingerprint,
            choices=choices,
            usage=self._usage(jobs, outputs),
        )

    async def _stream_completion(
        self,
        req: CompletionRequest,
        request_id: str,
        jobs: list[_Job],
        streams: list[RequestStream],
    ) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        created = int(time.time())

        def chunk(
            choices: list[CompletionResponseStreamChoice], usage: UsageInfo | None = None
        ) -> str:
            c = CompletionStreamResponse(
                id=request_id,
                object="text_completion",
                created=created,
                model=req.model,
                system_fingerprint=self.fingerprint,
                choices=choices,
            )
            if include_usage:
                c.usage = usage
            return sse(c)

        sent = [0] * len(jobs)
        last: list[Any] = [None] * len(jobs)
        async with aclosing(self._guarded(streams)) as items:
            async for i, out in items:
                if isinstance(out, str):  # an error event
                    yield out
                    continue
                c, job = out.outputs[0], jobs[i]
                echo = req.echo and last[i] is None
                delta = ((job.prompt_text or "") if echo else "") + c.text[sent[i] :]
                sent[i], last[i] = len(c.text), out
                if delta or out.finished:
                    finish = c.finish_reason if out.finished else None
                    yield chunk(
                        [
                            CompletionResponseStreamChoice(
                                index=job.index, text=delta, finish_reason=finish
                            )
                        ]
                    )
        if include_usage and all(o is not None for o in last):
            yield chunk([], self._usage(jobs, last))
        yield DONE

    # -- /v1/chat/completions ---------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        self._validate(req)
        if req.logprobs or req.top_logprobs:
            raise RequestError(
                400, "logprobs are not supported by pagedserve's engine yet", param="logprobs"
            )
        if req.tools:
            raise RequestError(400, "tools are not supported by this worker", param="tools")
        if any(m.has_images() for m in req.messages):
            raise RequestError(
                400, "this model takes text only; remove image_url parts", param="messages"
            )
        prompt_ids = self._chat_prompt(req)
        jobs, streams = await self._start(req, [(prompt_ids, None)], "/v1/chat/completions")
        request_id = random_id("chatcmpl")
        if req.stream:
            return self._stream_chat(req, request_id, jobs, streams)
        outputs = await self._collect(streams)
        choices = [
            ChatCompletionResponseChoice(
                index=job.index,
                message=AssistantMessage(content=out.outputs[0].text),
                finish_reason=out.outputs[0].finish_reason,
            )
            for job, out in zip(jobs, outputs, strict=True)
        ]
        return ChatCompletionResponse(
            id=request_id,
            model=req.model,
            system_fingerprint=self.fingerprint,
            choices=choices,
            usage=self._usage(jobs, outputs),
        )

    async def _stream_chat(
        self,
        req: ChatCompletionRequest,
        request_id: str,
        jobs: list[_Job],
        streams: list[RequestStream],
    ) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        created = int(time.time())

        def chunk(
            choices: list[ChatCompletionResponseStreamChoice], usage: UsageInfo | None = None
        ) -> str:
            c = ChatCompletionStreamResponse(
                id=request_id,
                object="chat.completion.chunk",
                created=created,
                model=req.model,
                system_fingerprint=self.fingerprint,
                choices=choices,
            )
            if include_usage:
                c.usage = usage
            return sse(c)

        for job in jobs:  # first, the role of every choice
            yield chunk(
                [
                    ChatCompletionResponseStreamChoice(
                        index=job.index,
                        delta=DeltaMessage(role="assistant", content=""),
                        finish_reason=None,
                    )
                ]
            )
        sent = [0] * len(jobs)
        last: list[Any] = [None] * len(jobs)
        async with aclosing(self._guarded(streams)) as items:
            async for i, out in items:
                if isinstance(out, str):
                    yield out
                    continue
                c, job = out.outputs[0], jobs[i]
                delta = c.text[sent[i] :]
                sent[i], last[i] = len(c.text), out
                if delta:
                    yield chunk(
                        [
                            ChatCompletionResponseStreamChoice(
                                index=job.index,
                                delta=DeltaMessage(content=delta),
                                finish_reason=None,
                            )
                        ]
                    )
                if out.finished:
                    yield chunk(
                        [
                            ChatCompletionResponseStreamChoice(
                                index=job.index, delta=DeltaMessage(), finish_reason=c.finish_reason
                            )
                        ]
                    )
        if include_usage and all(o is not None for o in last):
            yield chunk([], self._usage(jobs, last))
        yield DONE

    # -- the shared steps -------------------------------------------------------------------

    def _validate(self, req: SamplingFields) -> None:
        if req.model not in self.model_names:
            raise RequestError(
                404,
                f"The model {req.model!r} does not exist on this worker; it serves {self.model_names}",
                param="model",
                error_code=ErrorCode.INVALID_MODEL,
                openai_code="model_not_found",
            )
        for name, neutral in (
            ("presence_penalty", 0.0),
            ("frequency_penalty", 0.0),
            ("repetition_penalty", None),
        ):
            value = getattr(req, name)
            if (
                value is not None
                and value != neutral
                and not (name == "repetition_penalty" and value == 1.0)
            ):
                raise RequestError(
                    400, f"{name} is not supported by pagedserve's engine yet", param=name
                )
        if req.logit_bias:
            raise RequestError(
                400, "logit_bias is not supported by pagedserve's engine yet", param="logit_bias"
            )
        if req.best_of not in (None, 1):
            raise RequestError(
                400, "best_of > 1 is not supported by pagedserve's engine yet", param="best_of"
            )
        if req.use_beam_search:
            raise RequestError(
                400,
                "use_beam_search is not supported by pagedserve's engine yet",
                param="use_beam_search",
            )

    def _sampling_params(self, req: SamplingFields, max_tokens: int | None, choice: int) -> Any:
        from pagedserve.engine import SamplingParams

        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else max(req.top_p, 1e-5)
        try:
            return SamplingParams(
                temperature=temperature,
                top_p=1.0 if temperature == 0 else top_p,
                top_k=-1 if req.top_k is None else req.top_k,
                min_p=req.min_p or 0.0,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                stop=req.stop or None,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                # each choice of n gets its own seed, so that seeded choices still differ
                seed=None if req.seed is None else req.seed + choice,
                skip_special_tokens=req.skip_special_tokens,
            )
        except ValueError as e:
            raise RequestError(400, str(e)) from e

    def _completion_prompts(self, prompt: Any) -> list[tuple[list[int], str | None]]:
        tok = self.engine.tokenizer
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        out = []
        for item in items:
            if isinstance(item, str):
                out.append((tok.encode(item), item))
            else:
                out.append((list(item), tok.decode(item)))
        return out

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise RequestError(
                400,
                "this model has no chat template, so /v1/chat/completions cannot build its "
                "prompt; use /v1/completions with a prompt you format yourself",
                param="messages",
            )
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = tok.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
                **(req.chat_template_kwargs or {}),
            )
        except Exception as e:  # the template itself refuses (roles out of order, ...)
            raise RequestError(
                400, f"the chat template could not render these messages: {e}", param="messages"
            ) from e
        return tok.encode(text, add_special_tokens=False)

    async def _start(
        self, req: SamplingFields, prompts: list[tuple[list[int], str | None]], route: str
    ) -> tuple[list[_Job], list[RequestStream]]:
        limit = self.engine.max_model_len
        jobs: list[_Job] = []
        engine_jobs = []
        base = random_id("req")
        max_tokens = req.output_limit if isinstance(req, ChatCompletionRequest) else req.max_tokens
        for p, (ids, text) in enumerate(prompts):
            if len(ids) >= limit:
                raise RequestError(
                    400,
                    f"This model's maximum context length is {limit} tokens. However, your "
                    f"prompt has {len(ids)} tokens.",
                    param="messages" if route.endswith("chat/completions") else "prompt",
                    error_code=ErrorCode.CONTEXT_OVERFLOW,
                    openai_code="context_length_exceeded",
                )
            for choice in range(req.n):
                job = _Job(len(jobs), p, ids, text)
                jobs.append(job)
                params = self._sampling_params(req, max_tokens, choice)
                engine_jobs.append((ids, params, f"{base}-{job.index}"))
        streams = await self.requests.start_all(engine_jobs, route)
        return jobs, streams

    async def _collect(self, streams: list[RequestStream]) -> list[Any]:
        outputs: list[Any] = [None] * len(streams)
        async with aclosing(merged(streams)) as items:
            async for i, out in items:
                outputs[i] = out
        return outputs

    async def _guarded(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
        """The merged outputs; an engine failure mid-stream becomes one OpenAI error event."""
        try:
            async with aclosing(merged(streams)) as items:
                async for item in items:
                    yield item
        except Exception as e:
            error = ErrorResponse(
                error=ErrorDetail(message=f"generation failed: {e}", type="server_error")
            )
            yield -1, sse(error)

    @staticmethod
    def _usage(jobs: Sequence[_Job], outputs: Sequence[Any]) -> UsageInfo:
        prompt = sum(len(ids) for ids in {j.prompt_index: j.prompt_ids for j in jobs}.values())
        completion = sum(len(o.outputs[0].token_ids) for o in outputs)
        return UsageInfo(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )
