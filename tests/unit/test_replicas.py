"""Serve's view of each tier's replicas, as the router reads it (no Ray cluster: Serve's own
status types built by hand)."""

from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus

from tierserve.router.config import RoutingConfig
from tierserve.router.replicas import TierReplicas, tier_replicas
from tierserve.router.state import TierStates

WAITING = "Deployment 'tier-big' has 1 replicas that have taken more than 30s to be scheduled."


def status(deployments: dict[str, tuple[DeploymentStatus, dict[ReplicaState, int], str]]) -> ServeStatus:
    overview = {
        name: DeploymentStatusOverview(
            status=s, status_trigger=DeploymentStatusTrigger.UNSPECIFIED, replica_states=states, message=message
        )
        for name, (s, states, message) in deployments.items()
    }
    app = ApplicationStatusOverview(
        status=ApplicationStatus.RUNNING, message="", last_deployed_time_s=0.0, deployments=overview
    )
    return ServeStatus(applications={"tierserve": app})


def test_counts_running_pending_and_stopping_replicas_per_tier():
    s = status(
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

    # A tier down because a request failed stays down until a poll answers, whatever Serve counts.
    states.failed("small", "engine dead")
    states.replicas_seen("small", TierReplicas(3, 0, 0, "HEALTHY", ""))
    assert not states.views["small"].healthy
    states.polled("small", TierLoad(0, 0, 8, 2048, 10.0, 1.0, 0.1))
    assert states.views["small"].healthy
