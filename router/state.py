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
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace

from tierserve.actors.latency import Ewma
from tierserve.actors.types import TierLoad
from tierserve.router.config import RoutingConfig, TierRouting
from tierserve.router.policy import Sla, TierView, TtftCorrection
from tierserve.router.replicas import TierReplicas

logger = logging.getLogger("tierserve.router")


class TtftFit:
    """observed = scale x modelled, fitted to a tier's recent first tokens (what the ingress
    measured from its decision to the first token, against the step-cost model's prediction for
    it): the scale is the geometric mean of their ratios, each weighted by its age (the weight
    halves every `half_life_s`, so what a burst taught fades once it is over), beside a prior
    of `prior_weight` observations at 1 that never fades, so a few observations do not swing
    it. Each ratio is taken within [0.5, 5], and so is the scale: after a burst a near-idle
    tier's short predictions stay short (at most 5x), so requests are still admitted there, and
    within a minute without a burst the scale is back near 1."""

    SCALE = (0.5, 5.0)

    def __init__(self, half_life_s: float = 10.0, prior_weight: float = 4.0):
        self.half_life_s = half_life_s
        self.prior_weight = prior_weight
        self._weight = 0.0
        self._log_ratios = 0.0
        """Sum of the observations' weights, and of their weighted log(observed / modelled)."""
        self._at: float | None = None
        """When the sums were last brought up to date (the caller's clock)."""
        self._correction = TtftCorrection()

    def _age(self, now: float) -> None:
        if self._at is not None and now > self._at:
            f = 0.5 ** ((now - self._at) / self.half_life_s)
            self._weight, self._log_ratios = f * self._weight, f * self._log_ratios
        self._at = now

    def observe(self, modelled_ms: float, observed_ms: float, now: float) -> None:
        if modelled_ms <= 0 or observed_ms <= 0:
            return
        self._age(now)
        low, high = self.SCALE
        self._weight += 1.0
        self._log_ratios += math.log(min(max(observed_ms / modelled_ms, low), high))
        self._correction = self._solve()

    def correction(self, now: float) -> TtftCorrection:
        """The fit as of `now` (refitted when its observations have aged by a tenth of a half-life)."""
        if self._at is not None and now - self._at > self.half_life_s / 10:
            self._age(now)
            self._correction = self._solve()
        return self._correction

    def _solve(self) -> TtftCorrection:
        # A mean of logs within [log 0.5, log 5] and the prior's 0: the scale stays within SCALE.
        return TtftCorrection(math.exp(self._log_ratios / (self.prior_weight + self._weight)))


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
        self.holds = {name: Ewma(0.1) for name in names}
        """Per tier, engine steps the output guards lately held a first text back (`held`)."""
        self.ttft_fits: dict[str, TtftFit] | None = None
        """Per tier, how its first tokens came against the model (None: `ttft_feedback` off)."""
        if routing.ttft_feedback:
            self.ttft_fits = {name: TtftFit() for name in names}

    def snapshot(self) -> list[TierView]:
        """Copies of every tier's view, in config order, for one decision."""
        # `finished` deletes a key when its last request ends, so every key here is in flight.
        now = self.clock()
        return [
            replace(
                v,
                in_flight=self.priorities[v.name].total(),
                tightest_tpot_ms=min(self.budgets[v.name], default=None),
                priorities=dict(self.priorities[v.name]),
                ttft_correction=self.ttft_fits[v.name].correction(now) if self.ttft_fits else v.ttft_correction,
                hold_steps=self.holds[v.name].value or 0.0,
            )
            for v in self.views.values()
        ]

    def first_token(self, tier: str, modelled_ms: float, observed_ms: float) -> None:
        """A request's first token came `observed_ms` after its decision; the model had said
        `modelled_ms` (before correction)."""
        if self.ttft_fits is not None:
            self.ttft_fits[tier].observe(modelled_ms, observed_ms, self.clock())

    def held(self, tier: str, steps: int) -> None:
        """A request's first text reached its caller `steps` engine steps after the tier's
        first token (the output guards held the start of a word back until it ended)."""
        self.holds[tier].add(steps)

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
            if load.unavailable is not None:  # the replica answers, its engine cannot serve
                self.failed(tier, load.unavailable)
            else:
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
