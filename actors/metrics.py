"""A tier's Prometheus metrics, through Ray's metrics pipeline.

Each replica records with `ray.util.metrics`; Ray's per-node agent serves them in Prometheus's
text format on the node's metrics export port (`ray start --metrics-export-port`, or
`ray.metrics_export_port` in the tierserve config for a local cluster), next to Ray Serve's own
`ray_serve_*` metrics. Ray adds the `ray_` prefix and labels for the node and the process.

Per request (from the token stream, as the tier sees it): time to first token, time between
engine outputs, time per output token, duration by outcome, input and output tokens. Per tier
(sampled from the engine once per `SAMPLE_PERIOD_S`): running and waiting requests, speculative
draft and accepted tokens, and adaptive speculation's k and payoff per batch-size bucket.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tierserve.actors.types import TierStats, TokenChunk
from tierserve.core.streams import Outcome, StreamObserver
from tierserve.core.telemetry import LATENCY_BUCKETS

SAMPLE_PERIOD_S = 1.0


class TierMetrics:
    """The instruments of one tier replica (tag `tier` on every series)."""

    def __init__(self, tier: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        def histogram(name: str, description: str, *tags: str) -> Any:
            return Histogram(name, description, boundaries=LATENCY_BUCKETS, tag_keys=("tier", *tags))

        self.tier = tier
        self.ttft = histogram(
            "tierserve_tier_time_to_first_token_seconds", "From the request reaching the tier to its first token."
        )
        self.itl = histogram(
            "tierserve_inter_token_latency_seconds", "Time between consecutive engine outputs of a request."
        )
        self.tpot = histogram(
            "tierserve_time_per_output_token_seconds", "A request's decode time per output token after the first."
        )
        self.duration = histogram(
            "tierserve_tier_request_duration_seconds",
            "A request's time in the tier, by outcome (finished, rejected, failed, cancelled).",
            "outcome",
        )
        self.tokens = Counter(
            "tierserve_tokens", "Prompt (input) and generated (output) tokens.", tag_keys=("tier", "kind")
        )
        self.running = Gauge("tierserve_running_requests", "Requests the engine is decoding.", tag_keys=("tier",))
        self.waiting = Gauge(
            "tierserve_waiting_requests", "Requests queued in the engine for a slot.", tag_keys=("tier",)
        )
        self.draft_tokens = Counter(
            "tierserve_speculation_draft_tokens", "Tokens drafted for verification.", tag_keys=("tier",)
        )
        self.accepted_tokens = Counter(
            "tierserve_speculation_accepted_tokens", "Drafted tokens the target accepted.", tag_keys=("tier",)
        )
        self.spec_k = Gauge(
            "tierserve_speculation_k",
            "Adaptive speculation: k in force per batch-size bucket.",
            tag_keys=("tier", "batch_sizes"),
        )
        self.spec_payoff = Gauge(
            "tierserve_speculation_payoff",
            "Adaptive speculation: speculating / plain speed per bucket.",
            tag_keys=("tier", "batch_sizes"),
        )
        self._last: TierStats | None = None

    def _tags(self, **more: str) -> dict[str, str]:
        return {"tier": self.tier, **more}

    def request(self) -> StreamObserver[TokenChunk]:
        """An observer of one request's chunk stream (`core.streams.observed`): TTFT, gaps between
        outputs, TPOT, duration by outcome, tokens."""
        return _RequestMetrics(self)

    def sample(self, stats: TierStats, waiting: int) -> None:
        """Engine-level series from the replica's counters (called every SAMPLE_PERIOD_S)."""
        tags = self._tags()
        self.running.set(stats.running, tags)
        self.waiting.set(waiting, tags)
        spec, before = stats.speculation, self._last.speculation if self._last else None
        if spec is not None:
            drafted = spec.draft_tokens - (before.draft_tokens if before else 0)
            accepted = spec.accepted_tokens - (before.accepted_tokens if before else 0)
            if drafted > 0:
                self.draft_tokens.inc(drafted, tags)
            if accepted > 0:
                self.accepted_tokens.inc(accepted, tags)
        for bucket in stats.speculation_control or []:
            sizes = self._tags(batch_sizes=f"{bucket.first_batch_size}-{bucket.last_batch_size}")
            self.spec_k.set(bucket.num_speculative_tokens, sizes)
            if bucket.payoff is not None:
                self.spec_payoff.set(bucket.payoff, sizes)
        self._last = stats


async def sample_forever(metrics: TierMetrics, engine: Any) -> None:
    """The replica's sampling loop: engine counters into `metrics`, once per SAMPLE_PERIOD_S."""
    while True:
        metrics.sample(engine.stats(), engine.waiting())
        await asyncio.sleep(SAMPLE_PERIOD_S)


class _RequestMetrics(StreamObserver[TokenChunk]):
    """One request's series, recorded as its chunks arrive and when its stream ends."""

    __slots__ = ("metrics", "tags", "first_at", "last_at", "output")

    def __init__(self, metrics: TierMetrics):
        self.metrics = metrics
        self.tags = metrics._tags()
        self.first_at: float | None = None
        self.last_at = 0.0
        self.output = 0

    def first(self, ttft_s: float) -> None:
        self.metrics.ttft.observe(ttft_s, self.tags)

    def item(self, chunk: TokenChunk, now: float) -> None:
        if self.first_at is None:
            self.first_at = now
        else:
            self.metrics.itl.observe(now - self.last_at, self.tags)
        self.last_at = now
        self.output += len(chunk.token_ids)
        if chunk.usage is not None:
            self.metrics.tokens.inc(chunk.usage.prompt_tokens, self.metrics._tags(kind="input"))

    def end(self, outcome: Outcome, error: BaseException | None, elapsed_s: float) -> None:
        metrics = self.metrics
        metrics.duration.observe(elapsed_s, metrics._tags(outcome=outcome.value))
        if self.output:
            metrics.tokens.inc(self.output, metrics._tags(kind="output"))
        if self.first_at is not None and self.output > 1:
            metrics.tpot.observe((self.last_at - self.first_at) / (self.output - 1), self.tags)
