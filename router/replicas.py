"""Each tier's replicas as Ray Serve's controller reports them.

A tier whose replica actor died with its node is not an error Serve's handles report: Serve
starts a replacement, which waits for a node that has the tier's resources, and requests sent to
the deployment meanwhile wait with it. The ingress therefore also reads Serve's status every few
seconds (every poll interval while some tier has none running, so a tier that starts or comes
back is served at once): a tier with no running replica is unhealthy (`auto` goes elsewhere, a request naming it
gets a 503 at once), and the number of running replicas is what the router's capacity counts
(so `tierserve scale` and Serve's autoscaler are seen without a restart of the ingress).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

PENDING_STATES = ("STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")
"""Replica states that will serve once they get there (scheduled, loading, or being replaced)."""


@dataclass(frozen=True, slots=True)
class TierReplicas:
    """One tier's deployment, as Serve's controller saw it last."""

    running: int
    pending: int
    """Replicas on their way (`PENDING_STATES`): waiting for a node, loading the engine, ..."""
    stopping: int
    status: str
    """Serve's deployment status: HEALTHY, UPDATING, UPSCALING, DOWNSCALING, UNHEALTHY, ..."""
    message: str
    """Serve's explanation, e.g. that replicas wait for resources no node has."""

    def as_dict(self) -> dict[str, int | str]:
        return {
            "running": self.running,
            "pending": self.pending,
            "stopping": self.stopping,
            "status": self.status,
            "message": self.message,
        }


def _name(value: object) -> str:
    """An enum's value (the controller's dict holds Serve's enums), or the string itself."""
    return str(getattr(value, "value", value))


def tier_replicas(details: dict[str, Any], app: str, deployments: dict[str, str]) -> dict[str, TierReplicas]:
    """`details`: Serve's instance details as its controller returns them (the dict behind
    `serve.status()` and the dashboard's `/api/serve/applications/`; read raw, because building
    `serve.status()` from it pickles every deployment's request router, which cost the ingress
    a fifth of its Python time under load). `deployments` maps tier -> Serve deployment name;
    tiers Serve does not list (yet) are left out."""
    overview = (details.get("applications") or {}).get(app)
    if overview is None:
        return {}
    out = {}
    for tier, deployment in deployments.items():
        d = (overview.get("deployments") or {}).get(deployment)
        if d is None:
            continue
        states = Counter(_name(r.get("state")) for r in d.get("replicas") or [])
        out[tier] = TierReplicas(
            running=states["RUNNING"],
            pending=sum(states[s] for s in PENDING_STATES),
            stopping=states["STOPPING"],
            status=_name(d.get("status", "")),
            message=d.get("message") or "",
        )
    return out
