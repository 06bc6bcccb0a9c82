"""Routing at scale: a discrete-event simulation of tiers of vLLM replicas driven by the real router.

What runs for real: the `Router` the ingress uses (`plan`: budgets, the policy's `decide`,
admission and shedding, the place reserved at decision time; `open`: the fallback loop and the
first-token timeout; `release`), its `TierStates` (the load polls every `poll_interval_s`,
Serve's replica counts every `replicas_poll_interval_s`, a tier marked down when it fails) and
each replica's `LatencyTracker`, which fits the step-cost model the router reads. What is
simulated (`tierserve.router.simengine`): the arrivals, the replicas' engines, Serve's queues
and its spreading of requests over replicas, and the front end's CPU work (`FrontEnd`: per
request before routing, per token before the client sees it). The clock is virtual, so the
router's coroutines run unchanged and an hour of traffic costs what its events cost.

Baselines (`POLICIES`) replace only the decision: round-robin, random and least-loaded send each
request to one tier, never shed and never fall back; the single-tier baseline is the router
with every request naming that tier.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tierserve.actors.types import TierLoad, TokenChunk
from tierserve.core.errors import ContextLengthExceeded, ServiceUnavailable, TierServeError
from tierserve.router.config import RoutingConfig
from tierserve.router.policy import Choice, Decision, RequestFeatures, Sla
from tierserve.router.routing import Routed, Router
from tierserve.router.simengine import FrontEnd, Job, SimTier, TierSpec, VirtualClockLoop


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of a trace."""

    at_s: float
    prompt_tokens: int
    output_tokens: int
    """Tokens the engine generates for it (as with `ignore_eos`)."""
    sla_class: str | None = None
    complexity: float | None = None
    """Its complexity score (`model: auto`); the router reads it instead of scoring text."""
    tier: str | None = None
    """The tier it names; None: `model: auto`."""


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happens to the service during a run."""

    at_s: float
    kind: str
    """`kill` (one replica of `tier` dies: its requests fail, Serve notices after `detect_s`
    and has a new one serving `restart_s` after the death), or `slow` (every step of `tier`
    takes `factor` times as long from then on)."""
    tier: str
    factor: float = 2.0
    detect_s: float = 2.0
    restart_s: float | None = 30.0


@dataclass(slots=True)
class Outcome:
    """What the client saw for one arrival."""

    arrival: Arrival
    status: int = 0
    """200, or the status of the error the request got (before or during its stream)."""
    code: str | None = None
    tier: str | None = None
    reason: str | None = None
    """The router's reason for its tier (`fallback` after a failed first choice)."""
    ttft_s: float | None = None
    tpot_s: float | None = None
    tokens: int = 0
    cost: float = 0.0
    sla: Sla | None = None
    """The budget the router read for it."""
    predicted_ttft_ms: float | None = None
    predicted_tpot_ms: float | None = None
    """What the router predicted for it on the tier that served it."""

    @property
    def met(self) -> bool:
        """Served, within its budget (measured from its arrival, as a client measures)."""
        if self.status != 200:
            return False
        ttft = None if self.ttft_s is None else 1e3 * self.ttft_s
        tpot = None if self.tpot_s is None else 1e3 * self.tpot_s
        return self.sla is None or self.sla.met_by(ttft, tpot)


# ----- the run ----------------------------------------------------------------------------

POLICIES = ("router", "round_robin", "random", "least_loaded")
"""`router`: the real router; the others are baselines that send each request to one tier,
never shed and never fall back. The single-tier baseline is the router with every arrival
naming its tier (`Arrival.tier`)."""


