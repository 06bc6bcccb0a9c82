"""One request from parse to last byte: the pipeline the ingress deployment wraps.

Plain Python, no Ray Serve: the ingress (`tierserve.router.ingress`) hands it parsed requests
from its HTTP routes and handle methods, and a function that starts a request on a tier (the
deployment's handle call). In order, for one request:

1. limits (`router/limits.py`), before anything is spent on it;
2. route (`Router.plan`): where it may go, its place reserved on the first choice, or shed at once;
3. input guards (`SafetyStep.check_input`), which may keep checking while 4-5 run;
4. retrieval (`RetrievalStep`), its passages guarded and added to the prompt;
5. generate (`Router.open`): the first choice that sends tokens, falling back before the first;
6. observe (`core.streams.observed`): the request's metrics, SLO and cost;
7. output guards (`SafetyStep.guard_output`), streamed redaction;
8. format (`router/responses.py`): OpenAI chunks, or one whole response, with the `tierserve` field.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from opentelemetry import trace
from pydantic import BaseModel

from tierserve.actors.types import GenerateRequest, TokenChunk
from tierserve.core.errors import TierServeError
from tierserve.core.streams import observed, outcome_of
from tierserve.router.config import IngressConfig
from tierserve.router.limits import check_limits
from tierserve.router.metrics import IngressMetrics
from tierserve.router.protocol import ChatCompletionRequest, CompletionRequest
from tierserve.router.responses import ChatStreamFormatter, CompletionBuilder, StreamFormatter
from tierserve.router.retrieval_step import RetrievalStep, Retrieved, question_of
from tierserve.router.routing import Routed, Router
from tierserve.router.safety_step import ContentBlocked, SafetyReport, SafetyStep
from tierserve.router.tiers import AUTO, TierDirectory
from tierserve.router.tracing import route_span

TierStarter = Callable[[str, GenerateRequest, trace.Span], AsyncIterator[list[TokenChunk]]]
"""Starts a request on the named tier and streams its batches of token chunks; leaving the
stream early cancels the tier's request."""


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclasses.dataclass
class Opened:
    """A request on its way: where it went, its id, its (guarded) batches, what it retrieved
    and what the guards did."""

    routed: Routed
    rid: str
    batches: AsyncIterator[list[TokenChunk]]
    retrieved: Retrieved | None
    safety: SafetyReport


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
    ):
        self.config = config
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
    ) -> tuple[Routed, AsyncIterator[list[BaseModel]]]:
        """The request routed, and its answer as a stream of lists of OpenAI objects (the last
        object carries the `tierserve` field). Errors before the first token raise here."""
        opened = await self._open(body, formatter, span)
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

    async def whole(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        formatter: type[StreamFormatter],
        span: trace.Span,
    ) -> tuple[Routed, BaseModel]:
        """The request routed, and its whole answer folded from the stream, with the `tierserve`
        field."""
        opened = await self._open(body, formatter, span)
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

    async def _plan(
        self, body: ChatCompletionRequest | CompletionRequest, span: trace.Span, extra_tokens: int = 0
    ) -> Routed:
        """Where the request may go, recorded on its span and in the metrics; shed at once if
        nowhere."""
        named = None if body.model == AUTO else self.directory.resolve(body.model)
        routed = await self.router.plan(body, named, extra_tokens)
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
    ) -> Opened:
        """Route the request, guard its text, retrieve its passages if it uses retrieval (and
        guard those), and start it on the first tier that sends tokens (see `Router.open`)."""
        check_limits(body, self.config.limits)  # before anything is spent on the request
        report = SafetyReport()
        options = self.retrieval.options(body, "chat" if formatter is ChatStreamFormatter else "completions")
        # Routed first, so an overloaded service sheds at once, before guards and retrieval;
        # the passages' tokens are counted at their most (top_k full chunks) for the context check.
        passage_tokens = (options.top_k or 0) * (self.retrieval.config.chunking.max_tokens + 40) if options else 0
        routed = await self._plan(body, span, passage_tokens)
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
            rid = self.request_id(formatter.id_prefix)
            request = self.safety.apply_input(body.to_generate(rid), guarded)
            request.priority = routed.sla.priority
            retrieved = None
            if options is not None:
                retrieved = await self.retrieval.retrieve(options, question, span)
                retrieved.result.hits = await self.safety.check_retrieved(retrieved.result.hits, report, span)
                request = self.retrieval.augment(request, retrieved)
            entry = "chat" if request.messages is not None else "completion"
            try:
                start = lambda tier: self.start_tier(tier, request, span)  # noqa: E731
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
