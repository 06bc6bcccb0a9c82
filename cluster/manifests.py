"""One tierserve config, three deploy files (`tierserve deploy render`, docs/deployment.md).

- serve.yaml: a Ray Serve config (`serve deploy` / `serve run`) carrying the whole tierserve
  config inline as the builder's args, so it needs no file on the cluster.
- cluster.yaml: a `ray up` cluster config, with a node type for the head and each worker group
  of cluster/plan.py.
- rayservice.yaml: a KubeRay RayService (ray.io/v1) with the same nodes as Kubernetes pods and
  serve.yaml as its `serveConfigV2`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from tierserve.cluster.config import AppConfig, ConfigError
from tierserve.cluster.fit import require_fit
from tierserve.cluster.nodes import (
    CLUSTER_NAME,
    CLUSTER_NAME_MAX,
    IMAGE,
    RAY_VERSION,
    HeadNode,
    NodeType,
    Volume,
    WorkerGroup,
    under,
)
from tierserve.cluster.ops import INGRESS_NAME, RETRIEVER_NAME, tier_deployment_name
from tierserve.cluster.plan import plan_nodes
from tierserve.core.config import DeploymentOptions

IMPORT_PATH = "tierserve.cluster.app:build_app"
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
RAY_TOKEN_FILE = "~/.ray/auth_token"
"""Where Ray's clients and `ray start` look for its token (`ray get-auth-token --generate` writes it)."""
RAY_TOKEN_ENV = {"RAY_AUTH_MODE": "token"}
"""Ray's token authentication, on every node of a rendered cluster."""


def for_cluster(config: AppConfig) -> AppConfig:
    """The config as a cluster deploy runs it: API keys on (`ingress.auth.enabled`), whatever the
    config says, since a cluster serves beyond one machine (docs/security.md)."""
    auth = config.ingress.auth
    if auth.enabled:
        return config
    ingress = config.ingress.model_copy(update={"auth": auth.model_copy(update={"enabled": True})})
    return config.model_copy(update={"ingress": ingress})


def app_args(config: AppConfig) -> dict[str, Any]:
    """The builder's args: the config as a mapping, only the fields the config sets, without
    the `cluster:` section, which only deploy files use. `parse_config` of it gives the config back."""
    return {"tierserve": config.model_dump(mode="json", exclude_unset=True, exclude={"cluster"})}


def _replicas(options: DeploymentOptions) -> dict[str, Any]:
    if options.autoscaling is not None:
        return {"autoscaling_config": dict(options.autoscaling)}
    return {"num_replicas": options.num_replicas or 1}


def deployment_entries(config: AppConfig) -> list[dict[str, Any]]:
    """Serve's per-deployment overrides: each deployment's replica count (or autoscaling bounds),
    the same values the builder sets. Listed from the first deploy on, so that changing one
    count later (`tierserve scale`, or an edit here and `serve deploy`) is all that changes: a
    deployment that first appears among the overrides gets the application's runtime_env merged
    into its actor options, which Serve counts as a new version and restarts its replicas for."""
    entries = [{"name": INGRESS_NAME, **_replicas(config.ingress.deployment)}]
    if config.rag.enabled:
        entries.append({"name": RETRIEVER_NAME, **_replicas(config.rag.deployment)})
    entries += [{"name": tier_deployment_name(t.name), **_replicas(t.deployment)} for t in config.tiers]
    return entries


def serve_config(config: AppConfig) -> dict[str, Any]:
    """Ray Serve's config file (ServeDeploySchema): the application from `build_app`, proxies where
    `server.proxy_location` says (every node by default) listening on all interfaces, `ray.env`
    as the application's environment, and each deployment's replicas (`deployment_entries`)."""
    http: dict[str, Any] = {"host": "0.0.0.0", "port": config.server.port}
    if config.server.request_timeout_s:
        http["request_timeout_s"] = config.server.request_timeout_s
    app: dict[str, Any] = {"name": config.name, "route_prefix": "/", "import_path": IMPORT_PATH}
    app["args"] = app_args(config)
    if config.ray.env:
        app["runtime_env"] = {"env_vars": dict(config.ray.env)}
    app["deployments"] = deployment_entries(config)
    return {"proxy_location": config.server.proxy_location, "http_options": http, "applications": [app]}


