"""`tierserve deploy render`: the three deploy files, each checked by the tool that reads it
(Ray Serve's config schema, Ray's cluster launcher validation, the KubeRay CRD's fields and Ray's
own reading of a RayCluster for its autoscaler), and the checked-in examples kept current."""

import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from tierserve.cluster.app import build_app
from tierserve.cluster.config import AppConfig, ConfigError, load_config, parse_config
from tierserve.cluster.manifests import cluster_launcher, for_cluster, ray_service, render, serve_config
from tierserve.cluster.nodes import ClusterConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = ["local", "gpu"]
FILES = ["serve.yaml", "cluster.yaml", "rayservice.yaml"]
CRD_SCHEMA = yaml.safe_load((Path(__file__).parent / "kuberay_rayservice_schema.yaml").read_text())


def example(name: str) -> AppConfig:
    return load_config(REPO / "configs" / f"{name}.yaml", check_engine=False)


def checked_in(name: str, file: str) -> dict:
    return yaml.safe_load((REPO / "configs" / "deploy" / name / file).read_text())


@pytest.mark.parametrize("name", EXAMPLES)
def test_checked_in_files_are_current(tmp_path, name):
    render(example(name), tmp_path, f"configs/{name}.yaml")
    for file in FILES:
        current = (tmp_path / file).read_text()
        assert current == (REPO / "configs" / "deploy" / name / file).read_text(), (
            f"configs/deploy/{name}/{file} is stale: tierserve deploy render --config configs/{name}.yaml "
            f"--out configs/deploy/{name}"
        )


@pytest.mark.parametrize("name", EXAMPLES)
def test_serve_config_passes_serves_schema_and_carries_the_config(name):
    config, raw = for_cluster(example(name)), checked_in(name, "serve.yaml")
    assert set(raw) <= set(ServeDeploySchema.model_fields)  # the schema itself lets unknown keys through
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.proxy_location.value == "EveryNode"
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", config.server.port)
    (app,) = schema.applications
    assert app.import_path == "tierserve.cluster.app:build_app" and app.runtime_env == {"env_vars": config.ray.env}
    # Inline, the config reads back as itself with API keys on (less the cluster section, which
    # only deploy files use).
    assert parse_config(app.args["tierserve"], check_engine=False) == config.model_copy(
        update={"cluster": ClusterConfig()}
    )
    assert build_app(app.args)


@pytest.mark.parametrize("name", EXAMPLES)
def test_cluster_config_passes_ray_up_validation(name):
    raw = checked_in(name, "cluster.yaml")
    validate_config(prepare_config(raw))  # what `ray up` runs before it starts anything
    assert raw["head_node_type"] == "head" and raw["available_node_types"]["head"]["resources"]["GPU"] == 0
    for command in raw["head_start_ray_commands"][1:] + raw["worker_start_ray_commands"][1:]:
        assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in command  # Serve's own processes get ray.env


def test_gpu_cluster_node_types_carry_accelerators_labels_and_resources():
    types = checked_in("gpu", "cluster.yaml")["available_node_types"]
    assert types["a100"]["resources"] == {
        "CPU": 95,  # of the machine's 96, less what it keeps for itself (nodes.py)
        "GPU": 8,
        "memory": int(1121.5 * 2**30),
        "accelerator_type:A100": 1,
        "tier_large": 1,
    }
    assert types["a100"]["labels"] == {"ray.io/accelerator-type": "A100", "pool": "large"}
    assert (types["l40s"]["min_workers"], types["l40s"]["max_workers"]) == (2, 9)
    assert (types["a100"]["min_workers"], types["a100"]["max_workers"]) == (1, 2)