class _PromptTokens(list):
    """An empty list that says it holds `n` token ids: `Router.plan` counts a token prompt's length."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def __len__(self) -> int:
        return self.n


class _Body:
    """What `Router.plan` reads of a request."""

    def __init__(self, arrival: Arrival, key: str):
        self.arrival, self.key = arrival, key
        self.sla_class, self.slo_ttft_ms, self.slo_tpot_ms = arrival.sla_class, None, None
        self.prompt = _PromptTokens(arrival.prompt_tokens)

    def routing_text(self) -> tuple[str, int]:
        return self.key, 1

    def requested_max_tokens(self) -> int:
        return self.arrival.output_tokens


@dataclass(frozen=True, slots=True)
class _Score:
    value: float


class _TraceScores:
    """The router's complexity scorer in a simulation: each request's score is in the trace."""

    embedder = None  # `Router.complexity` then scores inline

    def __init__(self) -> None:
        self.scores: dict[str, float] = {}

    def score(self, key: str, turns: int) -> _Score:
        return _Score(self.scores.get(key, 0.0))  # an arrival without a score: the weakest tier's


@dataclass(slots=True)
class _Run:
    tiers: dict[str, SimTier]
    router: Router
    policy: str
    rng: random.Random
    front: FrontEnd
    replicas_poll_interval_s: float
    order: Iterable[int] = field(default_factory=itertools.count)
    turn: Iterable[int] = field(default_factory=itertools.count)

    async def main(self, arrivals: Sequence[Arrival], events: Sequence[Event]) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        for tier in self.tiers.values():
            for replica in tier.replicas:
                replica.task = loop.create_task(replica.run())
        states = self.router.states
        background = [
            loop.create_task(states.poll_forever(self._load, self.router.config.poll_interval_s, _dead)),
            loop.create_task(self._watch()),
            *(loop.create_task(self._event(e)) for e in events),
        ]
        outcomes = [Outcome(a) for a in arrivals]
        requests = []
        for i, arrival in sorted(enumerate(arrivals), key=lambda ia: ia[1].at_s):
            await asyncio.sleep(max(0.0, arrival.at_s - loop.time()))
            requests.append(loop.create_task(self._request(i, outcomes[i])))
        await asyncio.gather(*requests)
        for task in [*background, *(r.task for t in self.tiers.values() for r in t.replicas if r.task)]:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        return outcomes

    async def _load(self, tier: str) -> TierLoad:
        replica = self.tiers[tier].pick()
        await asyncio.sleep(0.001)  # a poll's round trip
        return replica.load()

    async def _watch(self) -> None:
        """Serve's view of each tier's replicas, as the ingress reads it."""
        while True:
            for name, tier in self.tiers.items():
                self.router.states.replicas_seen(name, tier.as_serve_sees_it())
            await asyncio.sleep(self.replicas_poll_interval_s)

    async def _event(self, event: Event) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(event.at_s)
        tier = self.tiers[event.tier]
        if event.kind == "slow":
            tier.slow_down(event.factor)
            return
        victim = tier.kill_one()
        if victim is None:
            return
        loop.call_later(event.detect_s, tier.dead_seen.remove, victim)
        if event.restart_s is not None:
            loop.call_later(event.restart_s, tier.replace, victim)

    async def _request(self, i: int, out: Outcome) -> None:
        arrival = out.arrival
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        if self.front.request_ms:
            await asyncio.sleep(self.front.take(arrived, self.front.request_ms) - arrived)
        try:
            routed = await self._plan(i, arrival)
            out.sla = routed.sla
            if not routed.decision.choices:
                raise self.router.rejection(routed.decision)
            try:
                start = lambda tier: self._stream(tier, arrival, routed.sla.priority)  # noqa: E731
                batches = await self.router.open(routed, start)
            finally:
                self.router.release(routed)
            out.tier, out.reason = routed.tier, routed.reason
            if routed.choice is not None:
                out.predicted_ttft_ms, out.predicted_tpot_ms = (
                    routed.choice.predicted_ttft_ms,
                    routed.choice.predicted_tpot_ms,
                )
            async for _ in batches:
                if out.ttft_s is None:
                    out.ttft_s = loop.time() - arrived
                    first_at = loop.time()
            out.tokens = arrival.output_tokens
            if out.tokens > 1:
                out.tpot_s = (loop.time() - first_at) / (out.tokens - 1)
            out.cost = self.router.price(routed.tier, arrival.prompt_tokens, out.tokens)
            out.status = 200
        except TierServeError as exc:
            out.status, out.code = exc.status_code, exc.code

    async def _plan(self, i: int, arrival: Arrival) -> Routed:
        router = self.router
        if self.policy == "router" or arrival.tier is not None:
            if isinstance(router.scorer, _TraceScores) and arrival.complexity is not None:
                router.scorer.scores[str(i)] = arrival.complexity
            try:
                return await router.plan(_Body(arrival, str(i)), arrival.tier)
            finally:
                if isinstance(router.scorer, _TraceScores):
                    router.scorer.scores.pop(str(i), None)
        views = [v for v in router.states.snapshot() if v.healthy] or router.states.snapshot()
        if self.policy == "round_robin":
            tier = views[next(self.turn) % len(views)].name
        elif self.policy == "random":
            tier = self.rng.choice(views).name
        else:  # least_loaded (`simulate` accepts only the POLICIES)
            tier = min(views, key=lambda v: (v.in_system() / v.slots(), v.name)).name
        sla = router.sla(arrival.sla_class, None, None)
        features = RequestFeatures(arrival.prompt_tokens, arrival.output_tokens, arrival.complexity)
        routed = Routed(Decision([Choice(tier, None, None, True, 0.0)], self.policy), sla, features, router.clock())
        routed.reserved = tier
        router.states.started(tier, sla)
        return routed

    async def _stream(self, tier_name: str, arrival: Arrival, priority: int):
        tier = self.tiers[tier_name]
        limit = tier.spec.profile.max_model_len
        if arrival.prompt_tokens + arrival.output_tokens > limit:
            raise ContextLengthExceeded(f"{arrival.prompt_tokens} + {arrival.output_tokens} tokens > {limit}")
        loop = asyncio.get_running_loop()
        first, done = loop.create_future(), loop.create_future()
        job = Job(arrival.prompt_tokens, arrival.output_tokens, priority, next(self.order), first, done)
        tier.submit(job)
        try:
            await job.first
            await _until(job.first_seen)
            yield [TokenChunk(0, "", [], 1)]
            await job.done
            await _until(job.last_seen)
            yield [TokenChunk(0, "", [], 2, "length")]
        finally:
            if not job.done.done() or job.done.cancelled():  # the caller left before its last token
                tier.withdraw(job)


async def _until(at: float) -> None:
    """Wait until simulated time `at` (at once if it has passed)."""
    delay = at - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


def _dead(exc: BaseException) -> str | None:
    return str(exc) if isinstance(exc, ServiceUnavailable) else None


@dataclass(slots=True)
class Simulated:
    outcomes: list[Outcome]
    """One per arrival, in the order given."""
    loads: dict[str, list[TierLoad]]
    """Each tier's replicas' loads at the end, as the router would poll them: their step-cost
    models fitted to the simulated steps."""


def simulate(
    arrivals: Sequence[Arrival],
    tiers: Sequence[TierSpec],
    routing: RoutingConfig,
    policy: str = "router",
    events: Sequence[Event] = (),
    seed: int = 0,
    front: FrontEnd | None = None,
    replicas_poll_interval_s: float = 2.0,
) -> Simulated:
    """Run `arrivals` through `tiers` under `policy` in simulated time. The first tier is the
    default (as the first configured tier is). `front`: the service's own CPU work per request
    and per token (None: none)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    loop = VirtualClockLoop()
    try:
        rng = random.Random(seed)
        names = [t.name for t in tiers]
        scorer = _TraceScores() if routing.tiers else None
        router = Router(
            routing, names, names[0], replicas={t.name: t.replicas for t in tiers}, scorer=scorer, clock=loop.time
        )
        front = dataclasses.replace(front, busy_until=0.0) if front else FrontEnd()  # each run's clock starts at 0
        run = _Run(
            {t.name: SimTier(t, rng, front) for t in tiers}, router, policy, rng, front, replicas_poll_interval_s
        )
        outcomes = loop.run_until_complete(run.main(arrivals, events))
        loads = {name: [r.load() for r in tier.replicas] for name, tier in run.tiers.items()}
        return Simulated(outcomes, loads)
    finally:
        loop.close()