def cluster_name(config: AppConfig) -> str:
    name = config.cluster.name or config.name
    if len(name) > CLUSTER_NAME_MAX or not re.fullmatch(CLUSTER_NAME, name):
        raise ConfigError(
            f"cluster.name: the application name {name!r} is no cluster name (lowercase letters, digits and '-', "
            "starting with a letter, at most 47 characters); set cluster.name"
        )
    return name


def _uses_gpus(config: AppConfig) -> bool:
    return any(tier.accelerator == "gpu" for tier in config.tiers)


def image(config: AppConfig) -> str:
    return config.cluster.image or f"{IMAGE}-{'gpu' if _uses_gpus(config) else 'cpu'}"


def setup_commands(config: AppConfig) -> list[str]:
    return list(config.cluster.setup_commands)


def node_paths(config: AppConfig) -> list[tuple[str, str]]:
    """The absolute paths the deployments read on the nodes, with what reads them: tier and draft
    checkpoints, the index store, a local embedder. Ids and `embedded:` models are not paths."""
    out = []
    for tier in config.tiers:
        out.append((f"tier {tier.name!r}'s model", tier.model))
        if tier.speculative is not None and tier.speculative.model:
            out.append((f"tier {tier.name!r}'s draft", tier.speculative.model))
    if config.rag.enabled:
        out += [("rag.store", config.rag.store or ""), ("rag.embedder.model", config.rag.embedder.model)]
    auth = config.ingress.auth
    if auth.enabled:
        out += [("ingress.auth.store", auth.store or ""), ("ingress.auth.audit_log", auth.audit_log or "")]
    return [(what, path) for what, path in out if path.startswith("/")]


def check_mounts(config: AppConfig, ray_up: bool) -> None:
    """Every path of `node_paths` on a volume of `cluster.volumes` (one `ray up` can mount, with a
    host_path, when `ray_up`) or under `cluster.paths_in_image`; ConfigError naming the others."""
    cluster = config.cluster
    problems = []
    for what, path in node_paths(config):
        if any(under(path, root) for root in cluster.paths_in_image):
            continue
        volumes = [v for v in cluster.volumes if v.holds(path)]
        if not volumes:
            problems.append(f"  {what} {path} is on no volume (cluster.volumes) and not in cluster.paths_in_image")
        elif ray_up and all(v.host_path is None for v in volumes):
            names = ", ".join(v.name for v in volumes)
            problems.append(
                f"  {what} {path}: ray up cannot mount a PersistentVolumeClaim; give volume {names} a host_path"
            )
    if problems:
        raise ConfigError("cluster: the nodes would not have these paths\n" + "\n".join(problems))


def _custom_resources(node: NodeType) -> dict[str, int]:
    """Resources beyond CPUs, GPUs and memory, which Ray counts itself; accelerator types included."""
    return {k: v for k, v in node.ray_resources().items() if k not in ("CPU", "GPU", "memory")}


def _start_flags(node: NodeType) -> str:
    """`ray start` flags for a node's custom resources and labels (ray up's local provider only)."""
    flags = ""
    if node.resources:
        flags += " --resources=" + shlex.quote(json.dumps(node.resources))
    if node.labels:
        flags += " --labels=" + shlex.quote(",".join(f"{k}={v}" for k, v in node.labels.items()))
    return flags


def _node_type(node: HeadNode | WorkerGroup) -> dict[str, Any]:
    out: dict[str, Any] = {"resources": node.ray_resources()}
    if node.ray_labels():
        out["labels"] = node.ray_labels()
    if isinstance(node, WorkerGroup):
        out |= {"min_workers": node.min_workers, "max_workers": node.max_workers}
    return {**out, "node_config": dict(node.node_config)}


