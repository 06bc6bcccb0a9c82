"""When a tier's replica restarts its dead engine in place, and when it gives up (Serve then
replaces the replica): a policy over the engine's `dead` flag and `restart()`, tested without
an engine (tests/unit/test_engine_restarts.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tierserve.core.errors import ServiceUnavailable

if TYPE_CHECKING:
    from tierserve.actors.engine import VLLMEngine

logger = logging.getLogger(__name__)


class EngineRestarts:
    """When a tier's replica restarts its dead engine in place, and when it gives up.

    Serve's health check (every 2 s on the shipped tiers) asks `under_way`. A dead engine is
    restarted in the replica, up to `limit` times (the tier's `engine_restarts`): a new replica
    would first start a process and import everything, about 10 s more (docs/reliability.md).
    While a restart runs the replica passes the check; a restart that fails or outlasts
    `timeout_s` (`engine_restart_timeout_s`), and a death past the limit, fail it
    (`ServiceUnavailable`), and Serve replaces the replica."""

    def __init__(self, tier: str, limit: int, timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.tier = tier
        self.limit = limit
        self.timeout_s = timeout_s
        self.clock = clock
        self.count = 0
        """Restarts begun."""
        self._task: asyncio.Task | None = None
        self._began = 0.0

    def under_way(self, engine: VLLMEngine) -> bool:
        """True while a restart of `engine` runs (begun now if it just died and the limit allows);
        False when there is none, and the engine's own health decides. Call on the event loop."""
        if self._task is not None:
            if not self._task.done():
                if self.clock() - self._began <= self.timeout_s:
                    return True
                raise ServiceUnavailable(f"engine restart for tier {self.tier} is taking too long")
            task, self._task = self._task, None
            if task.exception() is not None:
                raise ServiceUnavailable(f"engine restart for tier {self.tier} failed: {task.exception()}")
            logger.info("tier %s: engine restarted in %.1f s", self.tier, self.clock() - self._began)
        if engine.dead and self.count < self.limit:
            self.count += 1
            logger.warning("tier %s: engine died; restarting it in place (%d of %d)", self.tier, self.count, self.limit)
            self._began = self.clock()
            self._task = asyncio.get_running_loop().create_task(engine.restart())
            return True
        return False