# ----- what a run shows -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    requests: int
    goodput: float
    """Share of requests served within their budget."""
    shed: float
    """Share refused with 429 or 503 before any token."""
    failed: float
    """Share that got another error, or an error mid-stream."""
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    tpot_p50_ms: float | None
    tpot_p95_ms: float | None
    cost_per_1k_tokens: float | None
    """What the served tokens cost at the tiers' prices (`routing.tiers.<tier>.cost`), per 1,000."""
    tier_shares: dict[str, float]


def summarize(outcomes: Sequence[Outcome]) -> Summary:
    n = len(outcomes) or 1
    served = [o for o in outcomes if o.status == 200]
    ttft = [1e3 * o.ttft_s for o in served if o.ttft_s is not None]
    tpot = [1e3 * o.tpot_s for o in served if o.tpot_s is not None]
    tokens = sum(o.arrival.prompt_tokens + o.tokens for o in served)
    by_tier: dict[str, int] = {}
    for o in served:
        by_tier[o.tier or ""] = by_tier.get(o.tier or "", 0) + 1

    def ms(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(values, q)), 1) if values else None

    return Summary(
        requests=len(outcomes),
        goodput=sum(o.met for o in outcomes) / n,
        shed=sum(o.status in (429, 503) and o.ttft_s is None for o in outcomes) / n,
        failed=sum(o.status not in (200, 429, 503) or (o.status != 200 and o.ttft_s is not None) for o in outcomes) / n,
        ttft_p50_ms=ms(ttft, 50),
        ttft_p95_ms=ms(ttft, 95),
        tpot_p50_ms=ms(tpot, 50),
        tpot_p95_ms=ms(tpot, 95),
        cost_per_1k_tokens=1e3 * sum(o.cost for o in served) / tokens if tokens else None,
        tier_shares={t: k / len(served) for t, k in sorted(by_tier.items())},
    )


