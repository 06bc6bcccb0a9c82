"""`Router.open` with input guards still checking (`ready`): the first token waits for them,
and a refusal aborts the tier's request. Plain asyncio: the tier is an async generator."""

from __future__ import annotations

import asyncio
import time

import pytest

from tierserve.actors.errors import InvalidRequest
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