@pytest.mark.parametrize("name", EXAMPLES)
def test_rayservice_has_the_crds_fields_and_the_same_nodes_as_ray_up(name):
    service = checked_in(name, "rayservice.yaml")
    jsonschema.validate(service, CRD_SCHEMA)
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == serve_config(for_cluster(example(name)))
    # Ray's autoscaler reads the RayCluster into node types as `ray up` declares them.
    cluster = service["spec"]["rayClusterConfig"]
    ray_cr = {"metadata": {"name": service["metadata"]["name"], "namespace": "default"}, "spec": cluster}
    from_k8s = _derive_autoscaling_config_from_ray_cr(ray_cr)["available_node_types"]
    from_up = checked_in(name, "cluster.yaml")["available_node_types"]
    assert from_k8s.keys() - {"headgroup"} == from_up.keys() - {"head"}
    for group, up in from_up.items():
        k8s = from_k8s["headgroup" if group == "head" else group]
        assert k8s["resources"] == up["resources"] and k8s["labels"] == up.get("labels", {})
        assert (k8s["min_workers"], k8s["max_workers"]) == (up.get("min_workers", 0), up.get("max_workers", 0))
    bounds = [(g["minReplicas"], g["maxReplicas"]) for g in cluster["workerGroupSpecs"]]
    assert cluster["enableInTreeAutoscaling"] == any(lo != hi for lo, hi in bounds)


def test_gpu_workers_ask_kubernetes_for_their_gpus():
    (l40s, a100) = checked_in("gpu", "rayservice.yaml")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = a100["template"]["spec"]["containers"]
    # what a p4d.24xlarge (96 vCPUs, 1152 GiB) can give a pod: requests a node can satisfy
    assert container["resources"]["limits"] == {"cpu": "95", "memory": "1121.5Gi", "nvidia.com/gpu": "8"}
    assert a100["rayStartParams"]["num-gpus"] == "8" and a100["labels"]["pool"] == "large"
    assert container["image"] == "tierserve:0.1.0-gpu" and "args" not in container  # the image has tierserve


