"""One request from parse to last byte: the pipeline the ingress deployment wraps.

Plain Python, no Ray Serve: the ingress (`tierserve.router.ingress`) hands it parsed requests
from its HTTP routes and handle methods, and a function that starts a request on a tier (the
deployment's handle call). Each request's state is one `RequestContext`, which the steps'
results fill in. In order, for one request:

1. limits (`check_limits` in `router/protocol.py`), before anything is spent on it, and the
   caller's key (`Access.admit`: the tiers and indexes it may use, its rate limits and budget);
2. route (`Router.plan`): where it may go, its place reserved on the first choice, or shed at once;
3. input guards (`SafetyStep.check_input`), which may keep checking while 4-5 run;
4. retrieval (`RetrievalStep`), its passages guarded and added to the prompt;
5. generate (`Router.open`): the first choice that sends tokens, falling back before the first;
6. observe (`core.streams.observed`): the request's metrics, SLO and cost;
7. output guards (`SafetyStep.guard_output`), streamed redaction;
8. format (`router/responses.py`): OpenAI chunks, or one whole response, with the `tierserve` field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from openai.types import CreateEmbeddingResponse
from opentelemetry import trace
from pydantic import BaseModel

from tierserve.actors.types import GenerateRequest, TokenChunk
from tierserve.core.errors import ModelNotFound, PermissionDenied, TierServeError
from tierserve.core.streams import Outcome, StreamObserver, observed, outcome_of
from tierserve.rag.config import RetrievalOptions
from tierserve.rag.types import IndexUnavailable
from tierserve.router.access import ANONYMOUS, Access, Lease, Principal
from tierserve.router.audit import AuditRecord
from tierserve.router.config import IngressConfig
from tierserve.router.limits import check_limits
from tierserve.router.metrics import IngressMetrics
from tierserve.router.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from tierserve.router.responses import ChatStreamFormatter, CompletionBuilder, StreamFormatter, embeddings_response
from tierserve.router.retrieval_step import RetrievalStep, Retrieved, question_of
from tierserve.router.routing import Routed, Router
from tierserve.router.safety_step import ContentBlocked, SafetyReport, SafetyStep
from tierserve.router.tiers import AUTO, TierDirectory
from tierserve.router.tools import function_schemas
from tierserve.router.tracing import route_span

TierStarter = Callable[[str, GenerateRequest, trace.Span], AsyncIterator[list[TokenChunk]]]
"""Starts a request on the named tier and streams its batches of token chunks; leaving the
stream early cancels the tier's request."""


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclasses.dataclass
class RequestContext:
    """One request from parse to last byte: the one per-request object the pipeline's steps
    share. Its parts each have one writer: `routed` the router (`Router.plan`, `Router.open`),
    `retrieved` the retrieval step, `safety` the guard step; the pipeline reads them all for
    the response's headers and its `tierserve` field."""

    body: ChatCompletionRequest | CompletionRequest
    formatter: type[StreamFormatter]
    span: trace.Span
    """The request's span: routing, guard and retrieval spans are its children, and the
    tier's spans join its trace."""
    rid: str
    """The response's id (`chatcmpl-...`, `cmpl-...`)."""
    routed: Routed | None = None
    retrieval: RetrievalOptions | None = None
    """The retrieval the request asked for (or its route's default); None: none."""
    retrieved: Retrieved | None = None
    safety: SafetyReport = dataclasses.field(default_factory=SafetyReport)
    batches: AsyncIterator[list[TokenChunk]] | None = None
    """The tier's batches, observed and guarded, once the request has started on a tier."""
    principal: Principal = ANONYMOUS
    """Who is calling: the API key's id and policy."""
    outcome: Outcome | None = None
    """How the started request's stream ended, once it has."""

    @property
    def chat(self) -> bool:
        return self.formatter is ChatStreamFormatter

    @property
    def entry(self) -> str:
        """The entry point, as metrics label it: `chat` or `completion`."""
        return "chat" if self.chat else "completion"

    def headers(self) -> dict[str, str]:
        """What the response headers say about the request (its routing)."""
        assert self.routed is not None
        return self.routed.headers()


