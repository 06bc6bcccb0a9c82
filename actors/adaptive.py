"""Speculation only where it pays, decided from what the tier measures while it serves.

Whether drafting pays depends on the load: a verify step checks k drafted tokens per sequence,
which is nearly free while decoding is memory-bound (one stream) and costs real compute in a
large batch; and on the traffic: chat answers accept few n-gram drafts, RAG answers that quote
their context accept many. No fixed rule is right for both, so each tier measures it.

`AdaptiveSpeculation` splits batch sizes into buckets (1, 2, 3-4, 5-8, ...). In every decode step
it adds the tokens each stream got per second to the bucket's estimate for the setting in force
(k drafted tokens, or none). A bucket starts on the tier's configured schedule; once it has
`min_steps` on that setting, and again whenever the other setting's estimate is older than
`probe_every_s`, it spends `probe_steps` decode steps on the other setting and keeps whichever
was faster (switching only for a gain above `margin`). The result is a dense
batch-size → k lookup in the shape of vLLM's dynamic speculative-decoding schedule, which the
engine swaps into the running scheduler (see `vllm_plugin`).

Plain code, no Ray or vLLM: the engine feeds it steps, tests feed it synthetic ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tierserve.actors.config import AdaptiveSpeculationConfig
from tierserve.actors.types import SpeculationBucket

SETTLE_STEPS = 2
"""Steps ignored after a switch: the step in flight was scheduled with the previous k."""


def bucket_bounds(max_batch_size: int) -> list[tuple[int, int]]:
    """Batch-size ranges 1, 2, 3-4, 5-8, ... up to `max_batch_size` (inclusive)."""
    bounds, first = [], 1
    while first <= max_batch_size:
        last = min(max_batch_size, 1 if first == 1 else 2 * (first - 1))
        bounds.append((first, last))
        first = last + 1
    return bounds


@dataclass(slots=True)
class _Estimate:
    """Tokens per second per stream, as decayed sums over the last ~`window` steps."""

    window: int
    tokens: float = 0.0
    stream_seconds: float = 0.0
    steps: int = 0
    last_at: float = -math.inf

    def add(self, tokens: int, stream_seconds: float, at: float) -> None:
        keep = 1.0 - 1.0 / self.window
        self.tokens = self.tokens * keep + tokens
        self.stream_seconds = self.stream_seconds * keep + stream_seconds
        self.steps += 1
        self.last_at = at

    def restart(self) -> None:
        """Forget the old measurements (a probe measures afresh), keep the step count."""
        self.tokens = self.stream_seconds = 0.0

    @property
    def rate(self) -> float | None:
        return self.tokens / self.stream_seconds if self.stream_seconds > 0 else None


@dataclass(slots=True)
class _Bucket:
    first: int
    last: int
    k_on: int
    """k when speculating: the configured one, or the tier's k where the schedule starts at 0."""
    k: int
    on: _Estimate
    off: _Estimate
    probe_left: int = 0
    probe_from: int = 0
    settle: int = 0
    switched_at: float = -math.inf
    probes: int = 0
    switches: int = 0
    reason: str = "starting setting"

    def current(self) -> _Estimate:
        return self.on if self.k else self.off

    def other(self) -> _Estimate:
        return self.off if self.k else self.on