def cluster_launcher(config: AppConfig) -> dict[str, Any]:
    """`ray up`'s cluster config: the provider as given, every node in the same container image with
    tierserve installed by the setup commands, and a node type per node kind. Ray starts with
    `ray.env` in its environment, so Serve's own processes see it too."""
    head, groups = plan_nodes(config)
    check_mounts(config, ray_up=True)
    env = "".join(f"{k}={shlex.quote(v)} " for k, v in {**config.ray.env, **RAY_TOKEN_ENV}.items())
    dashboard = shlex.quote(config.cluster.dashboard_host)
    head_start = f"ulimit -n 65536; {env}ray start --head --port=6379 --dashboard-host={dashboard}"
    head_start += " --autoscaling-config=~/ray_bootstrap_config.yaml"
    worker_start = f"ulimit -n 65536; {env}ray start --address=$RAY_HEAD_IP:6379"
    out: dict[str, Any] = {"cluster_name": cluster_name(config)}
    local = config.cluster.provider["type"] == "local"
    if local:
        # ray up's local provider has one node type and passes no node type's resources or labels
        # to `ray start`, so the start commands carry them.
        if len(groups) > 1:
            names = ", ".join(g.name for g in groups)
            raise ConfigError(f"cluster.provider: type 'local' takes one kind of worker node, got {names}")
        head_start += " --num-gpus=0" + _start_flags(head)
        worker_start += _start_flags(groups[0]) if groups else ""
    else:
        out["max_workers"] = sum(group.max_workers for group in groups)
    out["provider"] = dict(config.cluster.provider)
    if config.cluster.auth:
        out["auth"] = dict(config.cluster.auth)
    out["docker"] = {
        "image": image(config),
        "container_name": "ray_container",
        "pull_before_run": True,
        "run_options": ["--ulimit nofile=65536:65536"]
        + [
            f"-v {shlex.quote(v.host_path)}:{shlex.quote(v.mount_path)}" + (":ro" if v.read_only else "")
            for v in config.cluster.volumes
            if v.host_path is not None
        ],
    }
    if not local:
        out["head_node_type"] = "head"
        out["available_node_types"] = {"head": _node_type(head), **{g.name: _node_type(g) for g in groups}}
    # Ray's token, generated on the machine that runs `ray up` (`ray get-auth-token --generate`),
    # copied to every node; the server secret API keys are hashed with lies beside the key store,
    # on a shared volume (docs/security.md).
    out["file_mounts"] = {RAY_TOKEN_FILE: RAY_TOKEN_FILE}
    out["setup_commands"] = setup_commands(config)
    out["head_start_ray_commands"] = ["ray stop", head_start]
    out["worker_start_ray_commands"] = ["ray stop", worker_start]
    return out


def _ray_start_params(node: NodeType, gpus: int) -> dict[str, str]:
    params = {"num-gpus": str(gpus)}
    custom = _custom_resources(node)
    if custom:  # the quoting KubeRay and Ray's KubeRay autoscaler both read: "{\"name\": 1}"
        params["resources"] = '"' + json.dumps(custom).replace('"', '\\"') + '"'
    return params


def _pod_template(config: AppConfig, node: NodeType, container: str, ports: dict[str, int]) -> dict[str, Any]:
    limits = {"cpu": str(node.ray_cpus())}  # what the node can give a pod (nodes.py: less what it keeps)
    if node.ray_memory_gb() is not None:
        limits["memory"] = f"{node.ray_memory_gb():g}Gi"
    if isinstance(node, WorkerGroup) and node.gpus:
        limits["nvidia.com/gpu"] = str(node.gpus)
    spec: dict[str, Any] = {"name": container, "image": image(config)}
    setup = setup_commands(config)
    if setup:  # KubeRay runs the container's args, then `&& ray start ...`
        spec["args"] = [" && ".join(setup)]
    secrets = config.cluster.secrets
    spec["env"] = [{"name": k, "value": v} for k, v in {**config.ray.env, **RAY_TOKEN_ENV}.items()]
    spec["env"] += [  # references to the secrets, never their values
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": secrets.ray_token, "key": "auth_token"}}},
        {
            "name": config.ingress.auth.secret_env,
            "valueFrom": {"secretKeyRef": {"name": secrets.tierserve, "key": "server-secret"}},
        },
    ]
    spec["ports"] = [{"containerPort": port, "name": name} for name, port in ports.items()]
    spec["resources"] = {"limits": limits, "requests": dict(limits)}
    pod: dict[str, Any] = {"containers": [spec]}
    volumes = config.cluster.volumes
    if volumes:
        spec["volumeMounts"] = [{"name": v.name, "mountPath": v.mount_path, "readOnly": v.read_only} for v in volumes]
        pod["volumes"] = [_pod_volume(v) for v in volumes]
    instance = next((node.node_config[k] for k in INSTANCE_TYPE_KEYS if k in node.node_config), None)
    if instance is not None:  # the node's instance type, a label every cloud's Kubernetes sets
        pod["nodeSelector"] = {"node.kubernetes.io/instance-type": str(instance)}
    if isinstance(node, WorkerGroup) and node.gpus:  # GPU node pools are tainted so that only GPU pods land
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for key, value in node.pod.items():  # the node's own pod keys win; its volumes add to tierserve's
        pod[key] = pod.get(key, []) + value if key == "volumes" else value
    return {"spec": pod}