def test_local_provider_puts_resources_and_labels_on_the_start_commands():
    # ray up's local provider has one node type and hands no node type's resources to `ray start`.
    cluster = {
        "provider": {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2", "10.0.0.3"]},
        "worker_groups": [{"name": "gpu", "gpus": 1, "resources": {"tier_large": 1}, "labels": {"pool": "large"}}],
        "paths_in_image": ["/m"],
    }
    tier = {"name": "t", "model": "/m", "accelerator": "gpu", "deployment": {"label_selector": {"pool": "large"}}}
    raw = cluster_launcher(AppConfig.model_validate({"tiers": [tier], "cluster": cluster}))
    validate_config(prepare_config(raw))
    assert "available_node_types" not in raw
    assert raw["head_start_ray_commands"][1].endswith("--num-gpus=0")
    assert raw["worker_start_ray_commands"][1].endswith(" --resources='{\"tier_large\": 1}' --labels=pool=large")
    cluster["worker_groups"].append({"name": "cpu"})
    with pytest.raises(ConfigError, match="type 'local' takes one kind of worker node, got gpu, cpu"):
        cluster_launcher(AppConfig.model_validate({"tiers": [tier], "cluster": cluster}))


def test_an_application_name_that_is_no_cluster_name_asks_for_one():
    tiers = [{"name": "t", "model": "/m"}]
    config = AppConfig.model_validate({"name": "Tier_Serve", "tiers": tiers, "cluster": {"paths_in_image": ["/m"]}})
    with pytest.raises(ConfigError, match="set cluster.name"):
        ray_service(config)
    named = config.model_copy(update={"cluster": ClusterConfig(name="tierserve", paths_in_image=["/m"])})
    assert ray_service(named)["metadata"]["name"] == "tierserve"


def test_cli_renders_and_refuses_a_config_that_does_not_fit(tmp_path):
    cli = [sys.executable, "-m", "tierserve.cluster.cli", "deploy", "render"]
    ok = subprocess.run(
        [*cli, "--config", str(REPO / "configs" / "local.yaml"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES)
    assert f"wrote {tmp_path / 'out' / 'serve.yaml'}" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "tiers:\n  - {name: big, model: /m, accelerator: gpu, tensor_parallel_size: 8}\n"
        "cluster:\n  worker_groups:\n    - {name: gpu, gpus: 4}\n"
    )
    res = subprocess.run([*cli, "--config", str(bad), "--out", str(tmp_path / "bad")], capture_output=True, text=True)
    assert res.returncode == 2 and not (tmp_path / "bad").exists()
    assert "tier 'big' fits no node type" in res.stderr and "gpu: has 4 GPUs, needs 8 on one node" in res.stderr


def test_every_pod_mounts_the_volumes_and_asks_for_what_its_node_can_give():
    """configs/gpu.yaml's checkpoints (/models) and index store (/mnt/shared) are mounted on every
    node, by ray up (docker -v of a host directory) and KubeRay (a PersistentVolumeClaim); pods ask
    for what their instance type leaves after the system's share, land on that instance type, and
    GPU pods tolerate the GPU pools' taint."""
    config = example("gpu")
    run_options = checked_in("gpu", "cluster.yaml")["docker"]["run_options"]
    assert "-v /mnt/models:/models:ro" in run_options and "-v /mnt/shared:/mnt/shared" in run_options
    cluster = checked_in("gpu", "rayservice.yaml")["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    nodes = {"head": config.cluster.head, **{g.name: g for g in config.cluster.worker_groups}}
    for name, spec in [("head", cluster["headGroupSpec"]), *groups.items()]:
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert [m["mountPath"] for m in container["volumeMounts"]] == ["/models", "/mnt/shared"]
        assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]] == [
            "tierserve-models",
            "tierserve-shared",
        ]
        node = nodes[name]
        assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": node.node_config["InstanceType"]}
        requests = container["resources"]["requests"]
        assert int(requests["cpu"]) < node.cpus and float(requests["memory"].removesuffix("Gi")) < node.memory_gb
        gpu = name != "head"
        assert ("tolerations" in pod) is gpu


def test_paths_on_no_volume_are_refused():
    tier = {"name": "t", "model": "/models/m", "accelerator": "gpu"}
    group = {"name": "gpu", "gpus": 1}
    config = AppConfig.model_validate(
        {"tiers": [tier], "rag": {"enabled": False}, "cluster": {"worker_groups": [group]}}
    )
    with pytest.raises(ConfigError, match=r"tier 't''s model /models/m is on no volume \(cluster.volumes\)"):
        ray_service(config)
    claim = {"name": "models", "mount_path": "/models", "claim_name": "models"}
    on_claim = {"worker_groups": [group], "volumes": [claim]}
    config = AppConfig.model_validate({"tiers": [tier], "rag": {"enabled": False}, "cluster": on_claim})
    assert ray_service(config)  # KubeRay mounts the claim ...
    with pytest.raises(
        ConfigError, match="ray up cannot mount a PersistentVolumeClaim; give volume models a host_path"
    ):
        cluster_launcher(config)  # ... ray up cannot
    # The node's own pod volumes come with tierserve's.
    extra = {"volumes": [{"name": "scratch", "emptyDir": {}}]}
    config.cluster.worker_groups[0].pod.update(extra)
    (worker,) = ray_service(config)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [v["name"] for v in worker["template"]["spec"]["volumes"]] == ["models", "scratch"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_rendered_clusters_have_api_keys_and_rays_token_auth_and_hold_no_secret(name, tmp_path):
    """API keys on (the embedded config has them off, for one machine only), Ray's token auth on
    every node, the dashboard on localhost for ray up, secrets by reference only, files 0600."""
    import stat

    config = example(name)
    paths = render(config, tmp_path, f"configs/{name}.yaml")
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    served = yaml.safe_load((tmp_path / "serve.yaml").read_text())["applications"][0]["args"]["tierserve"]
    assert served["ingress"]["auth"]["enabled"] is True
    assert parse_config(served).ingress.auth.enabled
    launcher = yaml.safe_load((tmp_path / "cluster.yaml").read_text())
    for command in launcher["head_start_ray_commands"][1:] + launcher["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command
    assert "--dashboard-host=127.0.0.1" in launcher["head_start_ray_commands"][1]
    assert launcher["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    cluster = yaml.safe_load((tmp_path / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for spec in specs:
        (container,) = spec["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"] == {
            "name": "RAY_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "ray-auth-token", "key": "auth_token"}},
        }
        assert env["TIERSERVE_AUTH_SECRET"]["valueFrom"]["secretKeyRef"] == {
            "name": "tierserve-auth",
            "key": "server-secret",
        }
        assert all("value" not in e for n, e in env.items() if n in ("RAY_AUTH_TOKEN", "TIERSERVE_AUTH_SECRET"))
