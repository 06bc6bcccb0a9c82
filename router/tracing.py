"""The ingress's spans: one per request (HTTP or handle call) and the routing decision.

An HTTP request's span is `POST /v1/chat/completions` (kind SERVER, HTTP semantic-convention
attributes), a child of the client's `traceparent` when one came; a handle call's is
`tierserve.chat` (or `.complete`, ...). The routing decision is a short `route` span under it.
The tier's generation span then joins the same trace through the context `inject` puts into
the `GenerateRequest`, across the Ray boundary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from tierserve.core.telemetry import extract, tracer

if TYPE_CHECKING:
    from tierserve.router.routing import Routed

TRACE_ID_HEADER = "x-trace-id"
TRACE_RESPONSE_HEADER = "traceresponse"
"""W3C Trace Context level 2: `00-<trace id>-<span id>-<flags>` of the server's span."""


def error_type(exc: BaseException) -> str:
    """`error.type` of a failed request: the OpenAI error code when there is one, else the class."""
    return getattr(exc, "code", None) or type(exc).__name__


def http_span(method: str, route: str, path: str, headers: Mapping[str, str]) -> trace.Span:
    """The span of one HTTP request, continuing the client's trace when it sent `traceparent`.
    `route` is the route's template (`/v1/chat/completions`), `path` what the client asked for
    (with the application's route prefix)."""
    return tracer().start_span(
        f"{method} {route}",
        context=extract(headers),
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": method,
            "http.route": route,
            "url.path": path,
            "user_agent.original": headers.get("user-agent", ""),
        },
    )


@contextmanager
def request_span(name: str) -> Iterator[trace.Span]:
    """The request's span for an ingress method: the HTTP route's span when the route called it
    (the route ends it), else a new one for a handle call, ended here. Never made current, so
    it is safe across the yields of a streaming method."""
    current = trace.get_current_span()
    if current.is_recording():
        yield current
        return
    span = tracer().start_span(name, kind=SpanKind.SERVER)
    try:
        yield span
    except (GeneratorExit, asyncio.CancelledError):  # the caller left early
        span.set_attribute("tierserve.aborted", True)
        raise
    except Exception as exc:
        status = getattr(exc, "status_code", 500)
        span.set_attribute("error.type", error_type(exc))
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, str(exc)))
        raise
    finally:
        span.end()


def route_span(parent: trace.Span, requested: str, routed: Routed) -> None:
    """Record the routing decision as a `route` span under `parent`: the tiers in order, why
    the first, the complexity score, the budget and the first choice's predictions."""
    decision = routed.decision
    attributes: dict[str, Any] = {
        "tierserve.route.requested_model": requested,
        "tierserve.route.reason": decision.reason,
        "tierserve.route.candidates": [c.tier for c in decision.choices],
    }
    if decision.choices:
        first = decision.choices[0]
        attributes["tierserve.route.tier"] = first.tier
        if first.predicted_ttft_ms is not None:
            attributes["tierserve.route.predicted_ttft_ms"] = first.predicted_ttft_ms
        if first.predicted_tpot_ms is not None:
            attributes["tierserve.route.predicted_tpot_ms"] = first.predicted_tpot_ms
    if decision.target is not None:
        attributes["tierserve.route.target_tier"] = decision.target
    if routed.features.complexity is not None:
        attributes["tierserve.route.complexity"] = routed.features.complexity
    if routed.sla.name is not None:
        attributes["tierserve.route.sla_class"] = routed.sla.name
    attributes["tierserve.route.priority"] = routed.sla.priority
    if decision.refused:
        attributes["tierserve.route.refused"] = [f"{t}:{why}" for t, why in decision.refused.items()]
    span = tracer().start_span("route", context=trace.set_span_in_context(parent), attributes=attributes)
    span.end()


def response_headers(span: trace.Span) -> dict[str, str]:
    """Headers that give the client the trace id (and the server span) of its request."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return {}
    trace_id = trace.format_trace_id(ctx.trace_id)
    return {
        TRACE_ID_HEADER: trace_id,
        TRACE_RESPONSE_HEADER: f"00-{trace_id}-{trace.format_span_id(ctx.span_id)}-{int(ctx.trace_flags):02x}",
    }


def end_with_status(span: trace.Span, status_code: int, error: BaseException | None = None) -> None:
    """End a request's span; 5xx marks it failed (a 4xx is the client's error, not the server's)."""
    span.set_attribute("http.response.status_code", status_code)
    if error is not None:
        span.set_attribute("error.type", error_type(error))
    if status_code >= 500:
        span.set_status(Status(StatusCode.ERROR, f"HTTP {status_code}"))
    span.end()