class AdaptiveSpeculation:
    """Per batch-size bucket: measure both settings, keep the faster, re-measure now and then."""

    def __init__(self, config: AdaptiveSpeculationConfig, num_speculative_tokens: int, initial: list[int]):
        """`initial` is vLLM's dense lookup: index b holds k for batch size b (index 0 unused)."""
        self.config = config
        self.max_batch_size = len(initial) - 1
        self._buckets: list[_Bucket] = []
        for first, last in bucket_bounds(self.max_batch_size):
            start = initial[first]
            self._buckets.append(
                _Bucket(
                    first,
                    last,
                    k_on=start or num_speculative_tokens,
                    k=start,
                    on=_Estimate(config.probe_steps),
                    off=_Estimate(config.probe_steps),
                )
            )
        self._index = [0] * (self.max_batch_size + 1)
        for i, bucket in enumerate(self._buckets):
            for b in range(bucket.first, bucket.last + 1):
                self._index[b] = i

    def lookup(self) -> list[int]:
        """The dense batch-size → k lookup now in force (index 0 unused)."""
        lookup = [0] * (self.max_batch_size + 1)
        for bucket in self._buckets:
            lookup[bucket.first : bucket.last + 1] = [bucket.k] * (bucket.last - bucket.first + 1)
        return lookup

    def observe(self, batch_size: int, tokens: int, seconds: float, at: float) -> bool:
        """One decode step: `batch_size` streams got `tokens` tokens in `seconds`.
        True when the lookup changed and should be pushed to the engine."""
        if batch_size < 1 or seconds <= 0 or tokens <= 0:
            return False
        bucket = self._buckets[self._index[min(batch_size, self.max_batch_size)]]
        if bucket.probe_left and at - bucket.switched_at > self.config.probe_every_s:
            # Traffic left this bucket mid-probe and came back much later: go back to the setting
            # the probe started from rather than finish on a stale half-measurement.
            bucket.probe_left = 0
            bucket.reason = "probe abandoned after a lull"
            self._set(bucket, bucket.probe_from, at)
            return True
        if bucket.settle:
            bucket.settle -= 1
            return False
        bucket.current().add(tokens, seconds * batch_size, at)
        if bucket.probe_left:
            bucket.probe_left -= 1
            return self._decide(bucket, at) if bucket.probe_left == 0 else False
        if self._due(bucket, at):
            bucket.probes += 1
            bucket.probe_from = bucket.k
            bucket.probe_left = self.config.probe_steps
            bucket.reason = "probing " + ("without speculation" if bucket.k else f"k={bucket.k_on}")
            bucket.other().restart()
            self._set(bucket, 0 if bucket.k else bucket.k_on, at)
            return True
        return False

    def _due(self, bucket: _Bucket, at: float) -> bool:
        if bucket.current().steps < self.config.min_steps:
            return False
        other = bucket.other()
        return other.steps == 0 or at - max(other.last_at, bucket.switched_at) >= self.config.probe_every_s

    def _decide(self, bucket: _Bucket, at: float) -> bool:
        """End of a probe: keep the faster setting, the one the probe left unless beaten by `margin`."""
        on, off = bucket.on.rate, bucket.off.rate
        if on is None or off is None:
            return False
        payoff = on / off
        was_on = bucket.probe_from > 0
        if was_on:
            choose_on = payoff * (1 + self.config.margin) >= 1
        else:
            choose_on = payoff > 1 + self.config.margin
        if choose_on == (payoff >= 1):
            bucket.reason = f"speculation pays {payoff:.2f}x" if choose_on else f"speculation costs: {payoff:.2f}x"
        else:  # within the margin: the setting from before the probe stays
            bucket.reason = f"within margin ({payoff:.2f}x): " + ("keeps speculating" if choose_on else "keeps k=0")
        k = bucket.k_on if choose_on else 0
        if k != bucket.probe_from:
            bucket.switches += 1
        if k == bucket.k:  # the probed setting won and stays; the other is re-measured in probe_every_s
            bucket.switched_at = at
            return False
        self._set(bucket, k, at)
        return True

    def _set(self, bucket: _Bucket, k: int, at: float) -> None:
        bucket.k = k
        bucket.settle = SETTLE_STEPS
        bucket.switched_at = at

    def snapshot(self) -> list[SpeculationBucket]:
        return [
            SpeculationBucket(
                first_batch_size=b.first,
                last_batch_size=b.last,
                num_speculative_tokens=b.k,
                speculating_tokens_per_s=b.on.rate,
                plain_tokens_per_s=b.off.rate,
                speculating_steps=b.on.steps,
                plain_steps=b.off.steps,
                probes=b.probes,
                switches=b.switches,
                reason=b.reason,
            )
            for b in self._buckets
        ]
