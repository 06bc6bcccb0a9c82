"""The routing policy: which tiers, in which order, may serve a request, and why.

Plain code with no Ray in it, so that it can be read and tested on its own. The ingress gives
it the request's features (estimated prompt tokens, complexity score, the tier it names), its
latency budget, and what it knows of each tier right now (`TierView`: health, requests in
flight, the tier's polled `TierLoad`); it returns a `Decision`: the tiers to try in order, each
with its predicted time to first token (TTFT), time per output token (TPOT) and cost, plus the
reason for the first choice. An empty decision means shed the request.

How a tier is chosen for `model: auto`:

1. Complexity picks a **target**: tiers are ranked weakest to strongest by `min_complexity`,
   and the target is the strongest tier whose threshold the score reaches.
2. A tier is **admitted** if it is healthy, the prompt fits its context, its queue (requests
   beyond its engine's slots) is shorter than its `max_queue`, (with `shed_over_budget`) its
   predicted time to first token is within that many times the request's TTFT budget (a
   request beyond it even on the idle tier: while no engine slot is free, `_late_ms`), and (with
   `shed_over_tpot_budget`) its predicted time per token within that many times the TPOT budget.
3. Among admitted tiers, those **predicted to meet the budget** come first: the cheapest tier
   at least as strong as the target (weakest first on equal cost), else the strongest below
   it. A tier meets the budget when its predictions are within `headroom` of the request's
   budgets and, with this request added, within `headroom` of the tightest TPOT budget of the
   requests already running there. If none is predicted to meet the budget (best effort), the
   earliest predicted first token comes first (`best_effort="first_token"`, the default); with
   `best_effort="fit"`, the tiers predicted to meet the request's own budget (though not the
   running requests') come first, the slowest of them first (best fit: the fast tier stays for
   the requests only it can serve), then the tier predicted closest to the budget (the smallest
   ratio of a prediction to its budget): an interactive request goes to the tier that can
   almost keep its pace, not to the one that starts it soonest and then streams too slowly. The
   rest follow in the same order, as fallbacks.

Predictions come from the tier's step-cost model: with `n` requests in the tier (as the tier
last reported, or as this ingress has in flight there, whichever is more), a new request's
tokens come every `step(min(n + 1, slots)) / tokens_per_step` (with `tpot_counts_prefill`,
`step(min(n + 1, slots), prefill)`, where `prefill` is the prompt tokens the tier recently
prefilled per step: chunked prefill puts other requests' prompts into the steps that decode
this one); its first token comes after the wait for a slot (if all are taken), half a step, and
the step that prefills its prompt. Both options come from the routing simulator
(docs/routing-simulation.md), which found them ahead on GPU clusters; on the 2-core service
they measured worse at 1 req/s, so they are off unless configured (configs/gpu.yaml). The
predicted TTFT is then corrected by what the ingress has measured against the model lately
(`TtftCorrection`; `routing.ttft_feedback`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tierserve.actors.types import TierLoad
from tierserve.router.config import TierCost

DEFAULT_OUTPUT_TOKENS = 128
"""Output length assumed for a request without `max_tokens` on a tier that reported none."""


@dataclass(frozen=True, slots=True)
class Sla:
    """A request's latency budget; None bounds are not budgeted."""

    name: str | None = None
    """The SLA class it came from ('custom' for budgets sent as headers), None for no budget."""
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    priority: int = 0
    """The class's request priority on tiers that schedule by priority (lower goes first)."""

    def met_by(self, ttft_ms: float | None, tpot_ms: float | None, headroom: float = 1.0) -> bool:
        """Whether these latencies are within `headroom` times the budget; an unknown latency
        counts as within."""
        ok_ttft = self.ttft_ms is None or ttft_ms is None or ttft_ms <= headroom * self.ttft_ms
        ok_tpot = self.tpot_ms is None or tpot_ms is None or tpot_ms <= headroom * self.tpot_ms
        return ok_ttft and ok_tpot


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    prompt_tokens: int
    """Estimated from the text (chars / 4) unless token ids were sent."""
    max_tokens: int | None = None
    complexity: float | None = None
    """Score in [0, 1]; None when the request names its tier or routing has no tiers configured."""
    named_tier: str | None = None
    """The tier the request names; it goes there and nowhere else."""


