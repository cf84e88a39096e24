"""OpenAI's /v1/chat/completions and /v1/completions through the gateway.

Each request goes through the same steps: take a concurrency slot; validate (body size, JSON,
types and ranges with the protocol models the workers use, the gateway's own limits); route
(the model's workers; a key may only see its models); admit (prompt-token limit, the key's
RPM and TPM); forward (the routing policy picks the worker; fail-over before the first byte);
then stream (resumed on another worker if its worker fails mid-stream: resumption.py) or
answer, and format. The body goes to the worker as the client sent it (plus return_token_ids
for a resumable stream), so parameters the gateway does not know reach the worker, which
decides what it can do. Whatever happens, the slot is freed and the
key's token use settled when the response ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from pagedserve.api_gateway.cold_start import ColdStarts
from pagedserve.api_gateway.concurrency import ConcurrencyLimiter, Slot
from pagedserve.api_gateway.config import GatewayConfig
from pagedserve.api_gateway.errors import GatewayError, invalid_body
from pagedserve.api_gateway.forwarding import Forwarded, Forwarder
from pagedserve.api_gateway.metrics import GatewayMetrics
from pagedserve.api_gateway.rate_limit import Admission, KeyRateLimits
from pagedserve.api_gateway.request_context import REQUEST_ID_HEADER, RequestContext
from pagedserve.api_gateway.resumption import StreamResumer, asking_for_token_ids, resumable
from pagedserve.api_gateway.routing import RoutingTable
from pagedserve.api_gateway.streaming import RelayResponse, SSERelay
from pagedserve.api_gateway.upstream import Answer, OpenStream, Refusal
from pagedserve.controller.dispatch import ROUTE_HEADER, SESSION_HEADER, Route, RouteRequest
from pagedserve.protocol.openai import ChatCompletionRequest, CompletionRequest
from pagedserve.protocol.registry import WorkerView

T = TypeVar("T")

# Tokens a chat template adds around each message, at most (role markers, separators).
_TEMPLATE_TOKENS_PER_MESSAGE = 8


@dataclass(frozen=True)
class Endpoint:
    path: str
    model: type[ChatCompletionRequest] | type[CompletionRequest]
    prompt_param: str


CHAT = Endpoint("/v1/chat/completions", ChatCompletionRequest, "messages")
COMPLETIONS = Endpoint("/v1/completions", CompletionRequest, "prompt")


class Lease:
    """What a request holds until its response ends: a concurrency slot, the key's token
    charge, a stream's worker. `close` is idempotent."""

    def __init__(self, serving: GatewayServing, ctx: RequestContext, slot: Slot) -> None:
        self.serving = serving
        self.ctx = ctx
        self.slot = slot
        self.admission: Admission | None = None
        self.forwarded: Forwarded | None = None
        self.relay: SSERelay | None = None
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.forwarded is not None and isinstance(self.forwarded.outcome, OpenStream):
                resumer = self.relay.resumer if self.relay is not None else None
                current = resumer.current if resumer is not None else self.forwarded
                await current.outcome.aclose()
                self.serving.forwarder.done(current)
            if self.relay is not None:
                self.serving.record_stream(self.ctx, self.relay)
            if self.admission is not None:
                used = (self.ctx.prompt_tokens or 0) + (self.ctx.completion_tokens or 0)
                await self.serving.limits.settle(self.admission, used)
        finally:
            self.slot.release()


