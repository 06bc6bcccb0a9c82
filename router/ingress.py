"""The ingress deployment: OpenAI-compatible HTTP routes and the Python handle API.

Both front doors share one code path: each HTTP route validates the body and calls the same
public method a `DeploymentHandle` caller uses (`chat`, `chat_stream`, `complete`,
`complete_stream`, `embeddings`, `list_models`, `health`); with auth on, HTTP callers send their API key as
`Authorization: Bearer` (the `Gate` checks it before the route runs) and handle callers as
`api_key=`, and both go through the same checks (`tierserve.router.access`). The ingress turns an OpenAI request into a
`GenerateRequest`, streams batches of `TokenChunk`s from the tier's deployment and formats them
as OpenAI objects. A stream is primed before any HTTP header goes out, so an error raised before
the first token (bad prompt, context overflow, dead tier) is a proper 4xx/5xx response; an
error after that ends the SSE stream with an error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from opentelemetry import trace
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.handle import DeploymentHandle

from tierserve.core.errors import ModelNotFound, ServiceUnavailable, TierServeError, Unauthenticated
from tierserve.core.telemetry import TelemetryConfig, setup_telemetry
from tierserve.rag.config import RagConfig
from tierserve.router.access import Access, Principal
from tierserve.router.audit import Auditor, AuditRecord
from tierserve.router.config import IngressConfig, RoutingConfig
from tierserve.router.handles import TierHandles, tier_error
from tierserve.router.http import (
    BodyLimit,
    Gate,
    app,
    audit_of,
    ending,
    principal_of,
    refused,
    request_id,
    sse,
)
from tierserve.router.keys import open_store, store_path
from tierserve.router.metrics import IngressMetrics
from tierserve.router.pipeline import Pipeline
from tierserve.router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    error_responses,
    validation_error,
)
from tierserve.router.replicas import tier_replicas
from tierserve.router.responses import ChatStreamFormatter, CompletionStreamFormatter, StreamFormatter
from tierserve.router.retrieval_step import RetrievalStep
from tierserve.router.routing import Router, primed
from tierserve.router.safety_step import SafetyStep
from tierserve.router.status import TierStatus
from tierserve.router.tiers import TierDirectory, TierEntry
from tierserve.router.tracing import end_with_status, http_span, request_span, response_headers
from tierserve.safety.config import SafetyConfig

logger = logging.getLogger("tierserve.ingress")

R = TypeVar("R", bound=BaseModel)

RETRIEVER = " retriever"
"""The retriever among the deployments whose replicas the ingress watches (no tier has this name)."""
INGRESS = " ingress"
"""The ingress itself among them: per-key limits are split among its replicas."""


def _coerce(request: R | dict[str, Any], model: type[R]) -> R:
    """Handle callers may pass the pydantic request or a plain dict in the OpenAI shape."""
    if isinstance(request, model):
        return request
    try:
        return model.model_validate(request)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def _serve_details() -> dict[str, Any]:
    """Serve's instance details from its controller (empty before Serve runs)."""
    client = _get_global_client(raise_if_no_controller_running=False)
    return {} if client is None else client.get_serve_details()