@dataclass(frozen=True, slots=True)
class TtftCorrection:
    """How the tier's first tokens have come against the step-cost model's predictions lately,
    as the ingress measured them: observed = `scale` x modelled (`TtftFit` in
    `tierserve.router.state` fits it). The model sees only the engine's queue and steps; the
    input guards, the ingress's own queue and cores shared with other processes are in the
    difference, and they grow with the load as the engine's queue does. A scale, not an offset:
    a delay learnt in a burst must not keep a near-idle tier from admitting the requests that
    would show it gone. The identity changes nothing."""

    scale: float = 1.0

    def __call__(self, modelled_ms: float) -> float:
        return self.scale * modelled_ms


@dataclass(slots=True)
class TierView:
    """What the router knows about a tier at decision time."""

    name: str
    min_complexity: float = 0.0
    cost: TierCost = field(default_factory=TierCost)
    max_queue: int = 32
    max_model_len: int | None = None
    healthy: bool = True
    in_flight: int = 0
    """Requests this ingress has sent there that have not finished."""
    load: TierLoad | None = None
    """The tier's last polled load (of the replica that answered); None before the first poll."""
    replicas: int = 1
    """Replicas of the tier: a polled load is one replica's, assumed the same on the others."""
    tightest_tpot_ms: float | None = None
    """The tightest TPOT budget among requests this ingress has running there: one more
    request must not push their tokens past it."""
    priorities: dict[int, int] = field(default_factory=dict)
    """Requests this ingress has in flight there, by priority."""
    ttft_correction: TtftCorrection = TtftCorrection()
    """Applied to the modelled TTFT (`routing.ttft_feedback`)."""
    hold_steps: float = 0.0
    """Engine steps the output guards lately held a caller's first text back after the tier's
    first token (a decayed mean): the caller's first token comes that many steps later."""

    def in_system(self) -> int:
        """Requests in the tier: as reported (all replicas), or as this ingress counts them."""
        reported = (self.load.running + self.load.waiting) * self.replicas if self.load is not None else 0
        return max(reported, self.in_flight)

    def slots(self) -> int:
        return max(1, self.load.max_num_seqs * self.replicas) if self.load is not None else 1

    def share_ahead(self, priority: int) -> float:
        """The share of the tier's queue a request of `priority` waits behind: all of it on a
        first-come-first-served engine; on a priority-scheduled one, the share of this
        ingress's requests there at the same or a more urgent priority (an estimate: the
        engine's queue is not reported by priority, and urgent requests are likelier to be
        running than waiting, so it errs towards a longer wait)."""
        if self.load is None or not self.load.priority_scheduling or not self.priorities:
            return 1.0
        total = sum(self.priorities.values())
        return sum(n for p, n in self.priorities.items() if p <= priority) / total if total else 1.0


@dataclass(frozen=True, slots=True)
class Prediction:
    ttft_ms: float | None
    tpot_ms: float | None
    queued_ahead: int
    """Requests that would wait for a slot ahead of this one."""
    request_ms: float | None
    """How long a typical request holds a slot there now."""
    modelled_ttft_ms: float | None = None
    """`ttft_ms` before the tier's `TtftCorrection`: what the step-cost model alone says."""
    idle_ttft_ms: float | None = None
    """The request's TTFT on the same tier with nothing else running (corrected as `ttft_ms`):
    the best the tier can do for it."""


