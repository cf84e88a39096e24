"""OpenAI's /v1/completions and /v1/chat/completions served from the engine.

Each request goes through the same steps: validate (model, parameters the engine cannot do),
convert (prompts to token ids, OpenAI parameters to SamplingParams, one engine request per
prompt whose `n` outputs are the choices), start (bad input fails here, before any byte), then stream
(Server-Sent Events ending with `data: [DONE]`) or collect, and format.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import aclosing
from typing import Any

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
    ChatCompletionTokenLogprob,
    ChoiceLogprobs,
    CompletionLogprobs,
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
    TopLogprob,
    UsageInfo,
    completion_id,
    random_id,
)
from pagedserve.worker.requests import EngineRequests, RequestError, RequestStream, merged

DONE = "data: [DONE]\n\n"
MAX_BEST_OF = 16  # as OpenAI's n: sequences one request may generate


def sse(chunk: BaseModel | dict[str, Any]) -> str:
    if isinstance(chunk, BaseModel):
        return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
    return f"data: {json.dumps(chunk)}\n\n"


def finite_logprob(logprob: float | None) -> float:
    """A logprob JSON can carry: -inf and NaN (a degenerate penalty) become -9999.0, as
    OpenAI's floor for impossible tokens."""
    if logprob is None or not math.isfinite(logprob):
        return -9999.0
    return max(logprob, -9999.0)