class Pipeline:
    """The request pipeline: one instance per ingress replica, shared by all its requests."""

    def __init__(
        self,
        *,
        config: IngressConfig,
        directory: TierDirectory,
        router: Router,
        retrieval: RetrievalStep,
        safety: SafetyStep,
        metrics: IngressMetrics,
        start_tier: TierStarter,
        request_id: Callable[[str], str] = new_request_id,
        access: Access | None = None,
    ):
        self.config = config
        self.access = access or Access(config.auth.model_copy(update={"enabled": False}), None)
        self.directory = directory
        self.router = router
        self.retrieval = retrieval
        self.safety = safety
        self.metrics = metrics
        self.start_tier = start_tier
        self.request_id = request_id

    async def stream(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        formatter: type[StreamFormatter],
        span: trace.Span,
        principal: Principal = ANONYMOUS,
        audit: AuditRecord | None = None,
    ) -> tuple[RequestContext, AsyncIterator[list[BaseModel]]]:
        """The request's context, and its answer as a stream of lists of OpenAI objects (the
        last object carries the `tierserve` field). Errors before the first token raise here."""
        ctx = await self._open(body, formatter, span, principal, audit)
        routed, retrieved, batches = ctx.routed, ctx.retrieved, ctx.batches
        assert routed is not None and batches is not None
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        fmt = formatter(ctx.rid, routed.tier or "", include_usage)

        async def formatted() -> AsyncIterator[list[BaseModel]]:
            answer: list[str] = []  # the first choice's text, for grounding
            waiting = True  # for the first text
            async with contextlib.aclosing(batches) as source:  # closed with this one
                async for batch in source:
                    items = [item for chunk in batch for item in fmt.format(chunk)]
                    if retrieved is not None:
                        answer += [chunk.text for chunk in batch if chunk.index == 0]
                    last = _is_last(batch)
                    if waiting and (last or _has_text(batch)):
                        waiting = False
                        self.router.first_token(routed, last, _held_steps(batch))
                    if items and last:
                        if retrieved is not None:
                            await self.retrieval.ground(retrieved, "".join(answer), routed.tier)
                        items[-1].tierserve = self._extension(ctx)
                    yield items

        return ctx, formatted()

    async def whole(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        formatter: type[StreamFormatter],
        span: trace.Span,
        principal: Principal = ANONYMOUS,
        audit: AuditRecord | None = None,
    ) -> tuple[RequestContext, BaseModel]:
        """The request's context, and its whole answer folded from the stream, with the
        `tierserve` field."""
        ctx = await self._open(body, formatter, span, principal, audit)
        routed, batches = ctx.routed, ctx.batches
        assert routed is not None and batches is not None
        built = CompletionBuilder(body.n)
        waiting = True  # for the first text
        async for batch in batches:
            if waiting and _has_text(batch):
                waiting = False
                self.router.first_token(routed, _is_last(batch), _held_steps(batch))
            for chunk in batch:
                built.add(chunk)
        if waiting:
            self.router.first_token(routed, True, 0)
        whole = built.chat(ctx.rid, routed.tier) if ctx.chat else built.completion(ctx.rid, routed.tier)
        if ctx.retrieved is not None:
            await self.retrieval.ground(ctx.retrieved, "".join(built.texts[0]), routed.tier)
        whole.tierserve = self._extension(ctx)
        return ctx, whole

    async def embed(
        self, body: EmbeddingRequest, model: str | None, principal: Principal, audit: AuditRecord
    ) -> CreateEmbeddingResponse:
        """An embeddings request: its limits, the caller's key, the retriever's embedder (`model`,
        the name callers use for it; None without RAG), the OpenAI response. Its tokens are
        charged to the key when the vectors come back."""
        check_limits(body, self.config.limits)  # before anything is spent on the request
        if body.model != model:
            hint = f"; use {model!r}" if model else " (retrieval is off, and with it embeddings)"
            raise ModelNotFound(f"no embedding model named {body.model!r}{hint}", "model")
        lease = self.access.admit(principal, body.model)
        audit.closers.append(lease.end)  # given back however the request ends
        embedded = await self.retrieval.embed(body.texts(), body.dimensions)
        lease.end(embedded.tokens)
        audit.prompt_tokens = embedded.tokens
        return embeddings_response(embedded, body.encoding_format)

    async def _plan(self, ctx: RequestContext) -> Routed:
        """Where the request may go, recorded on its span and in the metrics; shed at once if
        nowhere. The passages retrieval may add are counted at their most (top_k full chunks)
        for the context-length check."""
        body = ctx.body
        passage_tokens = 0
        if ctx.retrieval is not None:
            passage_tokens = (ctx.retrieval.top_k or 0) * (self.retrieval.config.chunking.max_tokens + 40)
        named = None if body.model == AUTO else self.directory.resolve(body.model)
        allowed = self._routable(ctx.principal)
        if isinstance(body, ChatCompletionRequest) and body.uses_tools():
            allowed = self.directory.serving_tools(allowed, named)
        routed = await self.router.plan(body, named, passage_tokens, allowed)
        decision = routed.decision
        route_span(ctx.span, body.model, routed)
        if not decision.choices:
            self.metrics.rejected(decision.reason, routed.sla.name)
            raise self.router.rejection(decision)
        self.metrics.decided(decision.choices[0].tier, decision.reason, routed.features.complexity)
        return routed

    def _routable(self, principal: Principal) -> set[str] | None:
        """The tiers `model: auto` may go to for this caller: the tiers its key names (None: all)."""
        named = {t for t in principal.policy.tiers or () if t != AUTO}
        if not named:
            return None
        routable = named & set(self.directory.tiers)
        if not routable:
            raise PermissionDenied("this API key may use no tier of this service", "model", "model_not_allowed")
        return routable

    async def _open(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        formatter: type[StreamFormatter],
        span: trace.Span,
        principal: Principal,
        audit: AuditRecord | None,
    ) -> RequestContext:
        """Route the request, guard its text, retrieve its passages if it uses retrieval (and
        guard those), and start it on the first tier that sends tokens (see `Router.open`)."""
        check_limits(body, self.config.limits)  # before anything is spent on the request
        ctx = RequestContext(body, formatter, span, self.request_id(formatter.id_prefix), principal=principal)
        lease = self.access.admit(principal, body.model)
        if audit is not None:
            audit.ctx = ctx
            # However the request ends, even with a stream never started: its place is given back.
            audit.closers.append(lease.end)
        try:
            ctx.retrieval = self.retrieval.options(body, "chat" if ctx.chat else "completions")
            index = ctx.retrieval.index if ctx.retrieval is not None else None
            if index is not None and not principal.may_read(index):
                if isinstance(body.retrieval, RetrievalOptions) and body.retrieval.index is not None:
                    raise IndexUnavailable.named(index)  # as if it did not exist
                # A default the caller did not name is not named back.
                raise IndexUnavailable("no index this API key may read serves this request", "retrieval")
            # Routed first, so an overloaded service sheds at once, before guards and retrieval.
            ctx.routed = await self._plan(ctx)
            try:
                await self._start(ctx, lease)
            finally:
                self.router.release(ctx.routed)  # the place `plan` held, if the request never started
        except BaseException:
            lease.end()
            raise
        return ctx

    async def _start(self, ctx: RequestContext, lease: Lease) -> None:
        """`_open` once routed: input guards, retrieval, and the tier's first tokens."""
        body, span, routed = ctx.body, ctx.span, ctx.routed
        assert routed is not None
        # The guards that only refuse keep checking while retrieval and prefill run; the
        # first token waits for them (`ready` below).
        guarded = await self.safety.check_input(body, ctx.safety, span)
        try:
            request = self.safety.apply_input(body.to_generate(ctx.rid), guarded)
            request.priority = routed.sla.priority
            if ctx.retrieval is not None:
                question = question_of(body, guarded.texts)
                began = self.router.clock()
                ctx.retrieved = await self.retrieval.retrieve(ctx.retrieval, question, span)
                hits = await self.safety.check_retrieved(ctx.retrieved.result.hits, ctx.safety, span)
                ctx.retrieved.result.hits = hits
                routed.retrieval_s = self.router.clock() - began
                request = self.retrieval.augment(request, ctx.retrieved)
            try:
                start = lambda tier: self.start_tier(tier, request, span)  # noqa: E731
                batches = await self.router.open(routed, start, guarded.passed)
            except TierServeError as exc:
                if not isinstance(exc, ContentBlocked):
                    self.metrics.finished(routed, ctx.entry, outcome_of(exc))
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
        observers = [self.metrics.request(routed, ctx.entry, self.router.cost), _Spent(ctx, lease, self.router.price)]
        watched = observed(batches, observers, started=routed.arrived)
        functions = function_schemas(body.tools) if isinstance(body, ChatCompletionRequest) else None
        ctx.batches = self.safety.guard_output(watched, ctx.safety, span, body.response_format, functions)

    def _extension(self, ctx: RequestContext) -> dict[str, Any]:
        """The response's `tierserve` field: routing facts, and retrieval's and the guards'
        when they ran."""
        assert ctx.routed is not None
        extension = ctx.routed.extension()
        if ctx.retrieved is not None:
            extension["retrieval"] = ctx.retrieved.extension()
        if self.safety.chain is not None:
            extension["safety"] = ctx.safety.extension()
        return extension


