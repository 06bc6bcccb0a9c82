"""The ingress deployment: OpenAI-compatible HTTP routes and the Python handle API.

Both front doors share one code path: each HTTP route validates the body and calls the same
public method a `DeploymentHandle` caller uses (`chat`, `chat_stream`, `complete`,
`complete_stream`, `list_models`, `health`). The ingress turns an OpenAI request into a
`GenerateRequest`, streams batches of `TokenChunk`s from the tier's deployment and formats them
as OpenAI objects. A stream is primed before any HTTP header goes out, so an error raised before
the first token (bad prompt, context overflow, dead tier) is a proper 4xx/5xx response; an
error after that ends the SSE stream with an error event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from opentelemetry import trace
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierserve.actors.types import GenerateRequest, TokenChunk
from tierserve.core.errors import ServiceUnavailable, TierServeError
from tierserve.core.streams import observed, outcome_of
from tierserve.core.telemetry import TelemetryConfig, inject, setup_telemetry
from tierserve.rag.config import RagConfig
from tierserve.router.config import IngressConfig, RequestLimits, RoutingConfig
from tierserve.router.handles import handle_error
from tierserve.router.limits import body_too_large, check_limits
from tierserve.router.metrics import IngressMetrics
from tierserve.router.protocol import ChatCompletionRequest, CompletionRequest, error_responses, validation_error
from tierserve.router.replicas import tier_replicas
from tierserve.router.responses import (
    ChatStreamFormatter,
    CompletionBuilder,
    CompletionStreamFormatter,
    StreamFormatter,
)
from tierserve.router.retrieval_step import RetrievalStep, Retrieved, question_of
from tierserve.router.routing import Routed, Router, primed
from tierserve.router.safety_step import ContentBlocked, SafetyReport, SafetyStep
from tierserve.router.tiers import AUTO, TierDirectory, TierEntry
from tierserve.router.tracing import end_with_status, http_span, request_span, response_headers, route_span
from tierserve.safety.config import SafetyConfig

logger = logging.getLogger("tierserve.ingress")

R = TypeVar("R", bound=BaseModel)

app = FastAPI(title="tierserve", docs_url="/docs", redoc_url=None)

RETRIEVER = " retriever"
"""The retriever among the deployments whose replicas the ingress watches (no tier has this name)."""


class BodyLimit:
    """ASGI middleware refusing a request body over `ingress.limits.max_body_bytes` with 413,
    from its `Content-Length` before reading it, else as its chunks arrive."""

    max_body_bytes = RequestLimits().max_body_bytes
    """Set by the `Ingress` constructor (one per replica process) from its config."""

    def __init__(self, asgi: Any):
        self.asgi = asgi

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        limit = BodyLimit.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            error = body_too_large(limit)
            return await _error_response(error)(scope, receive, send)
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, body_too_large(limit).message)
            return message

        await self.asgi(scope, counted, send)


app.add_middleware(BodyLimit)

_fastapi_openapi = app.openapi


def _openapi() -> dict[str, Any]:
    """FastAPI's OpenAPI document less its 422 responses: tierserve answers bad input with 400."""
    if app.openapi_schema is None:
        schema = _fastapi_openapi()
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


def _request_id(prefix: str) -> str:
    """`<prefix>-<Serve's request id>`, so the id in responses matches Serve's logs."""
    try:
        rid = serve.context._get_serve_request_context().request_id
    except Exception:  # called outside a Serve request (plain unit use)
        rid = ""
    return f"{prefix}-{rid or uuid.uuid4().hex}"


def _error_response(exc: TierServeError, headers: dict[str, str] | None = None) -> JSONResponse:
    if exc.retry_after_s is not None:
        headers = {**(headers or {}), "retry-after": str(max(1, math.ceil(exc.retry_after_s)))}
    return JSONResponse(exc.to_openai(), status_code=exc.status_code, headers=headers)


