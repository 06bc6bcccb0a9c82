"""The app builder and the Serve YAML: both build the same application from one config."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from tierserve.cluster.app import INGRESS_NAME, RETRIEVER_NAME, build_app, build_application, tier_deployment_name
from tierserve.cluster.config import SERVE_THROUGHPUT_ENV, ConfigError, load_config
from tierserve.cluster.manifests import serve_config

REPO = Path(__file__).resolve().parents[2]


def bound(app: Application):
    return app._bound_deployment  # Serve keeps the bound ingress deployment here


def test_serve_yaml_is_valid_and_points_at_the_builder():
    raw = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    schema = ServeDeploySchema.parse_obj(raw)
    (spec,) = schema.applications
    assert spec.import_path == "tierserve.cluster.app:build_app"
    module, attr = spec.import_path.split(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    assert builder is build_app
    app = builder(spec.args)
    assert isinstance(app, Application) and bound(app).name == INGRESS_NAME
    # `serve run` gets the same Ray Serve tuning that `tierserve serve` applies from ray.env
    assert spec.runtime_env["env_vars"] == SERVE_THROUGHPUT_ENV


def test_each_tier_is_its_own_deployment_with_its_options():
    config = load_config(REPO / "configs" / "gpu.yaml")
    ingress = bound(build_application(config))
    ingress_config, entries, handles, telemetry, routing, model_cache, retriever, rag, safety = ingress.init_args
    assert safety == config.safety
    assert telemetry == config.telemetry  # every deployment gets the same telemetry settings
    assert routing == config.routing and routing.tiers["llama-70b"].min_complexity == 0.58
    assert model_cache == config.model_cache
    assert [e.replicas for e in entries] == [8, 2]  # autoscaling maxima
    assert [e.name for e in entries] == ["llama-8b", "llama-70b"]
    assert ingress.num_replicas == 2

    small = bound(handles["llama-8b"])
    assert small.name == tier_deployment_name("llama-8b")
    assert small._deployment_config.autoscaling_config.max_replicas == 8
    assert small.ray_actor_options["num_cpus"] == 4 and "num_gpus" not in small.ray_actor_options
    assert small._replica_config.placement_group_bundles == [{"GPU": 1, "accelerator_type:L40S": 0.001, "CPU": 4}]
    tier_config, cache, tier_telemetry = small.init_args
    assert tier_telemetry == config.telemetry
    assert tier_config.engine["max_model_len"] == 16384
    assert tier_config.speculative.model == "/models/Llama-3.2-1B-Instruct"

    # The retriever: its own deployment with the rag block's options, shared by every tier.
    assert rag == config.rag and rag.routes["chat"].index == "handbook"
    shared = bound(retriever)
    assert shared.name == RETRIEVER_NAME and shared.num_replicas == 2
    assert shared.ray_actor_options["num_cpus"] == 2 and not shared.ray_actor_options.get("num_gpus")
    assert shared.init_args == (config.rag, config.model_cache, config.telemetry)

    large = bound(handles["llama-70b"])
    assert large._deployment_config.autoscaling_config.max_replicas == 2
    rank = {"GPU": 1, "accelerator_type:A100": 0.001}
    first = {**rank, "CPU": 8, "tier_large": 1}
    assert large._replica_config.placement_group_bundles == [first] + [rank] * 7
    assert large._replica_config.placement_group_strategy == "STRICT_PACK"
    assert large._replica_config.placement_group_bundle_label_selector == [{"pool": "large"}] * 8


def test_builder_takes_the_config_inline():
    """The serve.yaml of `tierserve deploy render` carries the config itself: no file on the cluster."""
    config = load_config(REPO / "configs" / "gpu.yaml")
    (spec,) = ServeDeploySchema.model_validate(serve_config(config)).applications

    def graph(app: Application):
        *args, retriever, rag, safety = bound(app).init_args
        ingress, entries, handles, *rest = args
        tiers = {
            name: (bound(h).init_args, bound(h)._replica_config.placement_group_bundles) for name, h in handles.items()
        }
        return ingress, entries, rest, tiers, bound(retriever).init_args, rag, safety

    assert graph(build_app(spec.args)) == graph(build_application(config))
    with pytest.raises(ConfigError, match="not both"):
        build_app({**spec.args, "config": "configs/gpu.yaml"})
    with pytest.raises(ConfigError, match=r"Serve args `tierserve`: tiers\[0\].name: String should match"):
        build_app({"tierserve": {"tiers": [{"name": "Bad Name", "model": "/m"}]}})


def test_cli_config_check(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "tierserve.cluster.cli", "config", "check", str(REPO / "configs" / "local.yaml")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "tier(s): small" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers:\n  - name: small\n    model: x\n    engine:\n      max_modle_len: 5\n")
    res = subprocess.run(
        [sys.executable, "-m", "tierserve.cluster.cli", "config", "check", str(bad)], capture_output=True, text=True
    )
    assert res.returncode == 2
    assert f"{bad}:5: tiers[0].engine.max_modle_len: not an option of vLLM's AsyncEngineArgs" in res.stderr


def test_serve_refuses_at_once_when_its_ports_are_taken():
    """`tierserve serve` checks its HTTP and metrics ports before it starts Ray (taken, Ray's node
    waited half a minute and failed naming neither)."""
    import socket

    from tierserve.cluster.cli import main, taken_ports

    config = load_config(REPO / "configs" / "local.yaml", check_engine=False)
    config = config.model_copy(update={"ray": config.ray.model_copy(update={"metrics_export_port": None})})
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        server = config.server.model_copy(update={"host": "127.0.0.1", "port": port})
        taken = taken_ports(config.model_copy(update={"server": server}))
        assert len(taken) == 1 and f"127.0.0.1:{port}" in taken[0] and "server.port" in taken[0]
        assert main(["serve", "--port", str(port), "--no-prepare"]) == 2  # before Ray starts
    server = config.server.model_copy(update={"host": "127.0.0.1", "port": port})
    assert taken_ports(config.model_copy(update={"server": server})) == []