def _is_last(batch: list[TokenChunk]) -> bool:
    """Whether the batch ends the request (its usage, or the guards' refusal, is in it)."""
    return any(chunk.usage is not None or chunk.finish_reason == "content_filter" for chunk in batch)


def _has_text(batch: list[TokenChunk]) -> bool:
    """Whether the batch gives the caller any of the answer (text or a tool call)."""
    return any(chunk.text or chunk.tool_calls for chunk in batch)


def _held_steps(batch: list[TokenChunk]) -> int:
    """Engine steps after the tier's first that came before this batch could leave."""
    return max(chunk.step for chunk in batch) - 1


class _Spent(StreamObserver[list[TokenChunk]]):
    """The end of a started request: its outcome on the context, and its tokens and cost
    charged to its key (`Lease.end`, which also frees its place among the key's requests).
    A stream that ends early (the client left, the tier failed) carries no usage: it is charged
    the tokens generated so far and its prompt's estimated tokens, so leaving early does not
    escape the key's limits."""

    __slots__ = ("ctx", "lease", "price", "generated")

    def __init__(self, ctx: RequestContext, lease: Lease, price: Callable[[str, int, int], float]):
        self.ctx, self.lease, self.price = ctx, lease, price
        self.generated = 0

    def item(self, batch: list[TokenChunk], now: float) -> None:
        for chunk in batch:
            self.generated += len(chunk.token_ids)

    def end(self, outcome: Outcome, error: BaseException | None, elapsed_s: float) -> None:
        self.ctx.outcome = outcome
        routed = self.ctx.routed
        assert routed is not None
        if routed.usage is not None:
            prompt, completion = routed.usage.prompt_tokens, routed.usage.completion_tokens
        else:
            prompt, completion = routed.features.prompt_tokens, self.generated
        cost = self.price(routed.tier, prompt, completion) if routed.tier is not None else 0.0
        self.lease.end(prompt + completion, cost)
