"""What the ingress tells about its tiers: `GET /health` (is each tier ready) and `GET /v1/tiers`
(each tier's profile, counters and the router's view of it), from the tiers' deployment
handles, each call bounded by `ingress.health_timeout_s`."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from ray.serve.handle import DeploymentHandle

from tierserve.router.handles import tier_error
from tierserve.router.state import TierStates
from tierserve.router.tiers import TierDirectory


class TierStatus:
    def __init__(
        self, directory: TierDirectory, handles: dict[str, DeploymentHandle], states: TierStates, timeout_s: float
    ):
        self.directory = directory
        self.handles = handles
        self.states = states
        self.timeout_s = timeout_s

    async def health(self) -> dict[str, str]:
        """Each tier's state: 'ok', or why it cannot serve now (no answer to `ready` in time, or
        its error). A replica that restarts its engine passes Serve's health check but is not ready.
        A tier that answers but that the router still has down (it has not yet seen the tier
        since Serve reported no running replica, or since a failed request) is not 'ok' either:
        `/health` says what requests would get, so a caller that waits for it (a load balancer,
        `tierserve serve` before it prints that it is ready) is not answered 503 right after."""

        async def check(name: str) -> str:
            try:
                why = await asyncio.wait_for(self.handles[name].ready.remote(), self.timeout_s)
            except asyncio.TimeoutError:
                return f"no answer within {self.timeout_s:g}s"
            except Exception as exc:
                return str(tier_error(exc, name))
            if why is not None:
                return why
            if not self.states.views[name].healthy:
                return f"the router has it down: {self.states.last_error.get(name) or 'not polled yet'}"
            return "ok"

        names = list(self.directory.tiers)
        return dict(zip(names, await asyncio.gather(*(check(n) for n in names))))

    async def tiers(self) -> list[dict[str, Any]]:
        """Each tier's info, counters (of the replica that answers), its replicas as Serve
        reports them and the router's view of it; a tier that does not answer within the
        timeout is listed with `error` and no info."""
        views = {v.name: v for v in self.states.snapshot()}

        async def one(name: str) -> dict[str, Any]:
            handle = self.handles[name]
            view = views[name]
            replicas = self.states.replicas.get(name)
            router = {
                "healthy": view.healthy,
                "in_flight": view.in_flight,
                "replicas": replicas.as_dict() if replicas is not None else None,
                "min_complexity": view.min_complexity,
                "max_queue": view.max_queue,
                "cost": view.cost.model_dump(),
                "load": dataclasses.asdict(view.load) if view.load is not None else None,
                "ttft_correction": dataclasses.asdict(view.ttft_correction),
                "hold_steps": round(view.hold_steps, 2),
                "last_error": self.states.last_error.get(name),
            }
            entry: dict[str, Any] = {"name": name, "description": self.directory.tiers[name].description}
            try:
                info, stats = await asyncio.wait_for(
                    asyncio.gather(handle.info.remote(), handle.stats.remote()), self.timeout_s
                )
            except asyncio.TimeoutError:
                return {**entry, "error": f"no answer within {self.timeout_s:g}s", "router": router}
            except Exception as exc:
                return {**entry, "error": str(tier_error(exc, name)), "router": router}
            counters = dataclasses.asdict(stats)
            counters["speculation"] = stats.speculation.as_dict() if stats.speculation else None
            if stats.speculation_control is not None:
                counters["speculation_control"] = [bucket.as_dict() for bucket in stats.speculation_control]
            return {**dataclasses.asdict(info), **entry, "stats": counters, "router": router}

        return list(await asyncio.gather(*(one(n) for n in self.directory.tiers)))
