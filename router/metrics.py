"""The ingress's Prometheus metrics (through Ray's metrics pipeline, like the tiers'; see
`tierserve.actors.metrics`): requests by tier, entry point and outcome, end-to-end latency and
time to first token as the ingress sees them, routing decisions with their reason, and errors
by OpenAI error code; and the router's: decisions per tier and reason, complexity scores,
fallbacks, shed requests, SLO outcomes per SLA class (goodput) and estimated cost per tier."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from tierserve.core.telemetry import LATENCY_BUCKETS

if TYPE_CHECKING:
    from tierserve.router.routing import Routed


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

        self.complexity: Any = Histogram(
            "tierserve_prompt_complexity",
            "Complexity scores of `model: auto` prompts.",
            boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
            tag_keys=("tier",),
        )
        self.fallbacks: Any = Counter(
            "tierserve_fallbacks",
            "Tiers given up on before their first token (the request moved to its next choice), by error code.",
            tag_keys=("tier", "code"),
        )
        self.rejections: Any = Counter(
            "tierserve_rejections",
            "Requests shed before any tier ran them: overloaded (429) or unavailable (503).",
            tag_keys=("reason", "sla_class"),
        )
        self.slo: Any = Counter(
            "tierserve_slo_requests",
            "Requests by SLA class and outcome: met, missed_ttft, missed_tpot, rejected, failed, cancelled.",
            tag_keys=("sla_class", "tier", "outcome"),
        )
        self.cost: Any = Counter(
            "tierserve_estimated_cost", "Estimated cost of served requests, from the tiers' prices.", tag_keys=("tier",)
        )

    def decided(self, tier: str, reason: str, complexity: float | None) -> None:
        self.routing.inc(1, {"tier": tier, "reason": reason})
        if complexity is not None:
            self.complexity.observe(complexity, {"tier": tier})

    def rejected(self, reason: str, sla_class: str | None) -> None:
        sla = sla_class or "none"
        self.rejections.inc(1, {"reason": reason, "sla_class": sla})
        self.slo.inc(1, {"sla_class": sla, "tier": "none", "outcome": "rejected"})

    def finished(self, routed: Routed, outcome: str) -> None:
        """Count the request's SLO outcome and cost once it ended (`outcome`: ok, failed, cancelled)."""
        tier = routed.tier or "none"
        if outcome == "ok":
            ttft, tpot = routed.ttft_ms(), routed.tpot_ms(time.perf_counter())
            if not routed.sla.met_by(ttft, None):
                outcome = "missed_ttft"
            elif not routed.sla.met_by(None, tpot):
                outcome = "missed_tpot"
            else:
                outcome = "met"
        self.slo.inc(1, {"sla_class": routed.sla.name or "none", "tier": tier, "outcome": outcome})
        if routed.cost:
            self.cost.inc(routed.cost, {"tier": tier})

    def error(self, code: str | None, status: int) -> None:
        self.errors.inc(1, {"code": code or "unknown", "status": str(status)})
