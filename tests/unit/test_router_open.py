"""`Router.open` with input guards still checking (`ready`): the first token waits for them,
and a refusal aborts the tier's request. Plain asyncio: the tier is an async generator."""

from __future__ import annotations

import asyncio
import time

import pytest

from tierserve.actors.types import TierLoad
from tierserve.core.errors import InvalidRequest
from tierserve.router.config import RoutingConfig
from tierserve.router.policy import Choice, Decision, RequestFeatures, Sla
from tierserve.router.routing import Routed, Router


class Tier:
    """A tier's stream of batches that records whether it was closed (the engine's abort)."""

    def __init__(self, batches: int = 3):
        self.batches, self.sent, self.closed = batches, 0, False

    async def stream(self):
        try:
            for i in range(self.batches):
                self.sent += 1
                yield [f"token-{i}"]
        finally:
            self.closed = True


def routed() -> Routed:
    choice = Choice("small", None, None, True, 0.0)
    return Routed(Decision([choice], "default", "small", {}), Sla(), RequestFeatures(8), time.perf_counter())


@pytest.fixture
def router() -> Router:
    return Router(RoutingConfig(), ["small"], "small")


async def test_the_first_token_waits_for_the_guards_and_then_streams(router):
    tier, order = Tier(), []

    async def guards_pass():
        await asyncio.sleep(0.05)
        order.append(f"guards done after {tier.sent} batch(es) generated")

    r = routed()
    batches = await router.open(r, lambda name: tier.stream(), guards_pass)
    assert order == ["guards done after 1 batch(es) generated"]  # the tier ran meanwhile
    assert [b async for b in batches] == [["token-0"], ["token-1"], ["token-2"]]
    assert r.tier == "small" and router.states.snapshot()[0].in_flight == 0


async def test_a_refusal_aborts_the_tiers_request_and_is_raised(router):
    tier = Tier(batches=100)

    async def guards_refuse():
        raise InvalidRequest("refused by a guard", "messages", "content_policy_violation")

    with pytest.raises(InvalidRequest, match="refused by a guard"):
        await router.open(routed(), lambda name: tier.stream(), guards_refuse)
    assert tier.closed and tier.sent == 1  # aborted after its first batch, nothing handed on
    assert router.states.snapshot()[0].in_flight == 0


class Body:
    """The parts of a request `Router.plan` reads."""

    sla_class = slo_ttft_ms = slo_tpot_ms = None

    def routing_text(self):
        return "hello there", 1

    def requested_max_tokens(self):
        return 16


def busy_router(slots: int, max_queue: int) -> Router:
    from tierserve.actors.types import TierLoad
    from tierserve.router.config import TierRouting

    config = RoutingConfig(tiers={"small": TierRouting(max_queue=max_queue)}, default_sla_class=None)
    config.complexity.mode = "heuristic"
    router = Router(config, ["small"], "small")
    router.states.polled("small", TierLoad(0, 0, slots, 2048, 20.0, 5.0, 40.0, 1.0, 100.0))
    return router


async def test_a_burst_is_admitted_against_the_places_already_decided():
    """Requests decided together each hold a place from their decision, before they start on a
    tier: a burst of 100 against 4 slots and a queue of 6 admits 4 + 6, not all 100."""
    router = busy_router(slots=4, max_queue=6)
    plans = [await router.plan(Body(), None) for _ in range(100)]
    admitted = [p for p in plans if p.decision.choices]
    assert len(admitted) == 10
    assert {p.decision.reason for p in plans if not p.decision.choices} == {"overloaded"}
    # Shed before its complexity is scored; the admitted ones were scored.
    assert all(p.features.complexity is None for p in plans if not p.decision.choices)
    assert all(p.features.complexity is not None for p in admitted)
    assert router.states.snapshot()[0].in_flight == 10
    for p in admitted:
        router.release(p)
        router.release(p)  # twice is harmless
    assert router.states.snapshot()[0].in_flight == 0


async def test_a_reserved_place_is_taken_over_by_the_stream_and_freed_when_it_ends(router):
    r = await router.plan(Body(), None)
    assert router.states.snapshot()[0].in_flight == 1
    batches = await router.open(r, lambda name: Tier().stream())
    assert r.reserved is None and router.states.snapshot()[0].in_flight == 1
    assert len([b async for b in batches]) == 3
    assert router.states.snapshot()[0].in_flight == 0