class TokenTexts:
    """`texts(token_id)`: a token's text as OpenAI and FastChat show it in logprobs (a
    SentencePiece word start keeps its space), decoded once per token id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
                text = " " + text
            self._texts[token_id] = text
        return text


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
    def __init__(
        self,
        engine: Any,
        requests: EngineRequests,
        model_names: list[str],
        chat_template: Any = None,
    ) -> None:
        from pagedserve.engine.chat_templates import resolve_chat_template

        self.engine = engine
        self.requests = requests
        self.model_names = model_names
        # Resolved once; a model without any template refuses chat requests, not its loading.
        self.template = (
            chat_template
            if chat_template is not None
            else resolve_chat_template(engine.tokenizer, model_names[0])
        )
        self._token_str = TokenTexts(engine.tokenizer)
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
                        else self._completion_logprobs(
                            c, 0, len(prefix) + skip.chars, req.logprobs
                        ),
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
                logprobs = self._completion_logprobs(c, 0, offset + len(echo), req.logprobs)
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
        prompt_ids = self._chat_prompt(req)
        jobs, streams = await self._start(
            req, [(prompt_ids, None)], "/v1/chat/completions", top, chat=True
        )
        completion = completion_id("chatcmpl", request_id)
        if req.stream:
            return self._stream_chat(req, completion, jobs, streams, top)
        answers = await self._collect(streams)
        choices = [
            ChatCompletionResponseChoice(
                index=job.choice(c.index),
                message=AssistantMessage(content=c.text),
                logprobs=None if top is None else self._chat_logprobs(c, 0, top),
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
                    logprobs=None if top is None else self._chat_logprobs(c, 0, top),
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
        if req.best_of is not None and req.best_of > MAX_BEST_OF:
            raise RequestError(
                400, f"best_of must be at most {MAX_BEST_OF}, got {req.best_of}", param="best_of"
            )
        if req.logit_bias:
            for key in req.logit_bias:
                try:
                    int(key)
                except ValueError:
                    raise RequestError(
                        400,
                        f"logit_bias keys must be token ids; got {key!r}",
                        param="logit_bias",
                    ) from None

    def _sampling_params(
        self,
        req: SamplingFields,
        max_tokens: int | None,
        logprobs: int | None,
        chat: bool = False,
    ) -> Any:
        from pagedserve.engine.sampling_params import RequestOutputKind, SamplingParams

        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        stop_ids = list(req.stop_token_ids or [])
        if chat:  # the chat template's own end-of-turn strings and tokens
            stop += [s for s in self.template.stop if s not in stop]
            stop_ids += [t for t in self.template.stop_token_ids if t not in stop_ids]
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
                stop=stop or None,
                stop_token_ids=stop_ids,
                ignore_eos=req.ignore_eos,
                seed=req.seed,
                skip_special_tokens=req.skip_special_tokens,
                n=req.n,
                best_of=req.best_of,
                use_beam_search=req.use_beam_search,
                logprobs=logprobs,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=1.0
                if req.repetition_penalty is None
                else req.repetition_penalty,
                logit_bias={int(k): v for k, v in req.logit_bias.items()}
                if req.logit_bias
                else None,
                output_kind=RequestOutputKind.DELTA,  # streams send, and collect joins, deltas
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
        from pagedserve.engine.chat_templates import JinjaChatTemplate

        tok = self.engine.tokenizer
        template = self.template
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            if req.chat_template_kwargs and isinstance(template, JinjaChatTemplate):
                source = {} if template.source is None else {"chat_template": template.source}
                text = tok.apply_chat_template(
                    messages,
                    tokenize=False,
                    add_generation_prompt=req.add_generation_prompt,
                    **source,
                    **req.chat_template_kwargs,
                )
            else:
                text = template.render(messages, req.add_generation_prompt)
        except Exception as e:  # no template, or it refuses (roles out of order, ...)
            message = str(e)
            if "chat template" not in message:
                message = f"the chat template could not render these messages: {message}"
            raise RequestError(400, message, param="messages") from e
        return tok.encode(text, add_special_tokens=template.add_special_tokens)

    # -- logprobs ---------------------------------------------------------------------------

    @staticmethod
    def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: -kv[1])[:k]

    @staticmethod
    def _token_logprobs(c: Any, start: int) -> Iterator[tuple[int, dict[int, float]]]:
        """(token id, logprobs entry) from output token `start` on; a resumed answer has
        logprobs for its new tokens only, the last len(c.logprobs) of its tokens."""
        entries = c.logprobs or []
        first = max(len(c.token_ids) - len(entries), 0)
        start = max(start, first)
        return zip(c.token_ids[start:], entries[start - first :], strict=False)

    def _chat_logprobs(self, c: Any, start: int, k: int) -> ChoiceLogprobs:
        content = []
        for token_id, entry in self._token_logprobs(c, start):
            text = self._token_str(token_id)
            content.append(
                ChatCompletionTokenLogprob(
                    token=text,
                    logprob=finite_logprob(entry.get(token_id)),
                    bytes=list(text.encode("utf-8")),
                    top_logprobs=[
                        TopLogprob(
                            token=self._token_str(t),
                            logprob=finite_logprob(lp),
                            bytes=list(self._token_str(t).encode("utf-8")),
                        )
                        for t, lp in self._top(entry, k)
                    ],
                )
            )
        return ChoiceLogprobs(content=content)

    def _completion_logprobs(self, c: Any, start: int, offset: int, k: int) -> CompletionLogprobs:
        # every field set explicitly: streamed chunks leave out fields that were not set
        out = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        for token_id, entry in self._token_logprobs(c, start):
            text = self._token_str(token_id)
            out.tokens.append(text)
            out.token_logprobs.append(finite_logprob(entry.get(token_id)))
            top = {self._token_str(t): finite_logprob(lp) for t, lp in self._top(entry, k)}
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(text)
        return out

    async def _start(
        self,
        req: SamplingFields,
        prompts: list[tuple[list[int], str | None]],
        route: str,
        logprobs: int | None = None,
        chat: bool = False,
    ) -> tuple[list[_Job], list[RequestStream]]:
        limit = self.engine.max_model_len
        jobs: list[_Job] = []
        engine_jobs = []
        base = random_id("req")
        max_tokens = req.output_limit if isinstance(req, ChatCompletionRequest) else req.max_tokens
        params = self._sampling_params(req, max_tokens, logprobs, chat)
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
            jobs.append(_Job(p, req.n, ids, text))
            engine_jobs.append((ids, copy.deepcopy(params), f"{base}-{p}"))
        if req.resume is None:
            streams = await self.requests.start_all(engine_jobs, route)
        else:  # one prompt (completions refuse more); the engine refuses n > 1
            from pagedserve.engine.resume import Resume

            resume = Resume(req.resume.output_token_ids, req.resume.sent_chars)
            streams = [await self.requests.start(*engine_jobs[0], route, resume=resume)]
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