def _internal_error(exc: BaseException, where: str) -> dict[str, Any]:
    rid = _request_id("req")
    logger.error("%s failed (request %s): %r", where, rid, exc, exc_info=exc)
    return {
        "error": {
            "message": f"internal server error (request id {rid})",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }


@app.exception_handler(RequestValidationError)
async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(validation_error(list(exc.errors())))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = TierServeError(str(exc.detail), None, _HTTP_CODES.get(exc.status_code))
    err.status_code = exc.status_code
    return _error_response(err, getattr(exc, "headers", None))


@app.exception_handler(TierServeError)
async def _on_user_error(_: Request, exc: TierServeError) -> JSONResponse:
    return _error_response(exc)


@app.exception_handler(Exception)
async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(_internal_error(exc, f"{request.method} {request.url.path}"), status_code=500)


def _coerce(request: R | dict[str, Any], model: type[R]) -> R:
    """Handle callers may pass the pydantic request or a plain dict in the OpenAI shape."""
    if isinstance(request, model):
        return request
    try:
        return model.model_validate(request)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def _tier_error(exc: BaseException, tier: str) -> BaseException:
    """What a failed call to a tier means (`handle_error`)."""
    return handle_error(exc, f"tier {tier!r}", "model")


def _dead_tier(exc: BaseException) -> str | None:
    """Why a failed poll means the tier cannot serve, or None if it may just be slow."""
    error = _tier_error(exc, "")
    return str(error) if isinstance(error, ServiceUnavailable) else None


async def _sse(batches: AsyncIterator[list[BaseModel]]) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's framing, one write per batch; a late error becomes a final
    error event."""
    try:
        async for batch in batches:
            yield "".join(f"data: {obj.model_dump_json(exclude_unset=True)}\n\n" for obj in batch)
    except TierServeError as exc:
        yield f"data: {json.dumps(exc.to_openai())}\n\n"
    except Exception as exc:
        yield f"data: {json.dumps(_internal_error(exc, 'stream'))}\n\n"
    yield "data: [DONE]\n\n"


async def _ending(body: AsyncIterator[Any], span: trace.Span) -> AsyncIterator[Any]:
    """A streamed body that ends the request's span when the stream ends (or the client leaves,
    even before the body is read: it is `primed`), and closes the stream under it."""
    try:
        yield b""  # taken by `primed`
        async for part in body:
            yield part
    finally:
        end_with_status(span, 200)
        await body.aclose()


@dataclasses.dataclass
class Opened:
    """A request on its way: where it went, its id, its (guarded) batches, what it retrieved
    and what the guards did."""

    routed: Routed
    rid: str
    batches: AsyncIterator[list[TokenChunk]]
    retrieved: Retrieved | None
    safety: SafetyReport


@serve.deployment
@serve.ingress(app)
class Ingress:
    """The front door: OpenAI HTTP routes plus typed methods for DeploymentHandle callers."""

    def __init__(
        self,
        config: IngressConfig,
        tiers: list[TierEntry],
        handles: dict[str, DeploymentHandle],
        telemetry: TelemetryConfig | None = None,
        routing: RoutingConfig | None = None,
        model_cache: str | None = None,
        retriever: DeploymentHandle | None = None,
        rag: RagConfig | None = None,
        safety: SafetyConfig | None = None,
    ):
        setup_telemetry(telemetry or TelemetryConfig(), "ingress")
        self.config = config
        BodyLimit.max_body_bytes = config.limits.max_body_bytes
        self.directory = TierDirectory(tiers, config.default_tier)
        self.handles = handles
        self.created = int(time.time())
        self.metrics = IngressMetrics()
        self.router = Router(
            routing or RoutingConfig(),
            list(self.directory.tiers),
            self.directory.default,
            Path(model_cache) if model_cache else None,
            {t.name: t.replicas for t in tiers},
        )
        self.retrieval = RetrievalStep(
            rag or RagConfig(enabled=retriever is not None), retriever, config.retriever_timeout_s
        )
        self.safety = SafetyStep(safety or SafetyConfig(), Path(model_cache) / "safety" if model_cache else None)
        self._pollers: list[asyncio.Task] = []
        self._ensure_polling()

    def _ensure_polling(self) -> None:
        """Start polling the tiers' load and Serve's view of their replicas once an event loop
        runs (the replica's)."""
        if self._pollers and not any(task.done() for task in self._pollers):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        for task in self._pollers:
            task.cancel()
        loads = self.router.states.poll_forever(
            lambda tier: self.handles[tier].load.remote(), self.router.config.poll_interval_s, _dead_tier
        )
        self._pollers = [loop.create_task(loads), loop.create_task(self._watch_replicas())]

    async def _watch_replicas(self) -> None:
        """Feed Serve's count of each tier's replicas to the router (`tierserve.router.replicas`)."""
        app_name = serve.get_replica_context().app_name
        deployments = {tier: handle.deployment_name for tier, handle in self.handles.items()}
        retriever = self.retrieval.retriever
        watched = {**deployments, **({RETRIEVER: retriever.deployment_name} if retriever is not None else {})}
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
            except Exception:
                logger.debug("reading Serve's status failed", exc_info=True)
            else:
                for name, replicas in tier_replicas(status, app_name, watched).items():
                    if name == RETRIEVER:
                        self.retrieval.replicas_seen(replicas.running)
                    else:
                        self.router.states.replicas_seen(name, replicas)
            await asyncio.sleep(self.config.replicas_poll_interval_s)

    # ----- Python handle API -------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest | dict[str, Any]) -> ChatCompletion:
        """A whole chat completion (`stream` is ignored). The `tierserve` extra field says which
        tier served it, why, and what it cost; an overloaded service raises `Overloaded`."""
        with request_span("tierserve.chat") as span:
            body = _coerce(request, ChatCompletionRequest)
            return await self._whole(body, ChatStreamFormatter, span)

    async def chat_stream(self, request: ChatCompletionRequest | dict[str, Any]) -> AsyncIterator[ChatCompletionChunk]:
        """A chat completion as `chat.completion.chunk` objects (call with `stream=True`)."""
        with request_span("tierserve.chat_stream") as span:
            body = _coerce(request, ChatCompletionRequest)
            async for batch in await self._stream(body, ChatStreamFormatter, span):
                for item in batch:
                    yield item

    async def complete(self, request: CompletionRequest | dict[str, Any]) -> Completion:
        """A whole text completion (`stream` is ignored)."""
        with request_span("tierserve.complete") as span:
            body = _coerce(request, CompletionRequest)
            return await self._whole(body, CompletionStreamFormatter, span)

    async def complete_stream(self, request: CompletionRequest | dict[str, Any]) -> AsyncIterator[Completion]:
        """A text completion as streamed `text_completion` objects (call with `stream=True`)."""
        with request_span("tierserve.complete_stream") as span:
            body = _coerce(request, CompletionRequest)
            async for batch in await self._stream(body, CompletionStreamFormatter, span):
                for item in batch:
                    yield item

    async def list_models(self) -> list[Model]:
        """`auto` and every tier, as OpenAI model objects."""
        return [
            Model(id=m, object="model", created=self.created, owned_by="tierserve") for m in self.directory.model_ids()
        ]

    async def health(self) -> dict[str, str]:
        """Each tier's health: 'ok' or why it cannot serve now (a replica that restarts its
        engine passes Serve's health check but is not ready)."""

        async def check(name: str) -> str:
            try:
                await asyncio.wait_for(self.handles[name].ready.remote(), self.config.health_timeout_s)
                return "ok"
            except asyncio.TimeoutError:
                return f"no answer within {self.config.health_timeout_s:g}s"
            except Exception as exc:
                return str(_tier_error(exc, name))

        names = list(self.directory.tiers)
        return dict(zip(names, await asyncio.gather(*(check(n) for n in names))))

    async def tiers(self) -> list[dict[str, Any]]:
        """Each tier's info, counters (of the replica that answers), its replicas as Serve
        reports them and the router's view of it. A tier that does not answer within
        `health_timeout_s` (no running replica, say) is listed with `error` and no info."""
        self._ensure_polling()
        views = {v.name: v for v in self.router.states.snapshot()}

        async def one(name: str) -> dict[str, Any]:
            handle = self.handles[name]
            view = views[name]
            replicas = self.router.states.replicas.get(name)
            router = {
                "healthy": view.healthy,
                "in_flight": view.in_flight,
                "replicas": replicas.as_dict() if replicas is not None else None,
                "min_complexity": view.min_complexity,
                "max_queue": view.max_queue,
                "cost": view.cost.model_dump(),
                "load": dataclasses.asdict(view.load) if view.load is not None else None,
                "last_error": self.router.states.last_error.get(name),
            }
            entry: dict[str, Any] = {"name": name, "description": self.directory.tiers[name].description}
            try:
                info, stats = await asyncio.wait_for(
                    asyncio.gather(handle.info.remote(), handle.stats.remote()), self.config.health_timeout_s
                )
            except asyncio.TimeoutError:
                return {**entry, "error": f"no answer within {self.config.health_timeout_s:g}s", "router": router}
            except Exception as exc:
                return {**entry, "error": str(_tier_error(exc, name)), "router": router}
            counters = dataclasses.asdict(stats)
            counters["speculation"] = stats.speculation.as_dict() if stats.speculation else None
            if stats.speculation_control is not None:
                counters["speculation_control"] = [bucket.as_dict() for bucket in stats.speculation_control]
            return {**dataclasses.asdict(info), **entry, "stats": counters, "router": router}

        return list(await asyncio.gather(*(one(n) for n in self.directory.tiers)))

    async def indexes(self) -> list[dict[str, Any]]:
        """The retrieval indexes with their published version's manifest (none without RAG)."""
        if self.retrieval.retriever is None:
            return []
        return await self.retrieval.indexes()

    # ----- HTTP routes -------------------------------------------------------------------

    @app.post(
        "/v1/chat/completions",
        responses={
            200: {"model": ChatCompletion, "content": {"text/event-stream": {}}, "description": "JSON, or SSE"},
            **error_responses(400, 404, 413, 429, 500, 503, 504),
        },
    )
    async def _http_chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._http_traced(request, body, ChatStreamFormatter)

    @app.post(
        "/v1/completions",
        responses={
            200: {"model": Completion, "content": {"text/event-stream": {}}, "description": "JSON, or SSE"},
            **error_responses(400, 404, 413, 429, 500, 503, 504),
        },
    )
    async def _http_complete(self, body: CompletionRequest, request: Request) -> Response:
        return await self._http_traced(request, body, CompletionStreamFormatter)

    @app.get("/v1/models", responses=error_responses(500))
    async def _http_models(self) -> JSONResponse:
        models = await self.list_models()
        return JSONResponse({"object": "list", "data": [m.model_dump(exclude_unset=True) for m in models]})

    @app.get("/v1/tiers", responses=error_responses(500))
    async def _http_tiers(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": await self.tiers()})

    @app.get("/v1/indexes", responses=error_responses(500, 503, 504))
    async def _http_indexes(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": await self.indexes()})

    @app.get("/health", responses={503: {"description": "No tier can serve"}, **error_responses(500)})
    async def _http_health(self) -> JSONResponse:
        """200 while at least one tier can serve (`status`: `ok`, or `degraded` with the tiers
        that cannot named), 503 when none can: what a load balancer should probe."""
        tiers = await self.health()
        serving = [name for name, state in tiers.items() if state == "ok"]
        status = "ok" if len(serving) == len(tiers) else ("degraded" if serving else "unavailable")
        return JSONResponse({"status": status, "serving": serving, "tiers": tiers}, status_code=200 if serving else 503)

    # ----- shared internals --------------------------------------------------------------

    async def _http_traced(
        self, request: Request, body: ChatCompletionRequest | CompletionRequest, formatter: type[StreamFormatter]
    ) -> Response:
        """The reply inside the request's span, which a stream ends when it ends; the trace id
        goes back in the response headers, errors included."""
        route = getattr(request.scope.get("route"), "path", request.url.path)
        span = http_span(request.method, route, request.url.path, request.headers)
        headers = response_headers(span)
        try:
            with trace.use_span(span, end_on_exit=False):
                response = await self._http_reply(body, formatter, span, request.headers)
        except TierServeError as exc:
            end_with_status(span, exc.status_code, exc)
            self.metrics.error(exc.code, exc.status_code)
            return _error_response(exc, headers)
        except Exception as exc:
            end_with_status(span, 500, exc)
            self.metrics.error("internal_error", 500)
            raise
        response.headers.update(headers)
        if isinstance(response, StreamingResponse):
            response.body_iterator = await primed(_ending(response.body_iterator, span))
        else:
            end_with_status(span, response.status_code)
        return response

    async def _http_reply(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        formatter: type[StreamFormatter],
        span: trace.Span,
        headers: Any,
    ) -> Response:
        """SSE for `stream: true` (opened before any header goes out, so errors before the
        first token are plain HTTP errors), else JSON; routing facts in the headers."""
        if body.stream:
            routed, stream = await self._stream_routed(body, formatter, span, headers)
            return StreamingResponse(_sse(stream), media_type="text/event-stream", headers=routed.headers())
        routed, whole = await self._whole_routed(body, formatter, span, headers)
        return JSONResponse(whole.model_dump(exclude_unset=True), headers=routed.headers())

    async def _plan(
        self, body: ChatCompletionRequest | CompletionRequest, span: trace.Span, headers: Any, extra_tokens: int = 0
    ) -> Routed:
        """Where the request may go, recorded on its span and in the metrics; shed at once if
        nowhere."""
        self._ensure_polling()
        named = None if body.model == AUTO else self.directory.resolve(body.model)
        routed = await self.router.plan(body, named, headers, extra_tokens)
        decision = routed.decision
        route_span(span, body.model, routed)
        if not decision.choices:
            self.metrics.rejected(decision.reason, routed.sla.name)
            raise self.router.rejection(decision)
        self.metrics.decided(decision.choices[0].tier, decision.reason, routed.features.complexity)
        return routed

    async def _open(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        formatter: type[StreamFormatter],
        span: trace.Span,
        headers: Any = None,
    ) -> Opened:
        """Route the request, guard its text, retrieve its passages if it uses retrieval (and
        guard those), and start it on the first tier that sends tokens (see `Router.open`)."""
        check_limits(body, self.config.limits)  # before anything is spent on the request
        report = SafetyReport()
        options = self.retrieval.options(body, "chat" if formatter is ChatStreamFormatter else "completions")
        # Routed first, so an overloaded service sheds at once, before guards and retrieval;
        # the passages' tokens are counted at their most (top_k full chunks) for the context check.
        passage_tokens = (options.top_k or 0) * (self.retrieval.config.chunking.max_tokens + 40) if options else 0
        routed = await self._plan(body, span, headers, passage_tokens)
        try:
            return await self._guarded_open(body, formatter, span, routed, options, report)
        finally:
            self.router.release(routed)  # the place `plan` held, if the request never started

    async def _guarded_open(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        formatter: type[StreamFormatter],
        span: trace.Span,
        routed: Routed,
        options: Any,
        report: SafetyReport,
    ) -> Opened:
        """`_open` once routed: input guards, retrieval, and the tier's first tokens."""
        # The guards that only refuse keep checking while retrieval and prefill run; the
        # first token waits for them (`ready` below).
        guarded = await self.safety.check_input(body, report, span)
        try:
            question = question_of(body, guarded.texts) if options is not None else ""
            rid = _request_id(formatter.id_prefix)
            request = self.safety.apply_input(body.to_generate(rid), guarded)
            request.priority = routed.sla.priority
            retrieved = None
            if options is not None:
                retrieved = await self.retrieval.retrieve(options, question, span)
                retrieved.result.hits = await self.safety.check_retrieved(retrieved.result.hits, report, span)
                request = self.retrieval.augment(request, retrieved)
            entry = "chat" if request.messages is not None else "completion"
            try:
                start = lambda tier: self._tier_batches(tier, request, span)  # noqa: E731
                batches = await self.router.open(routed, start, guarded.passed)
            except TierServeError as exc:
                if not isinstance(exc, ContentBlocked):
                    self.metrics.finished(routed, entry, outcome_of(exc))
                raise
            finally:
                for tier, code in routed.tried:
                    self.metrics.fallbacks.inc(1, {"tier": tier, "code": code})
        except TierServeError as exc:
            if not isinstance(exc, ContentBlocked):
                await guarded.passed()  # the guards' refusal comes before any other error
            raise
        finally:
            guarded.cancel()
        span.set_attribute("tierserve.tier", routed.tier or "")
        watched = observed(batches, [self.metrics.request(routed, entry, self.router.cost)], started=routed.arrived)
        guarded_batches = self.safety.guard_output(watched, report, span)
        return Opened(routed, rid, guarded_batches, retrieved, report)

    def _extension(self, opened: Opened) -> dict[str, Any]:
        """The response's `tierserve` field: routing facts, and retrieval's and the guards'
        when they ran."""
        extension = opened.routed.extension()
        if opened.retrieved is not None:
            extension["retrieval"] = opened.retrieved.extension()
        if self.safety.chain is not None:
            extension["safety"] = opened.safety.extension()
        return extension

    async def _stream(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        formatter: type[StreamFormatter],
        span: trace.Span,
        headers: Any = None,
    ) -> AsyncIterator[list[BaseModel]]:
        _, batches = await self._stream_routed(body, formatter, span, headers)
        return batches

    async def _stream_routed(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        formatter: type[StreamFormatter],
        span: trace.Span,
        headers: Any,
    ) -> tuple[Routed, AsyncIterator[list[BaseModel]]]:
        """The stream as lists of OpenAI objects; the last object carries the `tierserve` field."""
        opened = await self._open(body, formatter, span, headers)
        routed, retrieved = opened.routed, opened.retrieved
        fmt = formatter(opened.rid, routed.tier or "", bool(body.stream_options and body.stream_options.include_usage))

        async def formatted() -> AsyncIterator[list[BaseModel]]:
            answer: list[str] = []  # the first choice's text, for grounding
            async for batch in opened.batches:
                items = [item for chunk in batch for item in fmt.format(chunk)]
                if retrieved is not None:
                    answer += [chunk.text for chunk in batch if chunk.index == 0]
                last = any(chunk.usage is not None or chunk.finish_reason == "content_filter" for chunk in batch)
                if items and last:
                    if retrieved is not None:
                        await self.retrieval.ground(retrieved, "".join(answer), routed.tier)
                    items[-1].tierserve = self._extension(opened)
                yield items

        return routed, formatted()

    async def _whole(
        self, body: ChatCompletionRequest | CompletionRequest, formatter: type[StreamFormatter], span: trace.Span
    ) -> BaseModel:
        return (await self._whole_routed(body, formatter, span, None))[1]

    async def _whole_routed(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        formatter: type[StreamFormatter],
        span: trace.Span,
        headers: Any,
    ) -> tuple[Routed, BaseModel]:
        """The whole response, folded from the stream, with the `tierserve` field."""
        opened = await self._open(body, formatter, span, headers)
        routed, rid = opened.routed, opened.rid
        built = CompletionBuilder(body.n)
        async for batch in opened.batches:
            for chunk in batch:
                built.add(chunk)
        whole = built.chat(rid, routed.tier) if formatter is ChatStreamFormatter else built.completion(rid, routed.tier)
        if opened.retrieved is not None:
            await self.retrieval.ground(opened.retrieved, "".join(built.texts[0]), routed.tier)
        whole.tierserve = self._extension(opened)
        return routed, whole

    async def _tier_batches(
        self, tier: str, request: GenerateRequest, span: trace.Span
    ) -> AsyncIterator[list[TokenChunk]]:
        """The tier's batches of token chunks; leaving early cancels the tier's stream (and so
        the engine request). The tier's spans join `span`'s trace."""
        request.trace_context = inject(trace.set_span_in_context(span))
        responses = self.handles[tier].options(stream=True).generate.remote(request)
        finished = False
        try:
            async for batch in responses:
                yield batch
            finished = True
        except Exception as exc:
            raise _tier_error(exc, tier) from None
        finally:
            if not finished:
                responses.cancel()
