"""The ingress's Prometheus metrics (through Ray's metrics pipeline, like the tiers'; see
`tierserve.actors.metrics`): requests by tier, entry point and outcome, end-to-end latency and
time to first token as the ingress sees them, routing decisions with their reason, and errors
by OpenAI error code. Fallbacks, load shedding and SLO goodput come with the SLA router."""

from __future__ import annotations

from typing import Any

from tierserve.actors.metrics import LATENCY_BUCKETS


class IngressMetrics:
    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        self.requests: Any = Counter(
            "tierserve_requests", "Requests by tier, entry point and outcome.", tag_keys=("tier", "entry", "outcome")
        )
        self.duration: Any = Histogram(
            "tierserve_request_duration_seconds",
            "End-to-end request latency at the ingress (a stream: until its last event).",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("tier", "entry"),
        )
        self.ttft: Any = Histogram(
            "tierserve_time_to_first_token_seconds",
            "From the request reaching the ingress to its first tokens arriving there.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("tier",),
        )
        self.routing: Any = Counter(
            "tierserve_routing_decisions", "Tier chosen per request, and why.", tag_keys=("tier", "reason")
        )
        self.errors: Any = Counter(
            "tierserve_errors", "Error responses by OpenAI error code and HTTP status.", tag_keys=("code", "status")
        )

    def error(self, code: str | None, status: int) -> None:
        self.errors.inc(1, {"code": code or "unknown", "status": str(status)})
