"""The simulated side of the routing simulator (`tierserve.router.sim`): replicas of vLLM engines
stepping in virtual time, and Serve's queue and choice of replica in front of them.

An engine is vLLM's continuous batching reduced to what decides latency: every step the running
requests each get `tokens_per_step` tokens; free slots (`max_num_seqs`) go to waiting requests in
arrival order (by priority, then arrival, with `priority_scheduling`), whose prompts are
prefilled within the step's token budget (`max_num_batched_tokens`, chunked across steps when
larger); a request's first token comes at the end of the step that finishes its prefill. A step
takes `base + per_seq * running + per_kprompt * prefill_tokens / 1000` ms (`TierProfile`: the
model the router fits, recorded from a running tier by `tierserve router profile`), times
log-normal noise. Each replica keeps the real `LatencyTracker`, fed with its simulated steps,
so the load it reports to the router is fitted exactly as a real tier's is. In front of each
replica Serve lets `max_ongoing_requests` into the engine, queues up to `max_queued_requests`
more and refuses the rest (429); it sends a request to the less loaded of two replicas picked at
random. In front of it all, the service's own CPU work (`FrontEnd`): each request's before it
reaches a tier and each token's relay to its client, served first come first served. Not
modelled: preemption when the KV cache runs out, and engines slowed by the front end's work on
cores they share.

The clock is virtual (`VirtualClockLoop`): asyncio runs coroutines unchanged and jumps from one
timer to the next, so an hour of traffic costs what its events cost.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import math
import random
import selectors
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tierserve.actors.latency import LatencyTracker
from tierserve.actors.types import TierLoad
from tierserve.core.errors import Overloaded, ServiceUnavailable
from tierserve.router.replicas import TierReplicas


class SimulationStalled(RuntimeError):
    """Every task waits for something no timer will bring: a bug in the scenario or the model."""


class _SkippingSelector(selectors.SelectSelector):
    """A selector that never waits: the time until the next timer is skipped instead."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list:
        if timeout is None:
            raise SimulationStalled("no timer is pending and no task can run")
        self.now += max(timeout, 0.0)
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose `time()` is simulated seconds from 0; it never sleeps. No threads
    and no I/O may run on it: they would take real time the clock does not see."""

    def __init__(self) -> None:
        self._skipping = _SkippingSelector()
        super().__init__(self._skipping)

    def time(self) -> float:
        return self._skipping.now


@dataclass(frozen=True, slots=True)
class TierProfile:
    """One tier's engine as the simulator runs it: the step-cost model the router fits
    (`TierLoad`) plus what shapes its batches."""

    step_ms_base: float
    step_ms_per_seq: float
    step_ms_per_kprompt: float
    max_num_seqs: int
    max_model_len: int
    tokens_per_step: float = 1.0
    priority_scheduling: bool = False
    max_num_batched_tokens: int | None = None
    """Prompt and decode tokens one step may process (vLLM's chunked prefill); None: no limit."""
    step_noise: float = 0.1
    """Sigma of the log-normal factor on each step's time."""
    source: str = ""
    """Where the figures come from (measured on which machine, or which published figures)."""

    def step_ms(self, running: int, prefill_tokens: int) -> float:
        return self.step_ms_base + self.step_ms_per_seq * running + self.step_ms_per_kprompt * prefill_tokens / 1000

    @classmethod
    def from_load(cls, load: TierLoad, source: str = "", step_noise: float = 0.1) -> TierProfile:
        """The profile of a tier as its polled load describes it (`GET /v1/tiers`)."""
        return cls(
            step_ms_base=load.step_ms_base,
            step_ms_per_seq=load.step_ms_per_seq,
            step_ms_per_kprompt=load.step_ms_per_kprompt,
            max_num_seqs=load.max_num_seqs,
            max_model_len=load.max_model_len,
            tokens_per_step=load.tokens_per_step,
            priority_scheduling=load.priority_scheduling,
            step_noise=step_noise,
            source=source,
        )


def save_profiles(path: Path, profiles: dict[str, TierProfile]) -> None:
    path.write_text(json.dumps({"tiers": {name: asdict(p) for name, p in profiles.items()}}, indent=2) + "\n")


def load_profiles(path: Path) -> dict[str, TierProfile]:
    """Profiles from a file `save_profiles` (or `tierserve router profile`) wrote."""
    known = {f.name for f in fields(TierProfile)}
    tiers = json.loads(path.read_text())["tiers"]
    return {name: TierProfile(**{k: v for k, v in p.items() if k in known}) for name, p in tiers.items()}


@dataclass(slots=True)
class FrontEnd:
    """The service's own CPU work around the engines (the HTTP proxy, the ingress with its
    guards, the tiers' Python side that relays tokens) as one first-come first-served server:
    a request takes `request_ms` of it before it reaches a tier, and every token an engine makes
    takes `token_ms` before the client sees it. When the front end is busy, requests and tokens
    queue behind each other, so a client's time to first token and per token grow past the
    engines' own: what a front end short of CPU does to a service."""

    request_ms: float = 0.0
    token_ms: float = 0.0
    cores: float = 1.0
    """CPU the front end has; its work takes 1/cores as long."""
    busy_until: float = 0.0
    """Simulated time at which the work queued so far is done."""

    def take(self, now: float, ms: float) -> float:
        """Queue `ms` of work arriving at `now`; when it is done (simulated s)."""
        if ms <= 0:
            return now
        self.busy_until = max(self.busy_until, now) + ms / 1e3 / self.cores
        return self.busy_until


@dataclass(frozen=True, slots=True)
class TierSpec:
    """A tier of the simulated service: its engine profile and its Serve deployment."""

    name: str
    profile: TierProfile
    replicas: int = 1
    max_ongoing_requests: int | None = None
    """Requests Serve lets into one replica at once (None: twice its engine's slots)."""
    max_queued_requests: int = -1
    """Requests Serve queues for the tier when every replica has `max_ongoing_requests`
    (-1: no limit); beyond them it refuses (429)."""


@dataclass(eq=False, slots=True)
class Job:
    prompt_tokens: int
    output_tokens: int
    priority: int
    order: int
    first: asyncio.Future
    done: asyncio.Future
    replica: SimReplica | None = None
    """Where it runs; None while it waits in the tier's Serve queue."""
    prefilled: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    """When the front end has relayed its first and its last token (simulated s)."""

    def fail(self, error: Exception) -> None:
        """Before its first token the caller hears of it there, after it at the end."""
        future = self.done if self.first.done() else self.first
        if not future.done():
            future.set_exception(error)


class SimReplica:
    """One replica's engine, stepping in simulated time."""

    def __init__(self, tier: SimTier):
        self.tier = tier
        self.profile = tier.spec.profile
        self.alive = True
        self.slowdown = 1.0
        self.tracker = LatencyTracker(self.profile.max_num_seqs)
        self.tracker.priority_scheduling = self.profile.priority_scheduling
        self.waiting: list[tuple[int, int, Job]] = []
        """The engine's queue: a heap of (priority, or 0 when first come first served; order; job)."""
        self.prefilling: list[Job] = []
        self.decoding: list[tuple[float, int, Job]] = []
        """A heap of (the replica's token count at which the job has all its tokens, order, job)."""
        self.tokens = 0.0
        """Tokens each decoding sequence has had since the replica started."""
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None

    def ongoing(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.decoding)

    def load(self) -> TierLoad:
        running = len(self.prefilling) + len(self.decoding)
        return self.tracker.load(running, len(self.waiting), self.profile.max_model_len)

    def enter(self, job: Job) -> None:
        job.replica = self
        key = job.priority if self.profile.priority_scheduling else 0
        heapq.heappush(self.waiting, (key, job.order, job))
        self.wake.set()

    def abort(self, job: Job) -> None:
        """The caller went away: the job leaves its queue or batch, and its slot is taken."""
        if job in self.prefilling:
            self.prefilling.remove(job)
        else:
            for heap in (self.waiting, self.decoding):
                for i, entry in enumerate(heap):
                    if entry[-1] is job:
                        heap[i] = heap[-1]
                        heap.pop()
                        heapq.heapify(heap)
                        break
        self.tier.refill(self)

    def kill(self) -> None:
        self.alive = False
        jobs = [*self.prefilling, *(e[-1] for e in self.waiting), *(e[-1] for e in self.decoding)]
        self.waiting, self.prefilling, self.decoding = [], [], []
        for job in jobs:
            job.fail(ServiceUnavailable("the replica died", "model", "engine_unavailable"))
        if self.task is not None:
            self.task.cancel()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        profile = self.profile
        budget_max = profile.max_num_batched_tokens or math.inf
        while self.alive:
            if not self.ongoing():
                self.wake.clear()
                await self.wake.wait()
                continue
            running = len(self.prefilling) + len(self.decoding)
            while self.waiting and running < profile.max_num_seqs:
                self.prefilling.append(heapq.heappop(self.waiting)[-1])
                running += 1
            budget = budget_max - len(self.decoding)
            prefill, prefilled = 0, []
            for job in self.prefilling:
                take = min(job.prompt_tokens - job.prefilled, max(budget, 0))
                job.prefilled += take
                prefill += take
                budget -= take
                if job.prefilled >= job.prompt_tokens:
                    prefilled.append(job)
            noise = math.exp(self.tier.rng.gauss(0.0, profile.step_noise)) if profile.step_noise else 1.0
            step_s = profile.step_ms(running, prefill) * noise * self.slowdown / 1e3
            decoding = len(self.decoding)
            await asyncio.sleep(step_s)
            now = loop.time()
            if decoding:
                self.tokens += profile.tokens_per_step
            self.tracker.observe_step(running, prefill, round(decoding * profile.tokens_per_step), step_s)
            front = self.tier.front
            # The step's tokens reach their clients once the front end has relayed them.
            seen = front.take(now, front.token_ms * (len(prefilled) + decoding * profile.tokens_per_step))
            for job in prefilled:
                if job not in self.prefilling:
                    continue  # aborted while the step ran
                self.prefilling.remove(job)
                job.first_seen = seen
                job.first.set_result(now)
                # The first token came with the prefill; the rest at tokens_per_step a step.
                heapq.heappush(self.decoding, (self.tokens + job.output_tokens - 1, job.order, job))
            ended = 0
            while self.decoding and self.decoding[0][0] <= self.tokens:
                job = heapq.heappop(self.decoding)[-1]
                if job.done.done():  # its caller gave up (a timeout) while the step ran
                    continue
                job.last_seen = seen
                job.done.set_result(now)
                first_at = job.first.result()
                tpot = (now - first_at) / (job.output_tokens - 1) if job.output_tokens > 1 else None
                self.tracker.observe_request(None, tpot, job.output_tokens)
                ended += 1
            if ended:
                self.tier.refill(self)


class SimTier:
    """A tier's replicas behind Serve: a request goes to the less loaded of two live replicas
    with room (`max_ongoing_requests`), else waits in the tier's queue for the first free place."""

    def __init__(self, spec: TierSpec, rng: random.Random, front: FrontEnd | None = None):
        self.spec = spec
        self.rng = rng
        self.front = front or FrontEnd()
        """The front end that relays this tier's tokens (shared by every tier of a service)."""
        self.max_ongoing = spec.max_ongoing_requests or 2 * spec.profile.max_num_seqs
        self.queue: deque[Job] = deque()
        self.replicas = [SimReplica(self) for _ in range(spec.replicas)]
        self.dead_seen: list[SimReplica] = []
        """Dead replicas Serve still counts as running (it has not noticed yet)."""
        self.slowdown = 1.0

    def live(self) -> list[SimReplica]:
        return [r for r in self.replicas if r.alive]

    def pick(self, among: list[SimReplica] | None = None) -> SimReplica:
        """The less loaded of two live replicas picked at random (Serve's power of two choices)."""
        live = self.live() if among is None else among
        if not live:
            raise ServiceUnavailable(f"tier {self.spec.name} has no live replica", "model", "engine_unavailable")
        if len(live) == 1:
            return live[0]
        a, b = self.rng.sample(live, 2)
        return a if a.ongoing() <= b.ongoing() else b

    def submit(self, job: Job) -> None:
        live = self.live()
        if not live:
            raise ServiceUnavailable(f"tier {self.spec.name} has no live replica", "model", "engine_unavailable")
        room = [r for r in live if r.ongoing() < self.max_ongoing]
        if room:
            self.pick(room).enter(job)
        elif self.spec.max_queued_requests < 0 or len(self.queue) < self.spec.max_queued_requests:
            self.queue.append(job)
        else:
            raise Overloaded(f"tier {self.spec.name}'s Serve queue is full", retry_after_s=1.0)

    def withdraw(self, job: Job) -> None:
        """The caller of a job went away."""
        if job.replica is not None:
            job.replica.abort(job)
        elif job in self.queue:
            self.queue.remove(job)

    def refill(self, replica: SimReplica) -> None:
        """Places freed on `replica` go to the tier's queue, oldest first."""
        while self.queue and replica.alive and replica.ongoing() < self.max_ongoing:
            replica.enter(self.queue.popleft())

    def kill_one(self) -> SimReplica | None:
        live = self.live()
        if not live:
            return None
        live[0].kill()
        self.dead_seen.append(live[0])
        if not self.live():  # what Serve had queued for the tier fails with it
            while self.queue:
                self.queue.popleft().fail(ServiceUnavailable("the tier has no live replica", "model"))
        return live[0]

    def replace(self, dead: SimReplica) -> SimReplica:
        new = SimReplica(self)
        new.slowdown = self.slowdown
        self.replicas[self.replicas.index(dead)] = new
        new.task = asyncio.get_running_loop().create_task(new.run())
        self.refill(new)
        return new

    def slow_down(self, factor: float) -> None:
        self.slowdown *= factor
        for replica in self.replicas:
            replica.slowdown *= factor

    def as_serve_sees_it(self) -> TierReplicas:
        running = len(self.live()) + len(self.dead_seen)
        pending = sum(1 for r in self.replicas if not r.alive and r not in self.dead_seen)
        return TierReplicas(running, pending, 0, "HEALTHY" if running else "UNHEALTHY", "")
