"""Serve's view of each tier's replicas, as the router reads it (no Ray cluster: Serve's
instance details built from its own schema, in the form its controller returns them)."""

from ray.serve._private.common import DeploymentStatus, ReplicaState

from tierserve.router.config import RoutingConfig
from tierserve.router.replicas import TierReplicas, tier_replicas
from tierserve.router.state import TierStates

WAITING = "Deployment 'tier-big' has 1 replicas that have taken more than 30s to be scheduled."


def details(deployments: dict[str, tuple[DeploymentStatus, dict[ReplicaState, int], str]]) -> dict:
    """Serve's instance details for one app `tierserve`, as its controller returns them (a
    dict of Serve's enums)."""
    return {
        "applications": {
            "tierserve": {
                "status": "RUNNING",
                "deployments": {
                    name: {
                        "name": name,
                        "status": status,
                        "message": message,
                        "replicas": [
                            {"replica_id": f"{name}-{state.value}-{i}", "state": state}
                            for state, count in states.items()
                            for i in range(count)
                        ],
                    }
                    for name, (status, states, message) in deployments.items()
                },
            }
        }
    }


def test_counts_running_pending_and_stopping_replicas_per_tier():
    s = details(
        {
            "tier-small": (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 2}, ""),
            "tier-big": (
                DeploymentStatus.UNHEALTHY,
                {ReplicaState.STARTING: 1, ReplicaState.STOPPING: 1},
                WAITING,
            ),
            "ingress": (DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1}, ""),
        }
    )
    seen = tier_replicas(s, "tierserve", {"small": "tier-small", "big": "tier-big", "new": "tier-new"})
    assert seen == {
        "small": TierReplicas(running=2, pending=0, stopping=0, status="HEALTHY", message=""),
        "big": TierReplicas(running=0, pending=1, stopping=1, status="UNHEALTHY", message=WAITING),
    }
    assert tier_replicas(s, "another-app", {"small": "tier-small"}) == {}


def test_no_running_replica_makes_a_tier_unhealthy_until_a_load_poll_succeeds():
    from tierserve.actors.types import TierLoad

    states = TierStates(["small", "big"], RoutingConfig())
    states.replicas_seen("big", TierReplicas(0, 1, 0, "UNHEALTHY", WAITING))
    states.replicas_seen("small", TierReplicas(3, 0, 0, "HEALTHY", ""))
    views = {v.name: v for v in states.snapshot()}
    assert not views["big"].healthy and views["small"].healthy
    assert states.last_error["big"] == f"no running replica (UNHEALTHY, 1 pending): {WAITING}"
    assert views["small"].replicas == 3  # capacity follows Serve's count (scaling, autoscaling)

    # Serve reports a replica running again: the tier is back at once.
    states.replicas_seen("big", TierReplicas(1, 0, 0, "HEALTHY", ""))
    assert states.views["big"].healthy and "big" not in states.last_error

    # A tier down because requests failed stays down until a poll answers, whatever Serve
    # counts. With 3 replicas one failure is not enough (one replica of several may have died):
    # two are, as many as half its replicas.
    states.failed("small", "engine dead")
    assert states.views["small"].healthy and states.last_error["small"] == "engine dead"
    states.failed("small", "engine dead")
    assert not states.views["small"].healthy
    states.replicas_seen("small", TierReplicas(3, 0, 0, "HEALTHY", ""))
    assert not states.views["small"].healthy
    states.polled("small", TierLoad(0, 0, 8, 2048, 10.0, 1.0, 0.1))
    assert states.views["small"].healthy
    # The count starts again from the answered poll; a tier of one replica goes down at once.
    states.failed("small", "engine dead")
    assert states.views["small"].healthy
    states.failed("big", "engine dead")
    assert not states.views["big"].healthy


def test_a_tier_that_answers_polls_stays_healthy_while_serves_count_catches_up():
    """Right after a replica starts, Serve may still list it as starting while it already
    answers: a poll answered within two poll intervals outweighs a report of none running."""
    from tierserve.actors.types import TierLoad

    now = [100.0]
    states = TierStates(["small"], RoutingConfig(), clock=lambda: now[0])
    states.polled("small", TierLoad(0, 0, 8, 2048, 10.0, 1.0, 0.1))
    starting = TierReplicas(0, 1, 0, "UPDATING", "1 replica has taken more than 30s to initialize")
    now[0] += 0.3
    states.replicas_seen("small", starting)
    view = states.views["small"]
    assert view.healthy and view.replicas == 1  # capacity untouched by the lagging count
    now[0] += 1.0  # no poll answered since: Serve's report counts
    states.replicas_seen("small", starting)
    assert not states.views["small"].healthy


async def test_a_poll_answered_by_a_replica_whose_engine_cannot_serve_takes_the_tier_down():
    """A replica restarting its engine answers its load poll with why it cannot serve (rather
    than raising, which Serve would log with a traceback four times a second): the tier goes
    down on it and comes back with the first poll its engine answers."""
    import asyncio

    from tierserve.actors.types import TierLoad

    serving = TierLoad(0, 0, 8, 2048, 10.0, 1.0, 0.1)
    answers = {"small": TierLoad(0, 0, 8, 2048, 10.0, 1.0, 0.1, unavailable="engine for m is not running")}
    polled = asyncio.Event()

    async def fetch(tier: str) -> TierLoad:
        polled.set()
        return answers[tier]

    states = TierStates(["small"], RoutingConfig())
    poller = asyncio.create_task(states.poll_forever(fetch, 0.01, lambda exc: None))
    try:
        await asyncio.wait_for(polled.wait(), 5)
        await asyncio.sleep(0.05)
        assert not states.views["small"].healthy
        assert states.last_error["small"] == "engine for m is not running"
        answers["small"] = serving
        await asyncio.sleep(0.05)
        assert states.views["small"].healthy and states.views["small"].load == serving
    finally:
        poller.cancel()