@dataclass(frozen=True, slots=True)
class Choice:
    tier: str
    predicted_ttft_ms: float | None
    predicted_tpot_ms: float | None
    meets_sla: bool
    estimated_cost: float
    modelled_ttft_ms: float | None = None
    """The prediction before correction (see `Prediction`): what the router learns from."""


@dataclass(slots=True)
class Decision:
    choices: list[Choice]
    """Tiers to try, in order; empty: shed the request."""
    reason: str
    """Why the first choice: `named`; `complexity` (the target tier), or `default` when no
    complexity routing is configured; `sla` (the target is predicted to miss the budget),
    `cost` (a cheaper tier as strong as the target), `target_full` / `target_unhealthy` /
    `target_context` (the target was not admitted); `best_effort` (no tier is predicted to meet
    the budget); `context` (the prompt looks too long for every tier: the longest-context one
    decides). With no choices: `overloaded` or `unavailable`."""
    target: str | None = None
    """The tier complexity asked for (None for a named tier)."""
    refused: dict[str, str] = field(default_factory=dict)
    """Tiers not admitted, with why: unhealthy, full, context, over_budget."""
    retry_after_s: float | None = None
    """With no choices: when a place is likely to free up."""

    @property
    def first(self) -> Choice | None:
        return self.choices[0] if self.choices else None


