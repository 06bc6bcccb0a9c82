"""The ingress's Prometheus metrics (through Ray's metrics pipeline, like the tiers'; see
`tierserve.actors.metrics`): requests by tier, entry point and outcome, end-to-end latency and
time to first token as the ingress sees them, routing decisions with their reason, and errors
by OpenAI error code; and the router's: decisions per tier and reason, complexity scores,
fallbacks, shed requests, SLO outcomes per SLA class (goodput) and estimated cost per tier."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tierserve.actors.types import TokenChunk
from tierserve.core.streams import Outcome, StreamObserver
from tierserve.core.telemetry import LATENCY_BUCKETS

if TYPE_CHECKING:
    from tierserve.router.routing import Routed


class IngressMetrics:
    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        self.requests: Any = Counter(
            "tierserve_requests",
            "Requests by the tier that served them, entry point and outcome (finished, rejected, failed, cancelled).",
            tag_keys=("tier", "entry", "outcome"),
        )
        self.duration: Any = Histogram(
            "tierserve_request_duration_seconds",
            "Request latency at the ingress, from its routing decision to the end of its answer.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("tier", "entry"),
        )
        self.ttft: Any = Histogram(
            "tierserve_time_to_first_token_seconds",
            "From the request's routing decision in the ingress to its first tokens there, guards passed.",
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
            "Requests by SLA class and outcome: met, missed_ttft, missed_tpot (finished), rejected, failed, cancelled.",
            tag_keys=("sla_class", "tier", "outcome"),
        )
        self.cost: Any = Counter(
            "tierserve_estimated_cost", "Estimated cost of served requests, from the tiers' prices.", tag_keys=("tier",)
        )

        self.key_requests: Any = Counter(
            "tierserve_key_requests",
            "Requests by API key id (`none`: no valid key, or auth off) and HTTP status.",
            tag_keys=("key_id", "status"),
        )
        self.key_tokens: Any = Counter(
            "tierserve_key_tokens", "Tokens by API key id: prompt or completion.", tag_keys=("key_id", "kind")
        )
        self.key_cost: Any = Counter(
            "tierserve_key_cost", "Estimated cost by API key id, from the tiers' prices.", tag_keys=("key_id",)
        )
        self.key_refusals: Any = Counter(
            "tierserve_key_refusals",
            "Requests refused (4xx/5xx) by API key id and error code: invalid_api_key, rate_limit_exceeded, "
            "insufficient_quota, model_not_allowed, overloaded, ...",
            tag_keys=("key_id", "code"),
        )

    def decided(self, tier: str, reason: str, complexity: float | None) -> None:
        self.routing.inc(1, {"tier": tier, "reason": reason})
        if complexity is not None:
            self.complexity.observe(complexity, {"tier": tier})

    def rejected(self, reason: str, sla_class: str | None) -> None:
        sla = sla_class or "none"
        self.rejections.inc(1, {"reason": reason, "sla_class": sla})
        self.slo.inc(1, {"sla_class": sla, "tier": "none", "outcome": "rejected"})

    def request(self, routed: Routed, entry: str, price: Callable[[Routed], float]) -> StreamObserver[list[TokenChunk]]:
        """An observer of a started request's batches (`core.streams.observed`, started at
        `routed.arrived`): its usage, priced by `price` when it arrives, and `finished` at the end."""
        return _RequestMetrics(self, routed, entry, price)

    def finished(self, routed: Routed, entry: str, outcome: Outcome, elapsed_s: float | None = None) -> None:
        """Count a request once it ended: by tier, entry and outcome; its latency and time to
        first token (`Routed.ttft_ms`, measured once by the router); its SLO outcome (finished
        ones as met, missed_ttft or missed_tpot) and its cost."""
        tier = routed.tier or "none"
        self.requests.inc(1, {"tier": tier, "entry": entry, "outcome": outcome.value})
        if elapsed_s is not None:
            self.duration.observe(elapsed_s, {"tier": tier, "entry": entry})
        ttft = routed.ttft_ms()
        if ttft is not None:
            self.ttft.observe(ttft / 1e3, {"tier": tier})
        slo = outcome.value
        if outcome is Outcome.FINISHED:
            tpot = routed.tpot_ms(time.perf_counter())
            if not routed.sla.met_by(ttft, None):
                slo = "missed_ttft"
            elif not routed.sla.met_by(None, tpot):
                slo = "missed_tpot"
            else:
                slo = "met"
        self.slo.inc(1, {"sla_class": routed.sla.name or "none", "tier": tier, "outcome": slo})
        if routed.cost:
            self.cost.inc(routed.cost, {"tier": tier})

    def by_key(self, line: dict[str, Any]) -> None:
        """Count one request's audit line (`tierserve.router.audit`) under its key id (never the key)."""
        key = line.get("key_id") or "none"
        status = line.get("status")
        self.key_requests.inc(1, {"key_id": key, "status": str(status)})
        if status is not None and status >= 400:
            self.key_refusals.inc(1, {"key_id": key, "code": line.get("code") or str(status)})
        for kind in ("prompt", "completion"):
            if line.get(f"{kind}_tokens"):
                self.key_tokens.inc(line[f"{kind}_tokens"], {"key_id": key, "kind": kind})
        if line.get("cost"):
            self.key_cost.inc(line["cost"], {"key_id": key})

    def error(self, code: str | None, status: int) -> None:
        self.errors.inc(1, {"code": code or "unknown", "status": str(status)})


class _RequestMetrics(StreamObserver[list[TokenChunk]]):
    """One started request: its usage and cost as they arrive, its counts when it ends."""

    __slots__ = ("metrics", "routed", "entry", "price")

    def __init__(self, metrics: IngressMetrics, routed: Routed, entry: str, price: Callable[[Routed], float]):
        self.metrics, self.routed, self.entry, self.price = metrics, routed, entry, price

    def item(self, batch: list[TokenChunk], now: float) -> None:
        for chunk in batch:
            if chunk.usage is not None:
                self.routed.usage = chunk.usage
                self.routed.cost = self.price(self.routed)

    def end(self, outcome: Outcome, error: BaseException | None, elapsed_s: float) -> None:
        self.metrics.finished(self.routed, self.entry, outcome, elapsed_s)