def _dead_tier(exc: BaseException) -> str | None:
    """Why a failed poll means the tier cannot serve, or None if it may just be slow."""
    error = tier_error(exc, "")
    return str(error) if isinstance(error, ServiceUnavailable) else None


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
        auth = config.auth
        store = open_store(auth, model_cache) if auth.enabled else None
        self.access = Access(auth, store)
        self.metrics = IngressMetrics()
        audit_log = None
        if auth.audit:
            audit_log = auth.audit_log or str(store_path(auth, model_cache).with_name("audit.jsonl"))
        self.auditor = Auditor(audit_log, store.server_secret if store is not None else None, self.metrics.by_key)
        Gate.access, Gate.auditor = self.access, self.auditor
        if not auth.enabled:
            logger.warning(
                "auth is off (ingress.auth.enabled: false): anyone who can reach this service may use "
                "every tier and index, read /v1/tiers and spend without limit; turn it on before "
                "exposing the port (docs/security.md)"
            )
        self.directory = TierDirectory(tiers, config.default_tier)
        self.handles = handles
        self.created = int(time.time())
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
        self.pipeline = Pipeline(
            config=config,
            directory=self.directory,
            router=self.router,
            retrieval=self.retrieval,
            safety=self.safety,
            metrics=self.metrics,
            start_tier=TierHandles(handles).stream,
            request_id=request_id,
            access=self.access,
        )
        self.status = TierStatus(self.directory, handles, self.router.states, config.health_timeout_s)
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
        if self.access.store is not None:
            self._pollers.append(loop.create_task(self._refresh_keys()))

    async def _refresh_keys(self) -> None:
        """Reread the key store (revocations, budgets) and record this replica's spending."""
        while True:
            await self.access.refresh()
            await asyncio.sleep(self.config.auth.refresh_s)

    async def _watch_replicas(self) -> None:
        """Feed Serve's count of each tier's replicas to the router (`tierserve.router.replicas`)."""
        context = serve.get_replica_context()
        app_name = context.app_name
        deployments = {tier: handle.deployment_name for tier, handle in self.handles.items()}
        retriever = self.retrieval.retriever
        watched = {**deployments, **({RETRIEVER: retriever.deployment_name} if retriever is not None else {})}
        watched[INGRESS] = context.deployment
        while True:
            try:
                details = await asyncio.to_thread(_serve_details)
            except Exception:
                logger.debug("reading Serve's status failed", exc_info=True)
            else:
                for name, replicas in tier_replicas(details, app_name, watched).items():
                    if name == INGRESS:
                        self.access.replicas = max(1, replicas.running)
                    elif name == RETRIEVER:
                        self.retrieval.replicas_seen(replicas.running)
                    else:
                        self.router.states.replicas_seen(name, replicas)
            waiting = self.router.states.without_replicas  # read again soon while a tier comes up
            await asyncio.sleep(self.router.config.poll_interval_s if waiting else self.config.replicas_poll_interval_s)

    # ----- Python handle API -------------------------------------------------------------
    # With auth on, each method takes the caller's API key as `api_key=` and applies the same
    # checks as the HTTP routes (typed errors: `Unauthenticated`, `PermissionDenied`,
    # `RateLimited`, `QuotaExceeded`); each call writes one audit line.

    @contextmanager
    def _caller(self, method: str, api_key: str | None) -> Iterator[tuple[Principal, AuditRecord]]:
        """A handle call's principal and audit line, written when the call ends."""
        record = AuditRecord(f"handle {method}", "handle")
        try:
            principal = self.access.authenticate(api_key, "handle")
            record.called_by(principal.key_id, principal.name)
            yield principal, record
            record.status = record.status or 200
        except TierServeError as exc:
            record.failed(exc.status_code, exc.code)
            raise
        except BaseException as exc:
            if not isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
                record.failed(500, "internal_error")
            raise
        finally:
            self.auditor.close(record)

    async def chat(self, request: ChatCompletionRequest | dict[str, Any], api_key: str | None = None) -> ChatCompletion:
        """A whole chat completion (`stream` is ignored). The `tierserve` extra field says which
        tier served it, why, and what it cost; an overloaded service raises `Overloaded`."""
        with request_span("tierserve.chat") as span, self._caller("chat", api_key) as (principal, audit):
            body = self._accept(_coerce(request, ChatCompletionRequest), audit)
            return await self._whole(body, ChatStreamFormatter, span, principal, audit)

    async def chat_stream(
        self, request: ChatCompletionRequest | dict[str, Any], api_key: str | None = None
    ) -> AsyncIterator[ChatCompletionChunk]:
        """A chat completion as `chat.completion.chunk` objects (call with `stream=True`)."""
        with request_span("tierserve.chat_stream") as span, self._caller("chat_stream", api_key) as (principal, audit):
            body = self._accept(_coerce(request, ChatCompletionRequest), audit)
            # Closed as this generator is (the caller cancelled, or went away): the tier's stream
            # and the engine's request end now, not when the garbage collector finds them.
            async with aclosing(await self._stream(body, ChatStreamFormatter, span, principal, audit)) as batches:
                async for batch in batches:
                    for item in batch:
                        yield item

    async def complete(self, request: CompletionRequest | dict[str, Any], api_key: str | None = None) -> Completion:
        """A whole text completion (`stream` is ignored)."""
        with request_span("tierserve.complete") as span, self._caller("complete", api_key) as (principal, audit):
            body = self._accept(_coerce(request, CompletionRequest), audit)
            return await self._whole(body, CompletionStreamFormatter, span, principal, audit)

    async def complete_stream(
        self, request: CompletionRequest | dict[str, Any], api_key: str | None = None
    ) -> AsyncIterator[Completion]:
        """A text completion as streamed `text_completion` objects (call with `stream=True`)."""
        with (
            request_span("tierserve.complete_stream") as span,
            self._caller("complete_stream", api_key) as (principal, audit),
        ):
            body = self._accept(_coerce(request, CompletionRequest), audit)
            async with aclosing(await self._stream(body, CompletionStreamFormatter, span, principal, audit)) as batches:
                async for batch in batches:
                    for item in batch:
                        yield item

    async def embeddings(
        self, request: EmbeddingRequest | dict[str, Any], api_key: str | None = None
    ) -> CreateEmbeddingResponse:
        """Vectors of the request's texts from the retriever's embedder (the model named
        `rag.embedder.model`; none without RAG)."""
        with request_span("tierserve.embeddings") as span, self._caller("embeddings", api_key) as (principal, audit):
            body = self._accept(_coerce(request, EmbeddingRequest), audit)
            with trace.use_span(span, end_on_exit=False):
                return await self.pipeline.embed(body, self._embedding_model(), principal, audit)

    def _embedding_model(self) -> str | None:
        """The id callers name the retriever's embedder by; None without RAG."""
        return self.retrieval.config.embedder.model if self.retrieval.retriever is not None else None

    async def list_models(self, api_key: str | None = None) -> list[Model]:
        """`auto`, every tier and the embedding model the caller's key may use, as OpenAI model objects."""
        with self._caller("list_models", api_key) as (principal, _):
            return self._models(principal)

    def _models(self, principal: Principal | None) -> list[Model]:
        ids = [*self.directory.model_ids(), *filter(None, [self._embedding_model()])]
        return [
            Model(id=m, object="model", created=self.created, owned_by="tierserve")
            for m in ids
            if principal is not None and principal.may_use(m)
        ]

    async def health(self, api_key: str | None = None) -> dict[str, str]:
        """Each tier's health: 'ok' or why it cannot serve now (a replica that restarts its
        engine passes Serve's health check but is not ready). Admin scope."""
        with self._caller("health", api_key) as (principal, _):
            principal.require_admin("each tier's health")
            return await self.status.health()

    async def tiers(self, api_key: str | None = None) -> list[dict[str, Any]]:
        """Each tier's info, counters (of the replica that answers), its replicas as Serve
        reports them and the router's view of it. A tier that does not answer within
        `health_timeout_s` (no running replica, say) is listed with `error` and no info. Admin scope."""
        with self._caller("tiers", api_key) as (principal, _):
            principal.require_admin("/v1/tiers")
            self._ensure_polling()
            return await self.status.tiers()

    async def indexes(self, api_key: str | None = None) -> list[dict[str, Any]]:
        """The retrieval indexes with their published version's manifest (none without RAG). Admin scope."""
        with self._caller("indexes", api_key) as (principal, _):
            principal.require_admin("/v1/indexes")
            return await self._indexes()

    async def _indexes(self) -> list[dict[str, Any]]:
        if self.retrieval.retriever is None:
            return []
        return await self.retrieval.indexes()

    # ----- HTTP routes (the `Gate` has checked the key and the admin scope) -------------

    @app.post(
        "/v1/chat/completions",
        responses={
            200: {"model": ChatCompletion, "content": {"text/event-stream": {}}, "description": "JSON, or SSE"},
            **error_responses(400, 401, 403, 404, 413, 429, 500, 503, 504),
        },
    )
    async def _http_chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._http_traced(request, body, ChatStreamFormatter)

    @app.post(
        "/v1/completions",
        responses={
            200: {"model": Completion, "content": {"text/event-stream": {}}, "description": "JSON, or SSE"},
            **error_responses(400, 401, 403, 404, 413, 429, 500, 503, 504),
        },
    )
    async def _http_complete(self, body: CompletionRequest, request: Request) -> Response:
        return await self._http_traced(request, body, CompletionStreamFormatter)

    @app.post(
        "/v1/embeddings",
        responses={
            200: {"model": CreateEmbeddingResponse},
            **error_responses(400, 401, 403, 404, 413, 429, 500, 503, 504),
        },
    )
    async def _http_embeddings(self, body: EmbeddingRequest, request: Request) -> Response:
        async def reply(span: trace.Span, principal: Principal, audit: AuditRecord) -> Response:
            result = await self.pipeline.embed(body, self._embedding_model(), principal, audit)
            return JSONResponse(result.model_dump(exclude_unset=True, warnings=False))

        return await self._http_in_span(request, body, reply)

    @app.get("/v1/models", responses=error_responses(401, 429, 500))
    async def _http_models(self, request: Request) -> JSONResponse:
        models = self._models(principal_of(request))
        return JSONResponse({"object": "list", "data": [m.model_dump(exclude_unset=True) for m in models]})

    @app.get("/v1/models/{model:path}", responses=error_responses(401, 404, 429, 500))
    async def _http_model(self, model: str, request: Request) -> JSONResponse:
        """One model as `/v1/models` lists it; 404 for one the caller may not use, as for one that does not exist."""
        found = next((m for m in self._models(principal_of(request)) if m.id == model), None)
        if found is None:
            raise ModelNotFound(f"The model {model[:256]!r} does not exist or you do not have access to it.", "model")
        return JSONResponse(found.model_dump(exclude_unset=True))

    @app.get("/v1/tiers", responses=error_responses(401, 403, 429, 500))
    async def _http_tiers(self) -> JSONResponse:
        self._ensure_polling()
        return JSONResponse({"object": "list", "data": await self.status.tiers()})

    @app.get("/v1/indexes", responses=error_responses(401, 403, 429, 500, 503, 504))
    async def _http_indexes(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": await self._indexes()})

    @app.get("/health", responses={503: {"description": "No tier can serve"}, **error_responses(500)})
    async def _http_health(self, request: Request) -> JSONResponse:
        """200 while at least one tier can serve (`status`: `ok`, or `degraded` with the tiers
        that cannot named), 503 when none can: what a load balancer should probe. With auth on,
        only a key with the admin scope is told which tiers: others get the status alone."""
        tiers = await self.status.health()
        serving = [name for name, state in tiers.items() if state == "ok"]
        status = "ok" if len(serving) == len(tiers) else ("degraded" if serving else "unavailable")
        principal = principal_of(request)
        body: dict[str, Any] = {"status": status}
        if principal is not None and principal.admin:
            body.update(serving=serving, tiers=tiers)
        return JSONResponse(body, status_code=200 if serving else 503)

    # ----- shared internals --------------------------------------------------------------

    def _accept(self, body: R, audit: AuditRecord) -> R:
        """The parsed request, noted on its audit line (model, prompt fingerprint)."""
        audit.model = body.model  # type: ignore[attr-defined]
        audit.prompt_sha256 = self.auditor.fingerprint(body)
        return body

    async def _http_traced(
        self, request: Request, body: ChatCompletionRequest | CompletionRequest, formatter: type[StreamFormatter]
    ) -> Response:
        """A chat or completion's reply (`_http_reply`) inside the request's span."""

        async def reply(span: trace.Span, principal: Principal, audit: AuditRecord) -> Response:
            return await self._http_reply(body, formatter, span, request.headers, principal, audit)

        return await self._http_in_span(request, body, reply)

    async def _http_in_span(
        self,
        request: Request,
        body: BaseModel,
        reply: Callable[[trace.Span, Principal, AuditRecord], Awaitable[Response]],
    ) -> Response:
        """`reply` inside the request's span, which a stream ends when it ends; the trace id
        goes back in the response headers, errors included."""
        route = getattr(request.scope.get("route"), "path", request.url.path)
        span = http_span(request.method, route, request.url.path, request.headers)
        headers = response_headers(span)
        audit = audit_of(request)
        principal = principal_of(request)
        if principal is None:  # the Gate lets no one unknown reach this route; fail closed if it did not run
            end_with_status(span, 401)
            return refused(request, Unauthenticated("no API key", None, "missing_api_key"), headers)
        self._accept(body, audit)
        try:
            with trace.use_span(span, end_on_exit=False):
                response = await reply(span, principal, audit)
        except TierServeError as exc:
            end_with_status(span, exc.status_code, exc)
            self.metrics.error(exc.code, exc.status_code)
            return refused(request, exc, headers)
        except Exception as exc:
            end_with_status(span, 500, exc)
            self.metrics.error("internal_error", 500)
            raise
        response.headers.update(headers)
        if isinstance(response, StreamingResponse):
            response.body_iterator = await primed(ending(response.body_iterator, span))
        else:
            end_with_status(span, response.status_code)
        return response

    async def _http_reply(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        formatter: type[StreamFormatter],
        span: trace.Span,
        headers: Any,
        principal: Principal,
        audit: AuditRecord,
    ) -> Response:
        """SSE for `stream: true` (opened before any header goes out, so errors before the
        first token are plain HTTP errors), else JSON; routing facts in the headers. The request
        headers may set the SLA fields the body did not (`with_headers`)."""
        self._ensure_polling()
        body = body.with_headers(headers)
        if body.stream:
            ctx, stream = await self.pipeline.stream(body, formatter, span, principal, audit)
            return StreamingResponse(sse(stream), media_type="text/event-stream", headers=ctx.headers())
        ctx, whole = await self.pipeline.whole(body, formatter, span, principal, audit)
        return JSONResponse(whole.model_dump(exclude_unset=True), headers=ctx.headers())

    async def _stream(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        formatter: type[StreamFormatter],
        span: trace.Span,
        principal: Principal,
        audit: AuditRecord,
    ) -> AsyncIterator[list[BaseModel]]:
        self._ensure_polling()
        return (await self.pipeline.stream(body, formatter, span, principal, audit))[1]

    async def _whole(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        formatter: type[StreamFormatter],
        span: trace.Span,
        principal: Principal,
        audit: AuditRecord,
    ) -> BaseModel:
        self._ensure_polling()
        return (await self.pipeline.whole(body, formatter, span, principal, audit))[1]
