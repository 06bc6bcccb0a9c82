"""A tier's spans: the generation span (OpenTelemetry GenAI conventions) and one span per token.

The generation span is named `{operation} {tier}` (`chat quality`, `text_completion small`) and
joins the caller's trace through the W3C context the ingress puts in
`GenerateRequest.trace_context`. Under it, each generated token gets a `token` span that runs
from the previous token's arrival to its own, so a trace waterfall shows the decode rhythm:

- `tierserve.token.index`, `tierserve.token.choice`, `tierserve.token.id`;
- `tierserve.token.gap_ms`: time since the previous token of the same choice (or since the
  request reached the tier, for the first);
- `tierserve.token.step`: the engine step that produced it (1 = the first step that gave this
  request tokens);
- `tierserve.token.speculative`: True for accepted draft tokens, which arrive together with
  the target's own token in one verify step (every token of a step but its last);
- `tierserve.token.text` only with `telemetry.token_text: true`.

Token spans are made as the tokens arrive, from timestamps taken then (not with the span API's
clock), and can be thinned to one in N tokens or turned off (`telemetry.token_spans`). With
tracing off every call here is on the OpenTelemetry API's no-op tracer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from tierserve.actors.types import GenerateRequest, TokenChunk, Usage
from tierserve.core.streams import Outcome, StreamObserver
from tierserve.core.telemetry import extract, tracer

PROVIDER = "tierserve"


def operation_name(request: GenerateRequest) -> str:
    return "chat" if request.messages is not None else "text_completion"


def request_attributes(request: GenerateRequest, tier: str, model: str) -> dict[str, object]:
    """GenAI request attributes (semantic conventions for generative AI spans)."""
    s = request.sampling
    attributes: dict[str, object] = {
        "gen_ai.operation.name": operation_name(request),
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": tier,
        "gen_ai.response.model": model,
        "gen_ai.response.id": request.request_id,
        "gen_ai.request.temperature": s.temperature,
        "gen_ai.request.top_p": s.top_p,
        "gen_ai.request.choice.count": s.n,
        "tierserve.tier": tier,
    }
    if s.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = s.max_tokens
    if s.top_k:
        attributes["gen_ai.request.top_k"] = s.top_k
    if s.seed is not None:
        attributes["gen_ai.request.seed"] = s.seed
    if s.stop:
        attributes["gen_ai.request.stop_sequences"] = list(s.stop)
    if s.presence_penalty:
        attributes["gen_ai.request.presence_penalty"] = s.presence_penalty
    if s.frequency_penalty:
        attributes["gen_ai.request.frequency_penalty"] = s.frequency_penalty
    return attributes


def usage_attributes(usage: Usage) -> dict[str, object]:
    attributes: dict[str, object] = {
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
    }
    spec = usage.speculation
    if spec is not None:
        attributes.update(
            {
                "tierserve.speculation.method": spec.method,
                "tierserve.speculation.draft_tokens": spec.draft_tokens,
                "tierserve.speculation.accepted_tokens": spec.accepted_tokens,
                "tierserve.speculation.acceptance_rate": spec.acceptance_rate,
                "tierserve.speculation.mean_accepted_length": spec.mean_accepted_length,
            }
        )
    return attributes


class TokenSpans:
    """Makes the token spans of one request under `parent`, one in `every` tokens (0: none)."""

    def __init__(
        self,
        parent: trace.Span,
        every: int,
        speculating: bool,
        decode: Callable[[int], str] | None,
        started_ns: int,
        otel_tracer: trace.Tracer | None = None,
    ):
        self._context = trace.set_span_in_context(parent)
        self._every = every
        self._speculating = speculating
        self._decode = decode
        self._started_ns = started_ns
        self._last_ns: dict[int, int] = {}
        self._count: dict[int, int] = {}
        self._tracer = otel_tracer or tracer()
        self.made = 0

    def add(self, chunk: TokenChunk, now_ns: int) -> None:
        """The tokens of one engine step for one choice, which arrived at `now_ns`."""
        previous = self._last_ns.get(chunk.index, self._started_ns)
        self._last_ns[chunk.index] = now_ns
        first_index = self._count.get(chunk.index, 0)
        self._count[chunk.index] = first_index + len(chunk.token_ids)
        if not self._every:
            return
        last = len(chunk.token_ids) - 1
        for i, token_id in enumerate(chunk.token_ids):
            index = first_index + i
            if index % self._every:
                continue
            start = previous if i == 0 else now_ns
            attributes: dict[str, object] = {
                "tierserve.token.index": index,
                "tierserve.token.choice": chunk.index,
                "tierserve.token.id": token_id,
                "tierserve.token.gap_ms": (now_ns - start) / 1e6,
                "tierserve.token.step": chunk.step,
                "tierserve.token.speculative": self._speculating and i < last,
            }
            if self._decode is not None:
                attributes["tierserve.token.text"] = self._decode(token_id)
            span = self._tracer.start_span(
                "token", context=self._context, kind=SpanKind.INTERNAL, start_time=start, attributes=attributes
            )
            span.end(end_time=now_ns)
            self.made += 1


class GenerationSpan(StreamObserver[TokenChunk]):
    """The request's generation span with its token spans, as an observer of its chunk stream
    (`core.streams.observed`). The span starts when this is made and ends with the stream:
    finished (usage and finish reasons recorded), failed or rejected (status ERROR,
    `error.type`), or cancelled by the caller (`tierserve.aborted`)."""

    __slots__ = ("span", "tokens", "finish_reasons")

    def __init__(
        self,
        request: GenerateRequest,
        tier: str,
        model: str,
        *,
        token_every: int,
        speculating: bool,
        decode: Callable[[int], str] | None = None,
        otel_tracer: trace.Tracer | None = None,
    ):
        started_ns = time.time_ns()
        otel_tracer = otel_tracer or tracer()
        self.span = otel_tracer.start_span(
            f"{operation_name(request)} {tier}",
            context=extract(request.trace_context),
            kind=SpanKind.SERVER,
            start_time=started_ns,
            attributes=request_attributes(request, tier, model),
        )
        self.tokens = TokenSpans(self.span, token_every, speculating, decode, started_ns, otel_tracer)
        self.finish_reasons: dict[int, str] = {}

    def first(self, ttft_s: float) -> None:
        self.span.add_event("first_token", timestamp=time.time_ns())

    def item(self, chunk: TokenChunk, now: float) -> None:
        self.tokens.add(chunk, time.time_ns())
        if chunk.finish_reason is not None:
            self.finish_reasons[chunk.index] = chunk.finish_reason
        if chunk.usage is not None:
            self.span.set_attributes(usage_attributes(chunk.usage))

    def end(self, outcome: Outcome, error: BaseException | None, elapsed_s: float) -> None:
        span = self.span
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, str(error)))
            span.set_attribute("error.type", type(error).__name__)
        if self.finish_reasons:
            span.set_attribute(
                "gen_ai.response.finish_reasons", [self.finish_reasons[i] for i in sorted(self.finish_reasons)]
            )
        if outcome is Outcome.CANCELLED:
            span.set_attribute("tierserve.aborted", True)
        span.set_attribute("tierserve.token_spans", self.tokens.made)
        span.end()


def generation_span(request: GenerateRequest, tier: str, model: str, **options: Any) -> GenerationSpan | None:
    """The request's `GenerationSpan`, or None when tracing is off (its span would not record),
    so that an untraced stream costs nothing per token. `options`: `GenerationSpan`'s."""
    observer = GenerationSpan(request, tier, model, **options)
    if observer.span.is_recording():
        return observer
    observer.span.end()
    return None