def predict(
    view: TierView,
    prompt_tokens: int,
    max_tokens: int | None = None,
    priority: int = 0,
    tpot_counts_prefill: bool = False,
) -> Prediction:
    """TTFT and TPOT of one more request on this tier, from its step-cost model; `priority`
    counts on a priority-scheduled tier, where only more urgent waiting requests go first. With
    `tpot_counts_prefill`, each decoding step also carries the prompt tokens the tier recently
    prefilled per step (vLLM's chunked prefill mixes other requests' prompts into it)."""
    load = view.load
    if load is None:
        return Prediction(None, None, 0, None)
    n, slots = view.in_system(), view.slots()
    # One replica's batch: requests spread over replicas (Serve routes to the less loaded).
    batch = min(-(-(n + 1) // view.replicas), load.max_num_seqs)
    step = load.step_ms(batch)
    beside = round(load.prefill_tokens_per_step) if tpot_counts_prefill else 0
    tpot = load.step_ms(batch, beside) / max(load.tokens_per_step, 1e-6)
    output = load.mean_output_tokens or DEFAULT_OUTPUT_TOKENS
    if max_tokens is not None:
        output = min(output, max_tokens)
    full_tpot = load.step_ms(load.max_num_seqs) / max(load.tokens_per_step, 1e-6)
    request_ms = output * full_tpot
    # With every slot taken it waits behind the queue (or, on a priority-scheduled engine,
    # behind the queue's requests of the same or a more urgent priority).
    queued = 0 if n < slots else round((n - slots) * view.share_ahead(priority)) + 1
    # Slots free up at `slots` per `request_ms` when every slot is taken.
    wait = queued * request_ms / slots
    modelled = wait + step / 2 + load.step_ms(batch, prompt_tokens)
    # The caller's first token comes the output guards' recent hold after the tier's.
    hold = view.hold_steps
    idle = view.ttft_correction(load.step_ms(1) / 2 + load.step_ms(1, prompt_tokens)) + hold * load.step_ms(1)
    ttft = view.ttft_correction(modelled) + hold * step
    return Prediction(ttft, tpot, queued, request_ms, modelled, idle)


def ranked_tiers(views: list[TierView]) -> list[TierView]:
    """Weakest to strongest: by `min_complexity`, then config order."""
    return [v for _, v in sorted(enumerate(views), key=lambda iv: (iv[1].min_complexity, iv[0]))]


def complexity_target(views: list[TierView], score: float) -> TierView:
    """The strongest tier whose threshold `score` reaches (the weakest if it reaches none)."""
    ranked = ranked_tiers(views)
    target = ranked[0]
    for view in ranked:
        if score >= view.min_complexity:
            target = view
    return target


def _refusal(view: TierView, features: RequestFeatures, prediction: Prediction) -> str | None:
    if not view.healthy:
        return "unhealthy"
    needed = features.prompt_tokens + (features.max_tokens or 0)
    if view.max_model_len is not None and features.prompt_tokens >= view.max_model_len:
        return "context"
    if view.max_model_len is not None and features.max_tokens and needed > view.max_model_len:
        return "context"
    if view.load is not None and prediction.queued_ahead > view.max_queue:
        return "full"
    return None


def _over(predicted: float | None, budget: float | None, factor: float | None) -> bool:
    """Whether a prediction is past `factor` times its budget (never, with any of them unknown)."""
    return None not in (predicted, budget, factor) and predicted > factor * budget


def _late_ms(prediction: Prediction, budget: float | None, factor: float | None) -> float:
    """How far past what `shed_over_budget` (`factor`) allows a request's first token is
    predicted, in ms (0: within it, and not shed): past `factor` times its TTFT budget.
    Measured so, a request the tier cannot answer within that even when idle (a long prompt, or
    retrieved passages counted at their most) would be refused on every try, with a
    `Retry-After` that never comes true: it is shed only when it would wait for an engine slot
    (late by that wait), and served while the tier has room."""
    if None in (prediction.ttft_ms, budget, factor):
        return 0.0
    idle = prediction.idle_ttft_ms
    if idle is not None and idle > factor * budget:
        return prediction.ttft_ms - idle if prediction.queued_ahead > 0 else 0.0
    return max(0.0, prediction.ttft_ms - factor * budget)


def _overshoot(choice: Choice, sla: Sla) -> float:
    """How far over its budget a tier is predicted to serve a request: the larger ratio of a
    prediction to its budget (TTFT, TPOT); 0 with nothing budgeted or predicted."""
    pairs = ((choice.predicted_ttft_ms, sla.ttft_ms), (choice.predicted_tpot_ms, sla.tpot_ms))
    return max((p / b for p, b in pairs if p is not None and b), default=0.0)


def _retry_after(
    views: list[TierView], predictions: dict[str, Prediction], sla: Sla, factor: float | None = None
) -> float:
    """Seconds until the first full tier is likely to have a queue place again, or a tier over
    the budget to be back within it (at least 1)."""
    waits = []
    for view in views:
        p = predictions[view.name]
        if view.healthy and view.load is not None and p.request_ms:
            excess = p.queued_ahead - view.max_queue
            if excess > 0:
                waits.append(excess * p.request_ms / view.slots() / 1e3)
            elif (late_ms := _late_ms(p, sla.ttft_ms, factor)) > 0:
                waits.append(late_ms / 1e3)
    return max(1.0, math.ceil(min(waits))) if waits else 1.0


def decide(
    features: RequestFeatures,
    sla: Sla,
    views: list[TierView],
    default_tier: str | None = None,
    headroom: float = 1.0,
    shed_over_budget: float | None = None,
    shed_over_tpot_budget: float | None = None,
    best_effort: str = "first_token",
    tpot_counts_prefill: bool = False,
) -> Decision:
    """The ordered tiers for a request (see the module docstring). A tier meets the budget when
    its predictions are within `headroom` times the request's budgets and the predicted TPOT is
    within `headroom` times the tightest TPOT budget of the requests already running there.
    With `shed_over_budget`, a tier predicted to take more than that many times the request's
    TTFT budget to its first token is not a choice (`over_budget`): better a 429 now than an
    answer far too late; with `shed_over_tpot_budget`, nor is one predicted to stream at more
    than that many times its TPOT budget. `best_effort` orders the tiers when none meets the
    budget: `first_token` (earliest predicted first token first) or `fit` (see the module
    docstring); `tpot_counts_prefill`: see `predict`."""
    if features.named_tier is not None:
        views = [v for v in views if v.name == features.named_tier]
        if not views:
            raise ValueError(f"unknown tier {features.named_tier!r}")
    predictions = {
        v.name: predict(v, features.prompt_tokens, features.max_tokens, sla.priority, tpot_counts_prefill)
        for v in views
    }
    expected_output = features.max_tokens
    admitted: list[tuple[TierView, Choice]] = []
    refused: dict[str, str] = {}
    for view in views:
        p = predictions[view.name]
        why = _refusal(view, features, p)
        if why is None and (
            _late_ms(p, sla.ttft_ms, shed_over_budget) > 0 or _over(p.tpot_ms, sla.tpot_ms, shed_over_tpot_budget)
        ):
            why = "over_budget"
        if why is not None:
            refused[view.name] = why
            continue
        recent = view.load.mean_output_tokens if view.load is not None else None
        output = expected_output or round(recent or DEFAULT_OUTPUT_TOKENS)
        protects = view.tightest_tpot_ms is None or p.tpot_ms is None or p.tpot_ms <= headroom * view.tightest_tpot_ms
        admitted.append(
            (
                view,
                Choice(
                    view.name,
                    p.ttft_ms,
                    p.tpot_ms,
                    sla.met_by(p.ttft_ms, p.tpot_ms, headroom) and protects,
                    view.cost.of(features.prompt_tokens, output),
                    p.modelled_ttft_ms,
                ),
            )
        )
    if features.named_tier is not None:
        target = None
    elif features.complexity is not None:
        target = complexity_target(views, features.complexity).name
    else:
        target = default_tier or views[0].name

    if not admitted and refused and set(refused.values()) == {"context"}:
        # Too long for every tier, by the estimate: the longest-context tier tokenizes it and
        # answers with the exact 400 (or serves it, if the estimate was high).
        widest = max(views, key=lambda v: v.max_model_len or 0)
        p = predictions[widest.name]
        choice = Choice(widest.name, p.ttft_ms, p.tpot_ms, sla.met_by(p.ttft_ms, p.tpot_ms), 0.0, p.modelled_ttft_ms)
        return Decision([choice], "context", target, refused)
    if not admitted:
        reason = "overloaded" if any(v.healthy for v in views) else "unavailable"
        return Decision([], reason, target, refused, _retry_after(views, predictions, sla, shed_over_budget))

    rank = {v.name: i for i, v in enumerate(ranked_tiers(views))}
    target_rank = rank.get(target, 0) if target is not None else 0

    def order(item: tuple[TierView, Choice]) -> tuple:
        view, choice = item
        if choice.meets_sla:
            if rank[view.name] >= target_rank:
                return (0, choice.estimated_cost, rank[view.name])
            return (1, -rank[view.name], 0)
        ttft = choice.predicted_ttft_ms if choice.predicted_ttft_ms is not None else math.inf
        if best_effort == "first_token":
            return (2, ttft, 0.0, rank[view.name])
        if sla.met_by(choice.predicted_ttft_ms, choice.predicted_tpot_ms, headroom):
            # Its own budget met, the running requests' not: the slowest such tier (best fit),
            # keeping the fast one for the requests only it can serve.
            return (2, -(choice.predicted_tpot_ms or 0.0), ttft, rank[view.name])
        return (3, _overshoot(choice, sla), ttft, rank[view.name])

    if features.named_tier is None:
        admitted.sort(key=order)
    choices = [c for _, c in admitted]
    first = choices[0]
    if features.named_tier is not None:
        reason = "named"
    elif not first.meets_sla:
        reason = "best_effort"
    elif first.tier != target:
        target_choice = next((c for c in choices if c.tier == target), None)
        if target is not None and target in refused:
            reason = f"target_{refused[target]}"  # target_full, target_unhealthy, target_context
        elif target_choice is not None and target_choice.meets_sla:
            reason = "cost"
        else:
            reason = "sla"
    else:
        reason = "complexity" if features.complexity is not None else "default"
    return Decision(choices, reason, target, refused)