async def test_a_stream_never_iterated_still_frees_its_place(router):
    """The client left before the response body was read: the stream is dropped unread."""
    import gc

    tier = Tier(batches=100)
    r = await router.plan(Body(), None)
    batches = await router.open(r, lambda name: tier.stream())
    assert router.states.snapshot()[0].in_flight == 1
    del batches
    gc.collect()
    for _ in range(10):  # the event loop closes dropped generators in a task of its own
        await asyncio.sleep(0)
    assert router.states.snapshot()[0].in_flight == 0 and tier.closed


async def test_the_first_token_teaches_the_router_how_late_it_comes():
    """`open` tells the tier's fit when the first token came against the model's prediction."""
    router = Router(RoutingConfig(ttft_feedback=True), ["small"], "small")
    router.states.polled("small", TierLoad(0, 0, 8, 2048, 20.0, 5.0, 40.0, 1.0, 100.0))
    for _ in range(40):
        r = await router.plan(Body(), None)
        modelled = r.decision.first.modelled_ttft_ms
        r.arrived -= 3 * modelled / 1e3  # the guards and the ingress's queue took 3x the model's time
        batches = await router.open(r, lambda name: Tier().stream())
        assert len([b async for b in batches]) == 3
    assert router.states.snapshot()[0].ttft_correction.scale > 2.5  # 3x, beside a prior of 1
    assert (await router.plan(Body(), None)).decision.first.predicted_ttft_ms > 2.5 * modelled


async def test_time_spent_retrieving_teaches_the_ttft_fit_nothing():
    """Retrieval happens before any tier: a slow or dead retriever (its handle waits for a new
    replica) makes the client wait, but says nothing of how late a tier's first tokens come."""
    router = Router(RoutingConfig(ttft_feedback=True), ["small"], "small")
    router.states.polled("small", TierLoad(0, 0, 8, 2048, 20.0, 5.0, 40.0, 1.0, 100.0))
    for _ in range(40):
        r = await router.plan(Body(), None)
        r.arrived -= 10.0  # ten seconds waiting for the retriever
        r.retrieval_s = 10.0
        batches = await router.open(r, lambda name: Tier().stream())
        assert len([b async for b in batches]) == 3
    assert router.states.snapshot()[0].ttft_correction.scale < 1.5


async def test_the_output_guards_hold_is_added_to_the_first_token_predicted():
    """The output guards hold back the start of a word until it ends, so the caller's first
    text can leave a few engine steps after the tier's first token: the router adds the tier's
    recent hold to what it predicts, and takes the caller's time as the request's TTFT. An
    answer held back whole (a tool call) says nothing about that hold."""
    router = Router(RoutingConfig(), ["small"], "small")
    router.states.polled("small", TierLoad(0, 0, 8, 2048, 20.0, 5.0, 40.0, 1.0, 100.0))
    first = await router.plan(Body(), None)
    router.release(first)
    before = first.decision.first.predicted_ttft_ms

    async def served(held_steps: int, last: bool) -> Routed:
        r = await router.plan(Body(), None)
        batches = await router.open(r, lambda name: Tier().stream())
        tier_first = r.first_token_at
        router.first_token(r, last, held_steps)
        assert r.first_token_at >= tier_first
        assert len([b async for b in batches]) == 3
        return r

    for _ in range(40):
        await served(12, last=True)
    assert router.states.snapshot()[0].hold_steps == 0.0
    for _ in range(40):
        await served(3, last=False)
    assert router.states.snapshot()[0].hold_steps == pytest.approx(3.0, rel=0.02)
    after = (await router.plan(Body(), None)).decision  # with nothing running, as `first`
    step_ms = router.states.snapshot()[0].load.step_ms(1)  # one request running
    assert after.first.predicted_ttft_ms == pytest.approx(before + 3 * step_ms, rel=0.02)
    assert after.first.modelled_ttft_ms == pytest.approx(before, rel=0.02)  # what the TTFT fit learns from