class GatewayServing:
    def __init__(
        self,
        config: GatewayConfig,
        client: httpx.AsyncClient,
        table: RoutingTable,
        forwarder: Forwarder,
        limits: KeyRateLimits,
        concurrency: ConcurrencyLimiter,
        metrics: GatewayMetrics,
        cold_starts: ColdStarts | None = None,
    ) -> None:
        self.config = config
        self.cold_starts = cold_starts  # None: no supervisor, a model without workers is 404
        self.client = client
        self.table = table
        self.forwarder = forwarder
        self.limits = limits
        self.concurrency = concurrency
        self.metrics = metrics

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, COMPLETIONS)

    async def _serve(self, request: Request, endpoint: Endpoint) -> Response:
        ctx: RequestContext = request.state.ctx
        try:
            slot = self.concurrency.acquire(ctx.key)
        except GatewayError as e:
            self.metrics.rate_limited.labels(
                "total_concurrency" if e.status == 503 else "key_concurrency"
            ).inc()
            raise
        lease = Lease(self, ctx, slot)
        handed_over = False
        try:
            raw = await self._read_body(request)
            req, body = self._validate(endpoint, raw)
            ctx.stream = req.stream
            workers = await self._route(req.model, ctx)
            prompt_tokens = await self._prompt_tokens(endpoint, req, workers[0])
            lease.admission = await self.limits.admit(ctx.key, prompt_tokens)
            ctx.prompt_tokens = prompt_tokens  # replaced by the worker's count when known
            deadline = ctx.started + self.config.total_timeout
            headers = {"content-type": "application/json", REQUEST_ID_HEADER: ctx.request_id}
            route_request = RouteRequest(
                req.model,
                _route_prompt(req),
                request.headers.get(SESSION_HEADER),
                _output_limit(req),
            )
            can_resume = resumable(req)
            sent = asking_for_token_ids(body) if can_resume else body
            forward = self.forwarder.forward(
                route_request, endpoint.path, sent, headers, req.stream, deadline
            )
            lease.forwarded = forwarded = await until_disconnected(request, forward, _close)
            ctx.worker, ctx.retries = forwarded.worker.worker_name, forwarded.retries
            self._count_route(ctx, forwarded.route)
            resumer = None
            if isinstance(forwarded.outcome, OpenStream) and can_resume:
                resumer = StreamResumer(
                    self.forwarder,
                    route_request,
                    endpoint.path,
                    body,
                    headers,
                    deadline,
                    client_wants_ids=req.return_token_ids,
                    first=forwarded,
                )
            response = self._format(endpoint, forwarded, ctx, lease, deadline, resumer)
            handed_over = isinstance(response, RelayResponse)  # it closes the lease at its end
            return response
        finally:
            if not handed_over:
                await lease.close()

    # -- validate ---------------------------------------------------------------------------

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        too_large = GatewayError(
            413,
            f"The request body is larger than this gateway's limit of {limit} bytes.",
            code="request_too_large",
        )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _validate(
        self, endpoint: Endpoint, raw: bytes
    ) -> tuple[ChatCompletionRequest | CompletionRequest, bytes]:
        """The parsed request (strict types, as OpenAI's API) and the body to forward."""
        try:
            req = endpoint.model.model_validate_json(raw, strict=True)
        except ValidationError as e:
            raise invalid_body(e) from None
        if req.n > self.config.max_n:
            raise GatewayError(
                400, f"n must be at most {self.config.max_n} on this gateway.", param="n"
            )
        limit = self.config.max_tokens_limit
        if limit is None:
            return req, raw
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(req, name, None)
            if value is not None and value > limit:
                raise GatewayError(
                    400,
                    f"{name} is too large: {value}. This gateway allows at most {limit} "
                    "completion tokens per choice.",
                    param=name,
                )
        if isinstance(req, ChatCompletionRequest) and req.output_limit is None:
            # Unbounded answers would run to the model's context: bound them to the limit.
            body = json.loads(raw)
            body["max_tokens"] = limit
            return req, json.dumps(body).encode()
        return req, raw

    # -- route ------------------------------------------------------------------------------

    async def _route(self, model: str, ctx: RequestContext) -> list[WorkerView]:
        allowed = ctx.key is None or ctx.key.allows(model)
        workers = self.table.workers(model)
        if not workers:
            await self.table.refresh_soon()
            workers = self.table.workers(model)
        if not workers and allowed and self.cold_starts is not None:
            await self.cold_starts.wake(model)  # scaled to zero: held until a worker is up
            workers = self.table.workers(model)
        if not workers or not allowed:
            raise GatewayError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        ctx.model = model
        return workers

    # -- admit ------------------------------------------------------------------------------

    async def _prompt_tokens(
        self,
        endpoint: Endpoint,
        req: ChatCompletionRequest | CompletionRequest,
        worker: WorkerView,
    ) -> int:
        """The prompt's tokens, all prompts together: exact for token ids, estimated for text
        (about 4 bytes a token, OpenAI's rule of thumb). With --max-prompt-tokens, a text that
        may exceed it (more bytes than the limit) is counted exactly by a worker first."""
        limit = self.config.max_prompt_tokens
        total = 0
        for prompt, overhead in _prompts(req):
            if isinstance(prompt, list):
                tokens = len(prompt)
            else:
                size = len(prompt.encode())
                tokens = math.ceil(size / 4) + overhead
                if limit is not None and size + overhead > limit:
                    tokens = await self._count(worker, req.model, prompt, tokens) + overhead
            if limit is not None and tokens > limit:
                raise GatewayError(
                    400,
                    f"The prompt has {tokens} tokens, more than this gateway's limit of {limit}.",
                    param=endpoint.prompt_param,
                    code="prompt_too_long",
                )
            total += tokens
        return total

    async def _count(self, worker: WorkerView, model: str, text: str, fallback: int) -> int:
        try:
            r = await self.client.post(
                worker.worker_name + "/count_token",
                json={"model": model, "prompt": text},
                timeout=self.config.first_token_timeout,
            )
            return int(r.json()["count"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return fallback

    def _count_route(self, ctx: RequestContext, route: Route) -> None:
        result = "hit" if route.cached_tokens else "miss"
        self.metrics.prefix_routes.labels(ctx.model or "-", result).inc()

    # -- format -----------------------------------------------------------------------------

    def _format(
        self,
        endpoint: Endpoint,
        forwarded: Forwarded,
        ctx: RequestContext,
        lease: Lease,
        deadline: float,
        resumer: StreamResumer | None,
    ) -> Response:
        outcome = forwarded.outcome
        route = {ROUTE_HEADER: forwarded.route.header()}
        if isinstance(outcome, OpenStream):
            ctx.ttft = time.monotonic() - ctx.started
            self.metrics.ttft.labels(endpoint.path, ctx.model or "-").observe(ctx.ttft)
            forwarder = self.forwarder
            lease.relay = SSERelay(
                outcome,
                deadline,
                resumer,
                lambda: forwarder.first_token(resumer.current if resumer else forwarded),
            )
            return RelayResponse(
                lease.relay, lease.close, headers={"Cache-Control": "no-cache", **route}
            )
        if isinstance(outcome, Refusal):
            ctx.prompt_tokens, ctx.error = 0, f"worker answered {outcome.status}"
            return Response(
                outcome.body,
                status_code=outcome.status,
                media_type=outcome.content_type,
                headers=route,
            )
        self._record_usage(ctx, outcome)
        return Response(outcome.body, media_type="application/json", headers=route)

    def _record_usage(self, ctx: RequestContext, answer: Answer) -> None:
        try:
            usage = json.loads(answer.body)["usage"]
            ctx.prompt_tokens = int(usage["prompt_tokens"])
            ctx.completion_tokens = int(usage["completion_tokens"])
        except (ValueError, KeyError, TypeError):
            pass
        self._count_tokens(ctx)

    def record_stream(self, ctx: RequestContext, relay: SSERelay) -> None:
        if relay.usage is not None:
            ctx.prompt_tokens = relay.usage.get("prompt_tokens", ctx.prompt_tokens)
            ctx.completion_tokens = relay.usage.get("completion_tokens")
        else:  # no usage asked for: about one token per content event
            ctx.completion_tokens = max(0, relay.events - 1)
        if not relay.done and relay.error is None:
            relay.error = "client_closed"  # the client left before the end
        ctx.error = ctx.error or relay.error
        resumer = relay.resumer
        if resumer is not None and resumer.resumes:
            ctx.worker, ctx.retries = (
                resumer.current.worker.worker_name,
                ctx.retries + resumer.resumes,
            )
            self.metrics.resumed_streams.labels(ctx.model or "-", "resumed").inc(resumer.resumes)
        if relay.error is not None and relay.error not in ("client_closed", "timeout"):
            self.metrics.resumed_streams.labels(ctx.model or "-", "failed").inc()
        self._count_tokens(ctx)

    def _count_tokens(self, ctx: RequestContext) -> None:
        model = ctx.model or "-"
        self.metrics.prompt_tokens.labels(model).inc(ctx.prompt_tokens or 0)
        self.metrics.completion_tokens.labels(model).inc(ctx.completion_tokens or 0)


def _output_limit(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    if isinstance(req, ChatCompletionRequest):
        return req.output_limit
    return req.max_tokens


def _route_prompt(req: ChatCompletionRequest | CompletionRequest) -> str | list[int] | None:
    """What prefix-aware routing goes by: the request's one prompt (a chat's messages as text,
    so each turn of a conversation extends the previous one's); a batch has no single prefix."""
    prompts = _prompts(req)
    return prompts[0][0] if len(prompts) == 1 else None


def _prompts(req: ChatCompletionRequest | CompletionRequest) -> list[tuple[Any, int]]:
    """Each prompt of a request with the template tokens it may add: chat is one prompt."""
    if isinstance(req, ChatCompletionRequest):
        text = "\n".join(f"{m.role}\n{m.text()}" for m in req.messages)
        return [(text, _TEMPLATE_TOKENS_PER_MESSAGE * len(req.messages))]
    prompt = req.prompt
    if isinstance(prompt, str):
        return [(prompt, 0)]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [(prompt, 0)]
    return [(p, 0) for p in prompt]


async def _close(result: Forwarded) -> None:
    if isinstance(result.outcome, OpenStream):
        await result.outcome.aclose()


async def until_disconnected(
    request: Request, work: Awaitable[T], discard: Callable[[T], Awaitable[None]]
) -> T:
    """Run `work` unless the client goes away first (then it is cancelled, which closes the
    connection to the worker, which aborts the request there). A result that arrives anyway
    is handed to `discard`."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    abandoned = True
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        abandoned = not task.done()
    finally:
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await gone
        if abandoned:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await discard(await task)
    if abandoned:
        raise GatewayError(499, "The client closed the connection.", code="client_closed")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