INSTANCE_TYPE_KEYS = ("InstanceType", "machineType", "vmSize")
"""Where `ray up`'s node configs name the instance type: AWS, GCP, Azure."""


def _pod_volume(volume: Volume) -> dict[str, Any]:
    if volume.claim_name is not None:
        return {
            "name": volume.name,
            "persistentVolumeClaim": {"claimName": volume.claim_name, "readOnly": volume.read_only},
        }
    return {"name": volume.name, "hostPath": {"path": volume.host_path, "type": "Directory"}}


def ray_service(config: AppConfig) -> dict[str, Any]:
    """KubeRay's RayService: serve.yaml as `serveConfigV2`, the head and one worker group per node kind,
    and the in-tree autoscaler when a worker group may change size."""
    head, groups = plan_nodes(config)
    check_mounts(config, ray_up=False)
    serve_port = {"serve": config.server.port}
    head_spec: dict[str, Any] = {"rayStartParams": {"dashboard-host": "0.0.0.0", **_ray_start_params(head, 0)}}
    if head.ray_labels():  # KubeRay v1.5+: labels are a field of the group, no longer a rayStartParam
        head_spec["labels"] = head.ray_labels()
    head_spec["template"] = _pod_template(config, head, "ray-head", {**HEAD_PORTS, **serve_port})
    workers = []
    for group in groups:
        spec: dict[str, Any] = {
            "groupName": group.name,
            "replicas": group.min_workers,
            "minReplicas": group.min_workers,
            "maxReplicas": group.max_workers,
            "rayStartParams": _ray_start_params(group, group.gpus),
        }
        if group.ray_labels():
            spec["labels"] = group.ray_labels()
        spec["template"] = _pod_template(config, group, "ray-worker", serve_port)
        workers.append(spec)
    cluster = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": any(g.min_workers != g.max_workers for g in groups),
        "headGroupSpec": head_spec,
        "workerGroupSpecs": workers,
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": cluster_name(config)},
        "spec": {"serveConfigV2": to_yaml(serve_config(config)), "rayClusterConfig": cluster},
    }


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (serveConfigV2), and no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None),
)


def to_yaml(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=1000)


FILES = {
    "serve.yaml": (
        serve_config,
        "Ray Serve config. On a running Ray cluster: serve deploy serve.yaml --address http://127.0.0.1:8265 "
        "(the dashboard through `ray dashboard cluster.yaml`, or `kubectl port-forward`)",
    ),
    "cluster.yaml": (cluster_launcher, "Ray cluster launcher config: ray up cluster.yaml, then deploy serve.yaml"),
    "rayservice.yaml": (ray_service, "KubeRay RayService: kubectl apply -f rayservice.yaml"),
}


def render(config: AppConfig, out_dir: str | Path, source: str) -> list[Path]:
    """Write serve.yaml, cluster.yaml and rayservice.yaml for `config` (read from `source`) into
    `out_dir`; every file is built before any is written, so a bad config writes nothing, nor one
    whose GPU tiers cannot start on their GPUs (cluster/fit.py). API keys are on in them
    (`for_cluster`); the files are readable by their owner only."""
    config = for_cluster(config)
    require_fit(config, plan_nodes(config)[1])
    texts = {name: to_yaml(build(config)) for name, (build, _) in FILES.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (_, what) in FILES.items():
        header = f"# {what}\n# Written by `tierserve deploy render` from {source}: edit that file and render again.\n"
        path = out / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an older file keeps its mode otherwise
        with os.fdopen(fd, "w") as f:
            f.write(header + texts[name])
        written.append(out / name)
    return written
