"""OpenAI's /v1/completions and /v1/chat/completions served from the engine.

Each request goes through the same steps: validate (the model, what only OpenAI's API refuses),
convert (a chat's messages to prompt token ids by the engine's input processor, the fields to
SamplingParams by engine_params.py, one engine request per prompt whose `n` outputs are the
choices), start (bad input, the engine's included, fails here, before any byte), then stream
(Server-Sent Events ending with `data: [DONE]`) or collect, and format."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from pagedserve.engine.outputs import CompletionOutput
from pagedserve.protocol.fastchat import ErrorCode
from pagedserve.protocol.openai import (
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
    ResumeFrom,
    SamplingFields,
    UsageInfo,
    completion_id,
    random_id,
)
from pagedserve.worker.engine_params import from_openai
from pagedserve.worker.logprobs import LogprobFormatter
from pagedserve.worker.requests import (
    EngineRequests,
    RequestError,
    RequestStream,
    merged,
    refused,
)

if TYPE_CHECKING:
    from pagedserve.engine.chat_templates import ChatTemplate

DONE = "data: [DONE]\n\n"


def sse(chunk: BaseModel | dict[str, Any]) -> str:
    if isinstance(chunk, BaseModel):
        return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
    return f"data: {json.dumps(chunk)}\n\n"


class _Job:
    """One engine request of an OpenAI request: one prompt, whose `n` outputs are choices
    prompt_index * n + output.index."""

    def __init__(self, prompt_index: int, n: int, prompt_ids: list[int], prompt_text: str | None):
        self.prompt_index = prompt_index
        self.n = n
        self.prompt_ids = prompt_ids
        self.prompt_text = prompt_text

    def choice(self, output_index: int) -> int:
        return self.prompt_index * self.n + output_index


class _Progress:
    """What a stream has sent of one choice: characters (for logprobs' text offsets), output
    tokens (for usage), the end. A resumed answer starts where the client's copy ends."""

    def __init__(self, resume: ResumeFrom | None = None) -> None:
        self.chars = resume.sent_chars if resume else 0
        self.tokens = len(resume.output_token_ids) if resume else 0
        self.started = resume is not None
        self.finished = False

    def sent(self, c: Any) -> None:
        """Note that the stream now holds the delta `c` (engine/output_processor.py)."""
        self.started = True
        self.chars += len(c.text)
        self.tokens = c.num_output_tokens
        self.finished = c.finish_reason is not None


class _Answer:
    """One choice of a non-streaming request, put together from its deltas."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = None
        self.last: CompletionOutput | None = None

    def add(self, c: CompletionOutput) -> None:
        self.texts.append(c.text)
        self.token_ids += c.token_ids
        if c.logprobs is not None:
            self.logprobs = self.logprobs or []
            self.logprobs += c.logprobs
        self.last = c

    def whole(self) -> CompletionOutput:
        return dataclasses.replace(
            self.last, text="".join(self.texts), token_ids=self.token_ids, logprobs=self.logprobs
        )


class OpenAIServing:
    def __init__(self, engine: Any, requests: EngineRequests, model_names: list[str]) -> None:
        self.engine = engine
        self.requests = requests
        self.model_names = model_names
        self.logprobs = LogprobFormatter(engine.tokenizer)
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

    def _chunker(
        self,
        response_cls: type[BaseModel],
        req: SamplingFields,
        request_id: str,
        prompt_ids: list[int],
    ) -> Callable[..., str]:
        """The SSE chunk maker of one stream: its id, creation time, model and fingerprint
        fixed; with return_token_ids the first chunk carries the prompt's token ids."""
        created = int(time.time())
        kind = response_cls.model_fields["object"].default
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        prompt_pending = req.return_token_ids

        def chunk(choices: list[Any], usage: UsageInfo | None = None) -> str:
            nonlocal prompt_pending
            c = response_cls(
                id=request_id,
                object=kind,  # set, not defaulted: `sse` leaves unset fields out
                created=created,
                model=req.model,
                system_fingerprint=self.fingerprint,
                choices=choices,
            )
            if include_usage:
                c.usage = usage
            if prompt_pending:
                c.prompt_token_ids, prompt_pending = prompt_ids, False
            return sse(c)

        return chunk

    # -- /v1/completions --------------------------------------------------------------------

    async def completions(
        self, req: CompletionRequest, request_id: str | None = None
    ) -> CompletionResponse | AsyncIterator[str]:
        """`request_id`: the gateway's, which names the completion (see `completion_id`)."""
        self._validate(req)
        if req.suffix:
            raise RequestError(400, "suffix is not supported", param="suffix")
        prompts = self._completion_prompts(req.prompt)
        if len(prompts) > 1 and (req.resume or req.return_token_ids):
            param = "resume" if req.resume else "return_token_ids"
            raise RequestError(400, f"{param} takes a single prompt", param=param)
        jobs, streams = await self._start(req, prompts, "/v1/completions", req.logprobs)
        completion = completion_id("cmpl", request_id)
        if req.stream:
            return self._stream_completion(req, completion, jobs, streams)
        answers = await self._collect(streams)
        echo = req.echo and req.resume is None  # a resumed answer's prompt was sent before
        skip = _Progress(req.resume)  # what a resumed answer's client already has
        choices = []
        for job, outputs in zip(jobs, answers, strict=True):
            prefix = (job.prompt_text or "") if echo else ""
            for c in outputs:
                choices.append(
                    CompletionResponseChoice(
                        index=job.choice(c.index),
                        text=prefix + c.text,
                        logprobs=None
                        if req.logprobs is None
                        else self.logprobs.legacy(c, req.logprobs, len(prefix) + skip.chars),
                        finish_reason=c.finish_reason,
                        token_ids=c.token_ids if req.return_token_ids else None,
                    )
                )
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(
            id=completion,
            model=req.model,
            system_fingerprint=self.fingerprint,
            choices=choices,
            usage=self._usage(jobs, sum(c.num_output_tokens for cs in answers for c in cs)),
            prompt_token_ids=jobs[0].prompt_ids if req.return_token_ids else None,
        )

    def _stream_completion(
        self,
        req: CompletionRequest,
        request_id: str,
        jobs: list[_Job],
        streams: list[RequestStream],
    ) -> AsyncIterator[str]:
        chunk = self._chunker(CompletionStreamResponse, req, request_id, jobs[0].prompt_ids)
        wants_tokens = req.logprobs is not None or req.return_token_ids

        def render(job: _Job, c: Any, p: _Progress) -> Iterator[str]:
            echo = (job.prompt_text or "") if req.echo and not p.started else ""
            finished = c.finish_reason is not None
            if not (echo or c.text or finished or (wants_tokens and c.token_ids)):
                return
            logprobs = None
            if req.logprobs is not None:
                offset = p.chars + (len(job.prompt_text or "") if req.echo else 0)
                logprobs = self.logprobs.legacy(c, req.logprobs, offset + len(echo))
            yield chunk(
                [
                    CompletionResponseStreamChoice(
                        index=job.choice(c.index),
                        text=echo + c.text,
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                        token_ids=c.token_ids if req.return_token_ids else None,
                    )
                ]
            )

        return self._stream(req, jobs, streams, chunk, render)

    # -- /v1/chat/completions ---------------------------------------------------------------

    async def chat(
        self, req: ChatCompletionRequest, request_id: str | None = None
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """`request_id`: the gateway's, which names the completion (see `completion_id`)."""
        self._validate(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.tools:
            raise RequestError(400, "tools are not supported by this worker", param="tools")
        if any(m.has_images() for m in req.messages):
            raise RequestError(
                400, "this model takes text only; remove image_url parts", param="messages"
            )
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        processor = self.engine.input_processor
        try:
            prompt_ids = processor.render_chat(
                messages, req.add_generation_prompt, req.chat_template_kwargs
            )
        except ValueError as e:
            raise refused(e, "messages") from e
        jobs, streams = await self._start(
            req, [(prompt_ids, None)], "/v1/chat/completions", top, processor.chat_template
        )
        completion = completion_id("chatcmpl", request_id)
        if req.stream:
            return self._stream_chat(req, completion, jobs, streams, top)
        answers = await self._collect(streams)
        choices = [
            ChatCompletionResponseChoice(
                index=job.choice(c.index),
                message=AssistantMessage(content=c.text),
                logprobs=None if top is None else self.logprobs.chat(c, top),
                finish_reason=c.finish_reason,
                token_ids=c.token_ids if req.return_token_ids else None,
            )
            for job, outputs in zip(jobs, answers, strict=True)
            for c in outputs
        ]
        return ChatCompletionResponse(
            id=completion,
            model=req.model,
            system_fingerprint=self.fingerprint,
            choices=choices,
            usage=self._usage(jobs, sum(c.num_output_tokens for cs in answers for c in cs)),
            prompt_token_ids=prompt_ids if req.return_token_ids else None,
        )

    def _stream_chat(
        self,
        req: ChatCompletionRequest,
        request_id: str,
        jobs: list[_Job],
        streams: list[RequestStream],
        top: int | None,
    ) -> AsyncIterator[str]:
        chunk = self._chunker(ChatCompletionStreamResponse, req, request_id, jobs[0].prompt_ids)
        no_ids = [] if req.return_token_ids else None  # token ids of a chunk that adds none
        wants_tokens = top is not None or req.return_token_ids

        def choice(job: _Job, index: int, delta: DeltaMessage, **fields: Any) -> str:
            fields.setdefault("finish_reason", None)
            fields.setdefault("token_ids", no_ids)
            return chunk(
                [ChatCompletionResponseStreamChoice(index=job.choice(index), delta=delta, **fields)]
            )

        def roles() -> Iterator[str]:  # first, the role of every choice
            for job in jobs if req.resume is None else []:
                for k in range(job.n):
                    yield choice(job, k, DeltaMessage(role="assistant", content=""))

        def render(job: _Job, c: Any, p: _Progress) -> Iterator[str]:
            if c.text or (wants_tokens and c.token_ids):
                yield choice(
                    job,
                    c.index,
                    DeltaMessage(content=c.text),
                    logprobs=None if top is None else self.logprobs.chat(c, top),
                    token_ids=c.token_ids if no_ids is not None else None,
                )
            if c.finish_reason is not None:
                yield choice(job, c.index, DeltaMessage(), finish_reason=c.finish_reason)

        return self._stream(req, jobs, streams, chunk, render, roles())

    # -- the shared steps -------------------------------------------------------------------

    async def _stream(
        self,
        req: SamplingFields,
        jobs: list[_Job],
        streams: list[RequestStream],
        chunk: Callable[..., str],
        render: Callable[[_Job, Any, _Progress], Iterator[str]],
        head: Iterable[str] = (),
    ) -> AsyncIterator[str]:
        """The stream loop of both endpoints: `head`, then every choice's deltas as
        `render(job, delta, progress)` formats them, then usage if asked, then [DONE]."""
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        for item in head:
            yield item
        progress: dict[tuple[int, int], _Progress] = {}
        seen: set[int] = set()  # jobs that have sent an output
        async with aclosing(self._guarded(streams)) as items:
            async for i, out in items:
                if isinstance(out, str):  # an error event
                    yield out
                    continue
                seen.add(i)
                for c in out.outputs:
                    p = progress.setdefault((i, c.index), _Progress(req.resume))
                    if p.finished:
                        continue
                    for item in render(jobs[i], c, p):
                        yield item
                    p.sent(c)
        if include_usage and len(seen) == len(jobs):
            yield chunk([], self._usage(jobs, sum(p.tokens for p in progress.values())))
        yield DONE

    def _validate(self, req: SamplingFields) -> None:
        if req.model not in self.model_names:
            raise RequestError(
                404,
                f"The model {req.model!r} does not exist on this worker; it serves {self.model_names}",
                param="model",
                error_code=ErrorCode.INVALID_MODEL,
                openai_code="model_not_found",
            )

    def _completion_prompts(self, prompt: Any) -> list[tuple[str | list[int], str]]:
        """Each prompt of a completion request as the engine takes it, with its text (echo)."""
        if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        decode = self.engine.tokenizer.decode
        return [(p, p if isinstance(p, str) else decode(p)) for p in prompt]

    async def _start(
        self,
        req: SamplingFields,
        prompts: list[tuple[str | list[int], str | None]],
        route: str,
        logprobs: int | None = None,
        chat_template: ChatTemplate | None = None,
    ) -> tuple[list[_Job], list[RequestStream]]:
        """Start one engine request per prompt (a chat request: its rendered messages, whose
        template's end-of-turn strings and tokens stop it too)."""
        base = random_id("req")
        max_tokens = req.output_limit if isinstance(req, ChatCompletionRequest) else req.max_tokens
        params = from_openai(req, max_tokens, logprobs, chat_template)
        engine_jobs = [
            (p, copy.deepcopy(params), f"{base}-{i}") for i, (p, _) in enumerate(prompts)
        ]
        prompt_param = "prompt" if chat_template is None else "messages"
        if req.resume is None:
            streams = await self.requests.start_all(engine_jobs, route, prompt_param)
        else:  # one prompt (completions refuse more); the engine refuses n > 1
            from pagedserve.engine.resume import Resume

            resume = Resume(req.resume.output_token_ids, req.resume.sent_chars)
            streams = [
                await self.requests.start(
                    *engine_jobs[0], route, resume=resume, prompt_param=prompt_param
                )
            ]
        jobs = [
            _Job(i, req.n, stream.first.prompt_token_ids, text)
            for i, ((_, text), stream) in enumerate(zip(prompts, streams, strict=True))
        ]
        return jobs, streams

    async def _collect(self, streams: list[RequestStream]) -> list[list[CompletionOutput]]:
        """Each stream's answers (by output index), put together from its deltas."""
        answers: list[dict[int, _Answer]] = [{} for _ in streams]
        async with aclosing(merged(streams)) as items:
            async for i, out in items:
                for c in out.outputs:
                    answers[i].setdefault(c.index, _Answer()).add(c)
        return [[a.whole() for _, a in sorted(job.items())] for job in answers]

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
    def _usage(jobs: Sequence[_Job], completion: int) -> UsageInfo:
        """`completion`: the output tokens of every choice (a resumed answer's old ones too)."""
        prompt = sum(len(ids) for ids in {j.prompt_index: j.prompt_ids for j in jobs}.values())
        return UsageInfo(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )
