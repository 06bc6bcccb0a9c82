"""The router as the ingress uses it: budget and features of a request, the policy's decision,
and the fallback loop that opens a tier's stream.

`Router.plan` reads the request's latency budget (its SLA class or its own `x-slo-*`
budgets), scores its complexity when it asks for `model: auto`, and asks the policy
(`policy.decide`) for the tiers to try; an empty decision is shed at once with 429 (some tier
is up but full) or 503 (none is up), with `Retry-After`. `Router.open` then tries the choices
in order until one sends its first batch of tokens: a tier that is dead, full, out of context
or silent past `first_token_timeout_s` is skipped for the next one. Once tokens flow the
request stays on its tier; a later failure ends the stream with an error event, so a client
never sees tokens from two tiers spliced together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from tierserve.actors.types import TokenChunk, Usage
from tierserve.core.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    ServiceUnavailable,
    TierServeError,
)
from tierserve.router.config import RoutingConfig
from tierserve.router.policy import Choice, Decision, RequestFeatures, Sla, TierView, decide
from tierserve.router.state import TierStates

logger = logging.getLogger("tierserve.router")

TIER_HEADER = "x-tierserve-tier"
REASON_HEADER = "x-tierserve-route-reason"

T = TypeVar("T")

CHARS_PER_TOKEN = 4
"""For estimating prompt tokens before any tokenizer runs (English text, BPE vocabularies)."""


@dataclass(slots=True)
class Routed:
    """One request's routing: what was decided, what was tried, where it runs."""

    decision: Decision
    sla: Sla
    features: RequestFeatures
    arrived: float
    """When the ingress got the request (`Router.clock`: perf_counter())."""
    tier: str | None = None
    choice: Choice | None = None
    tried: list[tuple[str, str]] = field(default_factory=list)
    """Tiers that failed before their first token, with the error code."""
    first_token_at: float | None = None
    """When the caller's first token left: set when the tier's first tokens are in and the input
    guards have passed (`Router.open`), and moved to when the output guards let the first text
    through (`Router.first_token`), which can be a few tokens later."""
    retrieval_s: float = 0.0
    """Time spent retrieving passages before the tier: part of the client's wait, but not of any
    tier's, so the TTFT fit (`TierStates.first_token`) leaves it out."""
    usage: Usage | None = None
    cost: float | None = None
    reserved: str | None = None
    """The tier whose place this request holds from its decision until it starts there (or
    gives the place back, `Router.release`): counted in flight from the moment it was decided,
    so a burst of requests decided together sees each other."""

    @property
    def reason(self) -> str:
        return "fallback" if self.tried else self.decision.reason

    def headers(self) -> dict[str, str]:
        """What the response headers say about routing."""
        out = {TIER_HEADER: self.tier or "", REASON_HEADER: self.reason}
        if self.features.complexity is not None:
            out["x-tierserve-complexity"] = f"{self.features.complexity:.3f}"
        if self.sla.name is not None:
            out["x-tierserve-sla-class"] = self.sla.name
        if self.choice is not None and self.choice.predicted_ttft_ms is not None:
            out["x-tierserve-predicted-ttft-ms"] = f"{self.choice.predicted_ttft_ms:.0f}"
        if self.choice is not None and self.choice.predicted_tpot_ms is not None:
            out["x-tierserve-predicted-tpot-ms"] = f"{self.choice.predicted_tpot_ms:.1f}"
        if self.tried:
            out["x-tierserve-fallback-from"] = ",".join(t for t, _ in self.tried)
        return out

    def extension(self) -> dict[str, Any]:
        """The `tierserve` field of the response body (OpenAI clients keep it in `model_extra`)."""
        choice = self.choice
        return {
            "tier": self.tier,
            "reason": self.reason,
            "decision_reason": self.decision.reason,
            "target_tier": self.decision.target,
            "complexity": None if self.features.complexity is None else round(self.features.complexity, 4),
            "sla_class": self.sla.name,
            "slo_ttft_ms": self.sla.ttft_ms,
            "slo_tpot_ms": self.sla.tpot_ms,
            "predicted_ttft_ms": _rounded(choice.predicted_ttft_ms if choice else None, 1),
            "predicted_tpot_ms": _rounded(choice.predicted_tpot_ms if choice else None, 2),
            "fallback_from": [{"tier": t, "error": code} for t, code in self.tried],
            "estimated_cost": _rounded(self.cost, 9),
        }

    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else 1e3 * (self.first_token_at - self.arrived)

    def tpot_ms(self, ended: float) -> float | None:
        if self.first_token_at is None or self.usage is None or self.usage.completion_tokens < 2:
            return None
        return 1e3 * (ended - self.first_token_at) / (self.usage.completion_tokens - 1)


async def primed(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """`stream`, an async generator whose first `yield` is a placeholder, run up to that yield.

    A generator's `finally` runs only once it has started: one handed to a caller who never
    iterates it (a client gone before the response body is read) would never release what it
    holds. Started, it is closed by the event loop when dropped, so its `finally` always runs."""
    await anext(stream)
    return stream


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


class Router:
    """Per-ingress routing state: config, live tier views and the complexity scorer."""

    def __init__(
        self,
        routing: RoutingConfig,
        tiers: list[str],
        default_tier: str,
        cache_dir: Path | None = None,
        replicas: dict[str, int] | None = None,
        scorer: Any = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        """`scorer` replaces the complexity scorer the routing config names, and `clock` the
        wall clock: the routing simulator (`tierserve.router.sim`) runs this router in
        simulated time with the complexity scores of its trace."""
        self.config = routing
        self.default_tier = default_tier
        self.clock = clock
        self.states = TierStates(tiers, routing, replicas, clock)
        self.scorer: Any = scorer
        if routing.tiers and scorer is None:
            from tierserve.core.config import default_cache_dir
            from tierserve.router.complexity import scorer_for

            self.scorer = scorer_for(routing.complexity, (cache_dir or default_cache_dir()) / "router")

    def sla(self, sla_class: str | None, ttft_ms: float | None, tpot_ms: float | None) -> Sla:
        """The request's budget: its own numbers over its class's over the default class's."""
        name = sla_class or self.config.default_sla_class
        base = None
        if name is not None:
            base = self.config.sla_classes.get(name)
            if base is None:
                known = ", ".join(self.config.sla_classes) or "none configured"
                raise InvalidRequest(f"unknown sla_class {name!r}; known: {known}", "sla_class")
        if ttft_ms is not None or tpot_ms is not None:
            name = "custom" if sla_class is None else name
        return Sla(
            name,
            ttft_ms if ttft_ms is not None else (base.ttft_ms if base else None),
            tpot_ms if tpot_ms is not None else (base.tpot_ms if base else None),
            base.priority if base else 0,
        )

    def sla_of(self, body: Any) -> Sla:
        """The budget a parsed request asks for (its HTTP headers already applied:
        `ChatCompletionRequest.with_headers`)."""
        return self.sla(body.sla_class, body.slo_ttft_ms, body.slo_tpot_ms)

    async def complexity(self, text: str, turns: int) -> float | None:
        if self.scorer is None:
            return None
        if self.scorer.embedder is None:  # cheap features only: inline
            return self.scorer.score(text, turns).value
        return (await asyncio.to_thread(self.scorer.score, text, turns)).value

    async def plan(
        self, body: Any, named_tier: str | None, extra_tokens: int = 0, allowed: set[str] | None = None
    ) -> Routed:
        """Budget, features and decision for one request (no choices: shed it, `rejection`).
        `extra_tokens`: prompt tokens added after routing (retrieved passages), for the
        context-length check; complexity is scored on the request's own text. `allowed`: the
        tiers the caller's key may use (None: all); `model: auto` is routed among them only."""
        arrived = self.clock()
        sla = self.sla_of(body)
        text, turns = body.routing_text()
        prompt = getattr(body, "prompt", None)
        if isinstance(prompt, list):  # token ids
            tokens = len(prompt)
        else:
            tokens = max(1, len(text) // CHARS_PER_TOKEN)
        tokens += extra_tokens
        features = RequestFeatures(tokens, body.requested_max_tokens(), None, named_tier)
        c = self.config
        options = {
            "shed_over_budget": c.shed_over_budget,
            "shed_over_tpot_budget": c.shed_over_tpot_budget,
            "best_effort": c.best_effort,
            "tpot_counts_prefill": c.tpot_counts_prefill,
        }
        default = self.default_tier if allowed is None or self.default_tier in allowed else None

        def views() -> list[TierView]:
            snapshot = self.states.snapshot()
            return snapshot if allowed is None else [v for v in snapshot if v.name in allowed]

        decision = decide(features, sla, views(), default, c.slo_headroom, **options)
        # Which tiers admit the request does not depend on its complexity, so a request no tier
        # admits is shed before it is scored: under overload, shedding stays cheap.
        if named_tier is None and decision.choices and self.scorer is not None:
            features = replace(features, complexity=await self.complexity(text, turns))
            decision = decide(features, sla, views(), default, c.slo_headroom, **options)
        routed = Routed(decision, sla, features, arrived)
        if decision.choices:  # hold the place now: guards and retrieval still run before it starts
            routed.reserved = decision.choices[0].tier
            self.states.started(routed.reserved, sla)
        return routed

    def release(self, routed: Routed) -> None:
        """Give back the place `plan` reserved, if the request never started on a tier (an error
        or a refusal before it did). Safe to call more than once."""
        if routed.reserved is not None:
            self.states.finished(routed.reserved, routed.sla)
            routed.reserved = None

    def cost(self, routed: Routed) -> float | None:
        """The request's cost on the tier that served it, from its usage and the tier's prices."""
        if routed.usage is None or routed.tier is None:
            return None
        return self.price(routed.tier, routed.usage.prompt_tokens, routed.usage.completion_tokens)

    def price(self, tier: str, prompt_tokens: int, completion_tokens: int) -> float:
        """What these tokens cost on `tier`, at its prices (`routing.tiers.<tier>.cost`)."""
        return self.states.views[tier].cost.of(prompt_tokens, completion_tokens)

    def rejection(self, decision: Decision) -> TierServeError:
        refused = ", ".join(f"{t}: {why}" for t, why in decision.refused.items())
        if decision.reason == "overloaded":
            exc: TierServeError = Overloaded(
                f"tierserve is at capacity for this request ({refused}); retry after {decision.retry_after_s:g}s",
                retry_after_s=decision.retry_after_s or 1.0,
            )
        else:
            exc = ServiceUnavailable(
                f"no tier can serve this request now ({refused})",
                "model",
                "no_tier_available",
                retry_after_s=decision.retry_after_s or 1.0,
            )
        return exc

    async def open(
        self,
        routed: Routed,
        start: Callable[[str], AsyncIterator[list[TokenChunk]]],
        ready: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[list[TokenChunk]]:
        """The first choice that sends tokens, as a stream of batches (first batch included).

        `start(tier)` begins the request on a tier. Choices after the first are tried only for
        `model: auto` requests, and only while no token has been sent. `ready()`, awaited once
        the first batch is in and before the stream is handed on (the input guards still
        checking), may raise: the tier's request is then aborted and the error raised."""
        attempts = routed.decision.choices[: self.config.max_attempts]
        sla = routed.sla
        last: TierServeError | None = None
        for choice in attempts:
            stream = start(choice.tier)
            if routed.reserved == choice.tier:
                routed.reserved = None  # the place held since the decision is now this request's
            else:
                self.release(routed)
                self.states.started(choice.tier, sla)
            try:
                first = await self._first(stream)
            except TierServeError as exc:
                self.states.finished(choice.tier, sla)
                if not self._retryable(exc, routed):
                    raise
                if isinstance(exc, ServiceUnavailable):
                    self.states.failed(choice.tier, str(exc))
                routed.tried.append((choice.tier, exc.code or "error"))
                last = exc
                continue
            except BaseException:
                self.states.finished(choice.tier, sla)
                raise
            if ready is not None:
                try:
                    await ready()
                except BaseException:
                    self.states.finished(choice.tier, sla)
                    await stream.aclose()  # aborts the engine's request
                    raise
            routed.tier, routed.choice = choice.tier, choice
            routed.first_token_at = self.clock()
            if first is not None and not routed.tried and choice.modelled_ttft_ms is not None:
                observed_ms = 1e3 * (routed.first_token_at - routed.arrived - routed.retrieval_s)
                self.states.first_token(choice.tier, choice.modelled_ttft_ms, observed_ms)
            return await primed(self._counted(choice.tier, first, stream, routed.arrived, sla))
        assert last is not None
        if len(attempts) > 1:
            last.message = f"{last.message} (tried {', '.join(t for t, _ in routed.tried)})"
        if isinstance(last, ServiceUnavailable) and last.retry_after_s is None:
            last.retry_after_s = 1.0
        raise last

    def first_token(self, routed: Routed, last: bool, held_steps: int) -> None:
        """The caller's first text left the ingress, `held_steps` engine steps after the tier's
        first token (in the answer's last batch if `last`). Called once a started request, by
        whoever relays its stream (the pipeline, after the output guards).

        The output guards hold back text that may be the start of a name or an address until the
        word ends, often a few tokens, so the caller's first token comes later than the tier's.
        That later time is what the SLA's TTFT budget is about: it is the time to first token in
        the metrics and the audit log, and the tier's recent holds (`TierView.hold_steps`) are
        added to its predictions. An answer held back to its end (a whole tool call) says how
        long the answer was, not how long guards hold a first word, so it does not count."""
        routed.first_token_at = self.clock()
        if not last and routed.choice is not None and not routed.tried:
            self.states.held(routed.choice.tier, held_steps)

    async def _first(self, stream: AsyncIterator[list[TokenChunk]]) -> list[TokenChunk] | None:
        timeout = self.config.first_token_timeout_s
        try:
            return await asyncio.wait_for(anext(stream), timeout)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            await stream.aclose()
            raise RequestTimeout(
                f"no token within first_token_timeout_s={timeout:g}s", None, "first_token_timeout"
            ) from None

    @staticmethod
    def _retryable(exc: TierServeError, routed: Routed) -> bool:
        if routed.features.named_tier is not None:
            return False
        return isinstance(exc, (ServiceUnavailable, Overloaded, RequestTimeout, ContextLengthExceeded))

    async def _counted(
        self,
        tier: str,
        first: list[TokenChunk] | None,
        stream: AsyncIterator[list[TokenChunk]],
        arrived: float,
        sla: Sla,
    ) -> AsyncIterator[list[TokenChunk]]:
        """The rest of the stream, counted in flight until it ends, within `request_timeout_s`."""
        timeout = self.config.request_timeout_s
        try:
            yield []  # taken by `primed`
            if first is None:
                return
            yield first
            if timeout is None:
                async for batch in stream:
                    yield batch
                return
            while True:
                remaining = arrived + timeout - self.clock()
                try:
                    batch = await asyncio.wait_for(anext(stream), max(remaining, 0.0))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise RequestTimeout(f"the request ran past request_timeout_s={timeout:g}s") from None
                yield batch
        finally:
            self.states.finished(tier, sla)
            await stream.aclose()
