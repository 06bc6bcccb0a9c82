"""Operating a deployment without a cluster: the Serve config `tierserve scale` sends, checked
by Serve's own schema, and the `tierserve status` table."""

import pytest

from tierserve.cluster.ops import OpsError, deployed_config, format_status, scaled_config, status_rows


def details(autoscaling: dict | None = None, imperative: bool = False) -> dict:
    """What `GET /api/serve/applications/` returns, trimmed to the fields tierserve reads."""
    big = {"num_replicas": 1} if autoscaling is None else {"autoscaling_config": autoscaling}
    app_config = {
        "name": "tierserve",
        "route_prefix": "/",
        "import_path": "tierserve.cluster.app:build_app",
        "args": {"tierserve": {"tiers": []}},
        "runtime_env": {"env_vars": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}},
    }
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000, "request_timeout_s": None, "keep_alive_timeout_s": 90},
        "applications": {
            "tierserve": {
                "name": "tierserve",
                "status": "RUNNING",
                "deployed_app_config": None if imperative else app_config,
                "deployments": {
                    "ingress": {"name": "ingress", "status": "HEALTHY", "deployment_config": {"num_replicas": 1}},
                    "tier-small": {
                        "name": "tier-small",
                        "status": "HEALTHY",
                        "target_num_replicas": 2,
                        "deployment_config": {"num_replicas": 2},
                        "replicas": [
                            {"state": "RUNNING", "node_ip": "10.0.0.1"},
                            {"state": "RUNNING", "node_ip": "10.0.0.2"},
                        ],
                    },
                    "tier-big": {
                        "name": "tier-big",
                        "status": "UNHEALTHY",
                        "target_num_replicas": 1,
                        "deployment_config": big,
                        "replicas": [{"state": "STARTING", "node_ip": None}],
                    },
                },
            }
        },
    }


def test_scaling_a_fixed_tier_overrides_only_its_replica_count():
    before = details()
    config = scaled_config(before, "tierserve", "small", replicas=3)
    (app,) = config["applications"]
    assert app["deployments"] == [{"name": "tier-small", "num_replicas": 3}]
    # Everything else is what runs, so Serve sees a lightweight update (no replica restarts).
    assert app["args"] == before["applications"]["tierserve"]["deployed_app_config"]["args"]
    assert app["import_path"] == "tierserve.cluster.app:build_app"
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert config["proxy_location"] == "EveryNode"
    # Scaling again replaces the override instead of adding a second one.
    before["applications"]["tierserve"]["deployed_app_config"] = app
    again = scaled_config(before, "tierserve", "small", replicas=1)
    assert again["applications"][0]["deployments"] == [{"name": "tier-small", "num_replicas": 1}]


def test_scaling_an_autoscaling_tier_moves_its_bounds():
    before = details(autoscaling={"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1})
    config = scaled_config(before, "tierserve", "big", min_replicas=2)
    (override,) = config["applications"][0]["deployments"]
    assert override == {
        "name": "tier-big",
        "autoscaling_config": {"min_replicas": 2, "max_replicas": 4, "initial_replicas": 2},
    }
    with pytest.raises(OpsError, match="autoscales between 1 and 4"):
        scaled_config(before, "tierserve", "big", replicas=3)
    with pytest.raises(OpsError, match="min <= max"):
        scaled_config(before, "tierserve", "big", min_replicas=5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"app": "other", "tier": "small", "replicas": 2}, "no application 'other'"),
        ({"app": "tierserve", "tier": "nope", "replicas": 2}, r"no tier 'nope' \(tiers: big, small\)"),
        ({"app": "tierserve", "tier": "small", "replicas": 0}, "at least one replica"),
        ({"app": "tierserve", "tier": "small", "min_replicas": 1}, "fixed number of replicas"),
        ({"app": "tierserve", "tier": "small"}, "nothing to change"),
    ],
)
def test_scaling_refuses_what_cannot_be_done(kwargs, message):
    with pytest.raises(OpsError, match=message):
        scaled_config(details(), **kwargs)


def test_an_app_started_from_python_has_no_config_to_update():
    with pytest.raises(OpsError, match="tierserve deploy"):
        deployed_config(details(imperative=True))


def test_status_table_shows_replicas_nodes_load_and_why_a_tier_is_down():
    tiers = [
        {
            "name": "small",
            "router": {
                "healthy": True,
                "in_flight": 3,
                "replicas": {"running": 2, "pending": 0, "status": "HEALTHY", "message": ""},
                "load": {"running": 2, "waiting": 1, "ttft_ms": 120.4, "tpot_ms": 31.2},
            },
        },
        {
            "name": "big",
            "error": "no answer within 5s",
            "router": {
                "healthy": False,
                "in_flight": 0,
                "replicas": {"running": 0, "pending": 1, "status": "UNHEALTHY", "message": "waiting for resources"},
                "load": None,
                "last_error": "no running replica (UNHEALTHY, 1 pending): waiting for resources",
            },
        },
    ]
    rows = status_rows(tiers, details())
    assert rows[0]["nodes"] == ["10.0.0.1", "10.0.0.2"] and rows[0]["target"] == 2
    assert rows[1]["health"] == "down" and rows[1]["nodes"] == []
    text = format_status(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["TIER", "HEALTH", "REPLICAS"]
    assert lines[1].split() == ["small", "ok", "2/2", "10.0.0.1,10.0.0.2", "3", "2/1", "120", "31"]
    assert lines[2].split()[:6] == ["big", "down", "0/1", "(+1", "pending)", "-"]
    assert lines[3] == "big: no running replica (UNHEALTHY, 1 pending): waiting for resources"
    # Without Serve's details (no dashboard), the ingress's own view still fills the table.
    assert format_status(status_rows(tiers)).splitlines()[1].split()[:4] == ["small", "ok", "2", "-"]


def test_a_reason_with_a_traceback_is_shown_on_one_line():
    reason = (
        "no running replica (UNHEALTHY, 1 pending): A replica failed to start.\nTraceback ...\n  File x\n\n"
        "The actor died because its node has died.\n"
    )
    tiers = [
        {"name": "far", "router": {"healthy": False, "in_flight": 0, "last_error": reason, "load": {"ttft_ms": 77}}}
    ]
    rows = status_rows(tiers)
    assert rows[0]["ttft_ms"] is None  # a down tier's last load is stale
    assert format_status(rows).splitlines()[-1] == (
        "far: no running replica (UNHEALTHY, 1 pending): A replica failed to start. ... "
        "The actor died because its node has died."
    )
