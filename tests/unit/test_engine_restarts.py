"""When a replica restarts its dead engine in place (`EngineRestarts`), and when it leaves the
replica to Serve. The engine here is a stand-in with the two members the policy reads (`dead`,
`restart`); the real engine's death and restart are in tests/integration/test_engine_failure.py."""

from __future__ import annotations

import asyncio

import pytest

from tierserve.actors.restarts import EngineRestarts
from tierserve.core.errors import ServiceUnavailable


class Engine:
    def __init__(self, fail: bool = False):
        self.dead = False
        self.fail = fail
        self.release = asyncio.Event()
        self.restarts = 0

    async def restart(self) -> None:
        self.restarts += 1
        await self.release.wait()
        if self.fail:
            raise RuntimeError("no memory for the KV cache")
        self.dead = False


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_live_engine_is_left_to_its_own_health_check():
    assert EngineRestarts("small", limit=3, timeout_s=600).under_way(Engine()) is False


async def test_a_dead_engine_restarts_once_and_the_replica_stays_healthy_meanwhile():
    engine, restarts = Engine(), EngineRestarts("small", limit=3, timeout_s=600)
    engine.dead = True
    assert restarts.under_way(engine) and restarts.under_way(engine)
    await settle()
    assert engine.restarts == 1 and restarts.count == 1
    engine.release.set()
    await settle()
    assert restarts.under_way(engine) is False  # done: the engine's own check decides again
    assert not engine.dead


async def test_past_the_limit_the_replica_is_left_to_serve():
    engine, restarts = Engine(), EngineRestarts("small", limit=2, timeout_s=600)
    engine.release.set()
    for _ in range(2):
        engine.dead = True
        assert restarts.under_way(engine)
        await settle()
        assert restarts.under_way(engine) is False
    engine.dead = True
    assert restarts.under_way(engine) is False and restarts.count == 2 and engine.restarts == 2


async def test_a_failed_restart_fails_the_check():
    engine, restarts = Engine(fail=True), EngineRestarts("small", limit=3, timeout_s=600)
    engine.dead = True
    assert restarts.under_way(engine)
    engine.release.set()
    await settle()
    with pytest.raises(ServiceUnavailable, match="engine restart for tier small failed: no memory"):
        restarts.under_way(engine)


async def test_a_restart_that_takes_too_long_fails_the_check():
    clock = Clock()
    engine, restarts = Engine(), EngineRestarts("small", limit=3, timeout_s=60, clock=clock)
    engine.dead = True
    assert restarts.under_way(engine)
    clock.now = 59
    assert restarts.under_way(engine)
    clock.now = 61
    with pytest.raises(ServiceUnavailable, match="taking too long"):
        restarts.under_way(engine)
    engine.release.set()
    await settle()


async def test_no_restarts_leaves_every_death_to_serve():
    engine = Engine()
    engine.dead = True
    assert EngineRestarts("small", limit=0, timeout_s=600).under_way(engine) is False
    assert engine.restarts == 0