def poisson_arrivals(
    rate: Callable[[float], float] | float,
    duration_s: float,
    rng: random.Random,
    make: Callable[[float, random.Random], Arrival],
    peak_rate: float | None = None,
) -> list[Arrival]:
    """Arrivals of a Poisson process of `rate` requests a second (a constant, or a function of
    time with `peak_rate` its maximum, drawn by thinning), each made by `make(at_s, rng)`."""
    top = peak_rate if peak_rate is not None else (rate if not callable(rate) else None)
    if top is None:
        raise ValueError("a time-varying rate needs peak_rate")
    at, out = 0.0, []
    while True:
        at += rng.expovariate(top)
        if at >= duration_s:
            return out
        if not callable(rate) or rng.random() * top <= rate(at):
            out.append(make(at, rng))


@dataclass(frozen=True, slots=True)
class TrafficMix:
    """What a synthetic request looks like: its SLA class (with that class's answer length),
    a log-normal prompt length and a complexity score drawn from `complexity` (e.g. the
    router's scores of real prompts) or uniformly."""

    classes: tuple[tuple[str, float, int], ...] = (
        ("interactive", 0.4, 64),
        ("standard", 0.4, 256),
        ("batch", 0.2, 512),
    )
    """(SLA class, share of requests, output tokens)."""
    prompt_median: int = 300
    prompt_sigma: float = 1.0
    prompt_max: int = 6000
    complexity: tuple[float, ...] = ()

    def arrival(self, at_s: float, rng: random.Random) -> Arrival:
        names, shares, outputs = zip(*self.classes)
        i = rng.choices(range(len(names)), shares)[0]
        prompt = min(
            self.prompt_max, max(8, round(rng.lognormvariate(math.log(self.prompt_median), self.prompt_sigma)))
        )
        score = rng.choice(self.complexity) if self.complexity else rng.random()
        return Arrival(at_s, prompt, outputs[i], names[i], score)
