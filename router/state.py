"""The router's live view of each tier: health, requests in flight, and the tier's own load.

The ingress counts what it has in flight per tier itself (exact and immediate for its own
traffic) and polls each tier's `load()` every `poll_interval_s` (the engine's queue and its
step-cost model, which also count other ingress replicas' traffic). A tier that fails before
its first token, or whose poll fails with a dead replica, is marked unhealthy, so the next
requests skip it; the next successful poll marks it healthy again. A tier of one replica is
marked at its first failure; one of `n` replicas once half of them could have failed (`ceil(n /
2)` failures since its last answered poll): one lost replica of many must not take the tier's
other replicas out of routing (the routing simulator showed that cost, docs/routing-simulation.md). A poll that merely
times out (a busy replica answers late) changes nothing: the in-flight count still bounds it.
Serve's own view of each tier's replicas (`tierserve.router.replicas`) comes in beside the polls:
no running replica marks the tier unhealthy (unless the tier answered a poll within the last two
poll intervals: Serve's count lags a replica that has just started), and the running count sets
the tier's capacity.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace

from tierserve.actors.types import TierLoad
from tierserve.router.config import RoutingConfig, TierRouting
from tierserve.router.policy import Sla, TierView, TtftCorrection
from tierserve.router.replicas import TierReplicas

logger = logging.getLogger("tierserve.router")


class TtftFit:
    """observed = offset + scale x modelled, fitted to a tier's recent first tokens (what the
    ingress measured from its decision to the first token, against the step-cost model's
    prediction for it) by least squares with forgetting: an observation's weight halves every
    `ln 2 / -ln forgetting` observations (23 at 0.97). A prior of `prior_weight` observations
    on the identity, at 0.1 s and 1 s, never forgets: with few observations, or all at one load,
    the fit stays near the model instead of swinging. The scale is kept within [0.5, 10] and the
    offset within [0, 10] s (what the model leaves out only adds time)."""

    SCALE = (TtftCorrection.MIN_SCALE, 10.0)
    MAX_OFFSET_S = 10.0

    def __init__(self, forgetting: float = 0.97, prior_weight: float = 4.0):
        self.forgetting = forgetting
        # Sums over (1, x) of x and y in seconds: a, b, c of [[a, b], [b, c]] and (y0, y1).
        w = prior_weight / 2
        self._prior = (2 * w, w * 1.1, w * (0.01 + 1.0), w * 1.1, w * (0.01 + 1.0))
        self._data = (0.0, 0.0, 0.0, 0.0, 0.0)
        self.observations = 0
        self.correction = TtftCorrection()

    def observe(self, modelled_ms: float, observed_ms: float) -> None:
        x, y = modelled_ms / 1e3, observed_ms / 1e3
        f = self.forgetting
        n, sx, sxx, sy, sxy = self._data
        self._data = (f * n + 1, f * sx + x, f * sxx + x * x, f * sy + y, f * sxy + x * y)
        self.observations += 1
        a, b, c, y0, y1 = (p + d for p, d in zip(self._prior, self._data))
        offset = (c * y0 - b * y1) / (a * c - b * b)
        if offset < 0:  # what the model leaves out only adds time: fit the scale alone
            offset = 0.0
        scale = min(max((y1 - b * offset) / c, self.SCALE[0]), self.SCALE[1])
        offset = min(max((y0 - b * scale) / a, 0.0), self.MAX_OFFSET_S)
        self.correction = TtftCorrection(1e3 * offset, scale)


class TierStates:
    def __init__(
        self,
        names: list[str],
        routing: RoutingConfig,
        replicas: dict[str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.clock = clock
        self.answer_window_s = 2 * routing.poll_interval_s
        """How recent a successful poll outweighs Serve's report of no running replica."""
        self.answered: dict[str, float] = {}
        """When each tier last answered a poll (`clock`)."""
        self.views = {
            name: _view(name, routing.tiers.get(name, TierRouting()), (replicas or {}).get(name, 1)) for name in names
        }
        self.budgets: dict[str, Counter[float]] = {name: Counter() for name in names}
        """TPOT budgets of the requests in flight per tier."""
        self.priorities: dict[str, Counter[int]] = {name: Counter() for name in names}
        """Priorities of the requests in flight per tier (their sum: the tier's in-flight count)."""
        self.last_error: dict[str, str] = {}
        self.failures: Counter[str] = Counter()
        """Failures per tier since its last answered poll."""
        self.replicas: dict[str, TierReplicas] = {}
        """Each tier's replicas as Serve last reported them (empty until the first report)."""
        self.without_replicas: set[str] = set()
        """Tiers down because Serve reported no running replica (not because a request failed)."""
        self.ttft_fits: dict[str, TtftFit] | None = None
        """Per tier, how its first tokens came against the model (None: `ttft_feedback` off)."""
        if routing.ttft_feedback:
            self.ttft_fits = {name: TtftFit() for name in names}

    def snapshot(self) -> list[TierView]:
        """Copies of every tier's view, in config order, for one decision."""
        # `finished` deletes a key when its last request ends, so every key here is in flight.
        return [
            replace(
                v,
                in_flight=self.priorities[v.name].total(),
                tightest_tpot_ms=min(self.budgets[v.name], default=None),
                priorities=dict(self.priorities[v.name]),
                ttft_correction=self.ttft_fits[v.name].correction if self.ttft_fits else v.ttft_correction,
            )
            for v in self.views.values()
        ]

    def first_token(self, tier: str, modelled_ms: float, observed_ms: float) -> None:
        """A request's first token came `observed_ms` after its decision; the model had said
        `modelled_ms` (before correction)."""
        if self.ttft_fits is not None:
            self.ttft_fits[tier].observe(modelled_ms, observed_ms)

    def started(self, tier: str, sla: Sla | None = None) -> None:
        """A request with this budget and priority went to `tier`."""
        sla = sla or Sla()
        self.priorities[tier][sla.priority] += 1
        if sla.tpot_ms is not None:
            self.budgets[tier][sla.tpot_ms] += 1

    def finished(self, tier: str, sla: Sla | None = None) -> None:
        sla = sla or Sla()
        _discount(self.priorities[tier], sla.priority)
        if sla.tpot_ms is not None:
            _discount(self.budgets[tier], sla.tpot_ms)

    def failed(self, tier: str, why: str) -> None:
        """The tier failed a request before its first token (or a poll, dead): skip it until a
        poll succeeds, once as many failures came as half its replicas (one, for one replica)."""
        view = self.views[tier]
        self.failures[tier] += 1
        self.last_error[tier] = why
        if self.failures[tier] < -(-view.replicas // 2):
            return
        self._down(tier, why)

    def _down(self, tier: str, why: str) -> None:
        view = self.views[tier]
        if view.healthy:
            logger.warning("tier %s marked unhealthy: %s", tier, why)
        view.healthy = False
        self.last_error[tier] = why

    def polled(self, tier: str, load: TierLoad) -> None:
        view = self.views[tier]
        if not view.healthy:
            logger.info("tier %s is healthy again", tier)
        view.load, view.healthy = load, True
        self.failures.pop(tier, None)
        self.answered[tier] = self.clock()
        view.max_model_len = load.max_model_len or view.max_model_len
        self.last_error.pop(tier, None)
        self.without_replicas.discard(tier)

    def replicas_seen(self, tier: str, replicas: TierReplicas) -> None:
        """Serve's count of the tier's replicas: none running makes the tier unhealthy until
        Serve reports one running again (or a load poll succeeds), unless the tier answered a
        poll within `answer_window_s` (Serve's count lags a replica that has just started);
        otherwise the running ones are its capacity. A tier down for a failed request stays
        down until a poll succeeds."""
        self.replicas[tier] = replicas
        view = self.views[tier]
        if replicas.running == 0:
            if self.clock() - self.answered.get(tier, -1e18) <= self.answer_window_s:
                return  # the tier answers: Serve's count has not caught up with it yet
            pending = f", {replicas.pending} pending" if replicas.pending else ""
            detail = f": {replicas.message}" if replicas.message else ""
            self._down(tier, f"no running replica ({replicas.status}{pending}){detail}")
            self.without_replicas.add(tier)
            return
        view.replicas = replicas.running
        if tier in self.without_replicas:
            self.without_replicas.discard(tier)
            logger.info("tier %s has a running replica again", tier)
            view.healthy = True
            self.failures.pop(tier, None)
            self.last_error.pop(tier, None)

    async def poll_forever(
        self,
        fetch: Callable[[str], Awaitable[TierLoad]],
        interval_s: float,
        is_dead: Callable[[BaseException], str | None],
    ) -> None:
        """Poll every tier every `interval_s`; `is_dead` says whether an error means the tier
        cannot serve (and why)."""

        async def one(tier: str) -> None:
            try:
                load = await asyncio.wait_for(fetch(tier), timeout=max(1.0, 4 * interval_s))
            except asyncio.TimeoutError:
                return
            except Exception as exc:
                why = is_dead(exc)
                if why is not None:
                    self.failed(tier, why)
                else:
                    logger.debug("polling tier %s failed", tier, exc_info=True)
                return
            self.polled(tier, load)

        while True:
            await asyncio.gather(*(one(t) for t in self.views))
            await asyncio.sleep(interval_s)


def _discount(counter: Counter, key: float) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _view(name: str, routing: TierRouting, replicas: int) -> TierView:
    return TierView(name, routing.min_complexity, routing.cost, routing.max_queue, replicas=replicas)
