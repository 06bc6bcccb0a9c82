"""The `cluster:` section: which nodes a cluster deploy of tierserve runs on.

`tierserve deploy render` turns it, with the tiers, into a `ray up` cluster config and a KubeRay
RayService (cluster/manifests.py); cluster/plan.py derives worker groups the config leaves out
and checks that every deployment's replica fits some node type.
"""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tierserve.actors.placement import accelerator_resource

RAY_VERSION = metadata.version("ray")
IMAGE = f"tierserve:{metadata.version('tierserve')}"
"""The image the repository's Dockerfile builds (Ray's image of the pinned release with tierserve
installed); `-cpu` or `-gpu` is appended. Push it where the nodes can pull it and set `cluster.image`."""

ACCELERATOR_LABEL = "ray.io/accelerator-type"
"""The node label Ray sets from the GPU it detects, e.g. 'A100'."""

CLUSTER_NAME = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""`ray up` cluster names and RayService names: a DNS-1035 label (KubeRay allows at most 47 characters)."""
CLUSTER_NAME_MAX = 47

GROUP_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
"""Worker group names become Kubernetes pod names: lowercase letters, digits and '-'."""


DAEMONSET_CPUS = 0.5
DAEMONSET_MEMORY_GB = 0.5
EVICTION_MEMORY_GB = 0.1


def system_cpus(cpus: int) -> float:
    """CPUs a node keeps for its system, Kubernetes and per-node agents (GKE's kube-reserved
    formula: 6% of the first core, 1% of the second, 0.5% of the next two, 0.25% above four;
    plus `DAEMONSET_CPUS` for DaemonSets such as the GPU device plugin and log agents)."""
    tiers = [(1, 0.06), (1, 0.01), (2, 0.005), (math.inf, 0.0025)]
    return _graduated(cpus, tiers) + DAEMONSET_CPUS


def system_memory_gb(memory_gb: float) -> float:
    """Memory a node keeps (GKE's formula: 25% of the first 4 GiB, 20% of the next 4, 10% of the
    next 8, 6% of the next 112, 2% above 128; plus the kubelet's eviction threshold and DaemonSets)."""
    tiers = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (math.inf, 0.02)]
    return _graduated(memory_gb, tiers) + EVICTION_MEMORY_GB + DAEMONSET_MEMORY_GB


def _graduated(amount: float, tiers: list[tuple[float, float]]) -> float:
    out, left = 0.0, amount
    for size, share in tiers:
        out += min(left, size) * share
        left -= min(left, size)
    return out


def _ray_resources(
    cpus: int, gpus: int, memory_gb: float | None, accelerator_type: str | None, custom: dict[str, int]
) -> dict[str, int]:
    out = {"CPU": cpus, "GPU": gpus}
    if memory_gb is not None:
        out["memory"] = math.floor(memory_gb * 2**30)
    if accelerator_type:
        out[accelerator_resource(accelerator_type)] = 1  # what Ray gives a node with that GPU
    return {**out, **custom}


class NodeType(BaseModel):
    """What a node of one kind offers Ray, and how to start one."""

    model_config = ConfigDict(extra="forbid")

    cpus: int = Field(8, ge=1)
    """CPUs of the machine (its instance type's vCPUs). Ray gets `ray_cpus` of them: what the system,
    Kubernetes and per-node agents keep is set aside, so a pod asking for them fits the node."""
    memory_gb: float | None = Field(None, gt=0)
    """Memory of the machine in GiB; Ray and the pod get `ray_memory_gb` of it. None leaves it to
    the node (and the pod asks for none)."""
    reserved_cpus: float | None = Field(None, ge=0)
    """CPUs kept for the system, Kubernetes and DaemonSets; default `system_cpus(cpus)` (about 0.6
    of 16, 0.8 of 96). Set it from your nodes' allocatable capacity (`kubectl describe node`)."""
    reserved_memory_gb: float | None = Field(None, ge=0)
    """Memory kept likewise; default `system_memory_gb(memory_gb)` (6.1 GiB of 64, 30 of 1152)."""
    resources: dict[str, int] = Field(default_factory=dict)
    """Custom Ray resources the node offers (what `ray start --resources` gives), e.g. {"tier_large": 2}."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Ray node labels the node starts with (what `ray start --labels` gives), e.g. {"pool": "large"}."""
    node_config: dict[str, Any] = Field(default_factory=dict)
    """`ray up`: the provider's node config, passed untouched (AWS: {InstanceType: g6.xlarge, ...})."""
    pod: dict[str, Any] = Field(default_factory=dict)
    """KubeRay: keys merged into the pod template's `spec`, untouched (nodeSelector, tolerations, volumes, ...),
    all but `containers`."""

    @field_validator("pod")
    @classmethod
    def _not_containers(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "containers" in value:
            raise ValueError("pod.containers is tierserve's own (the Ray container); set image and setup_commands")
        return value

    @field_validator("labels")
    @classmethod
    def _ray_label_syntax(cls, value: dict[str, str]) -> dict[str, str]:
        from ray._private.label_utils import validate_node_label_syntax  # what `ray start --labels` checks

        validate_node_label_syntax(value)
        return value

    def ray_cpus(self) -> int:
        """The CPUs Ray and the node's pod get: the machine's less what it keeps, whole CPUs."""
        kept = self.reserved_cpus if self.reserved_cpus is not None else system_cpus(self.cpus)
        return max(1, math.floor(self.cpus - kept + 1e-9))

    def ray_memory_gb(self) -> float | None:
        """The memory Ray and the node's pod get, in GiB rounded down to a half."""
        if self.memory_gb is None:
            return None
        kept = self.reserved_memory_gb if self.reserved_memory_gb is not None else system_memory_gb(self.memory_gb)
        return max(0.5, math.floor((self.memory_gb - kept) * 2) / 2)

    def ray_resources(self) -> dict[str, int]:
        """Ray resources of one such node: CPUs, GPUs, memory in bytes, custom resources."""
        return _ray_resources(self.ray_cpus(), 0, self.ray_memory_gb(), None, self.resources)

    def ray_labels(self) -> dict[str, str]:
        """Ray node labels of one such node."""
        return dict(self.labels)


class HeadNode(NodeType):
    """The head node: Ray's control processes, Serve's controller and proxy, and every CPU deployment
    that fits there. It has no GPUs (`--num-gpus 0`), so GPU work always lands on workers."""

    memory_gb: float | None = Field(32.0, gt=0)


class WorkerGroup(NodeType):
    """A kind of worker node and how many of it the autoscaler may run."""

    name: str = Field(pattern=GROUP_NAME, max_length=63)
    """Node type name in `ray up`, worker group name in KubeRay."""
    gpus: int = Field(0, ge=0)
    """GPUs of the node: its GPU resource in `ray up`, `nvidia.com/gpu` of its pod on Kubernetes."""
    accelerator_type: str | None = None
    """The GPU model ("L4", "A100", ...): the node offers the resource `accelerator_type:<type>` and the
    label ray.io/accelerator-type, as Ray gives a node with that GPU."""
    gpu_memory_gb: float | None = Field(None, gt=0)
    """Memory of one of its GPUs in GiB, for the fit check (cluster/fit.py); default the table's
    figure for its accelerator_type."""
    min_workers: int = Field(0, ge=0)
    """Nodes of this kind kept running."""
    max_workers: int = Field(1, ge=0)
    """Nodes of this kind the autoscaler may run at most."""

    @model_validator(mode="after")
    def _bounds(self) -> WorkerGroup:
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must not exceed max_workers ({self.max_workers})")
        if self.accelerator_type and not self.gpus:
            raise ValueError("accelerator_type needs gpus")
        return self

    def ray_resources(self) -> dict[str, int]:
        return _ray_resources(self.ray_cpus(), self.gpus, self.ray_memory_gb(), self.accelerator_type, self.resources)

    def ray_labels(self) -> dict[str, str]:
        if self.accelerator_type:
            return {ACCELERATOR_LABEL: self.accelerator_type, **self.labels}
        return dict(self.labels)


class Volume(BaseModel):
    """A directory every node's Ray container mounts at `mount_path`: checkpoints, the index store."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=GROUP_NAME, max_length=63)
    mount_path: str
    """Where the container sees it; the config's paths (tier models, `rag.store`) lie under it."""
    host_path: str | None = None
    """A directory on each machine (a local disk, or an NFS/EFS/FSx mount the machine image or
    `ray up`'s initialization commands set up): `ray up` mounts it into the container (docker
    `-v`), KubeRay as a hostPath volume unless `claim_name` is set."""
    claim_name: str | None = None
    """KubeRay: a PersistentVolumeClaim (EFS, Filestore, an S3 CSI driver, ...) in the RayService's
    namespace. `ray up` cannot mount one, so a volume the config's paths need there wants a host_path too."""
    read_only: bool = True
    """Checkpoints can be; the index store's volume cannot while `tierserve rag ingest` writes to it."""

    @model_validator(mode="after")
    def _source(self) -> Volume:
        if not self.mount_path.startswith("/"):
            raise ValueError(f"mount_path must be absolute, got {self.mount_path!r}")
        if self.host_path is None and self.claim_name is None:
            raise ValueError("a volume needs host_path (a directory on each machine) or claim_name (a PVC), or both")
        return self

    def holds(self, path: str) -> bool:
        return under(path, self.mount_path)


def under(path: str, root: str) -> bool:
    """Whether `path` is the directory `root` or lies below it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


class ClusterSecrets(BaseModel):
    """Names of the Kubernetes secrets a RayService reads; create them before `kubectl apply`
    (docs/security.md)."""

    model_config = ConfigDict(extra="forbid")

    ray_token: str = Field("ray-auth-token", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """Ray's token (key `auth_token`): Ray's token authentication is on in every pod."""
    tierserve: str = Field("tierserve-auth", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """The server secret API keys are hashed with (key `server-secret`), as `ingress.auth.secret_env`."""


class ClusterConfig(BaseModel):
    """The cluster `tierserve deploy render` writes deploy files for (docs/deployment.md)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=CLUSTER_NAME, max_length=CLUSTER_NAME_MAX)
    """`ray up` cluster name and RayService name; default the application's `name`. KubeRay wants a
    DNS-1035 label of at most 47 characters."""
    image: str | None = None
    """Container image of every node; default `tierserve:<version>-gpu` when a tier runs on GPUs, else
    `-cpu`: the repository's Dockerfile builds them (docs/deployment.md). Set it to where you pushed yours."""
    setup_commands: list[str] = Field(default_factory=list)
    """Shell commands run on each node before Ray starts (`ray up`'s setup_commands; on Kubernetes in
    the Ray container before `ray start`), e.g. installing your wheel into a plain Ray image. tierserve
    is not on a package index: with an image that lacks it, install it here."""
    provider: dict[str, Any] = Field(default_factory=lambda: {"type": "aws", "region": "us-west-2"})
    """`ray up`'s provider block, passed untouched: set your cloud here. `type: local` (machines you list in
    head_ip / worker_ips) takes one kind of worker node."""
    auth: dict[str, Any] = Field(default_factory=dict)
    """`ray up`'s auth block (ssh_user, ssh_private_key, ...); empty: the provider's defaults."""
    head: HeadNode = Field(default_factory=HeadNode)
    volumes: list[Volume] = Field(default_factory=list)
    """Directories every node mounts (checkpoints, the index store); `deploy render` refuses a
    config whose absolute paths lie on none of them and not under `paths_in_image`."""
    paths_in_image: list[str] = Field(default_factory=list)
    """Directories the container image itself holds (checkpoints baked into a custom `image`)."""
    min_full_context_sequences: int = Field(1, ge=1)
    """The fit check (cluster/fit.py) refuses a GPU tier whose KV cache holds fewer sequences of
    its `max_model_len` at once than this; 1 is vLLM's own condition to start."""
    dashboard_host: str = "127.0.0.1"
    """Where `ray up`'s head binds Ray's dashboard and Jobs API (which run code for whoever reaches
    them): localhost, reached through `ray dashboard cluster.yaml`'s SSH tunnel. KubeRay's operator
    must reach the dashboard from outside the pod, so the RayService binds it to the pod's
    interfaces and relies on Ray's token auth and the cluster's network policy."""
    secrets: ClusterSecrets = Field(default_factory=lambda: ClusterSecrets())
    """The Kubernetes secrets the RayService reads (the files hold references, never values)."""
    worker_groups: list[WorkerGroup] = Field(default_factory=list)
    """Worker node kinds. Empty: derived from the deployments, one group per GPU tier and per deployment
    the head cannot hold (cluster/plan.py)."""

    @field_validator("provider")
    @classmethod
    def _provider_type(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("type"), str):
            raise ValueError("provider needs a `type` (aws, gcp, azure, local, ...)")
        return value

    @model_validator(mode="after")
    def _unique_groups(self) -> ClusterConfig:
        names = [g.name for g in self.worker_groups]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"worker group names must be unique; repeated: {', '.join(dupes)}")
        if "head" in names:
            raise ValueError("'head' names the head node; call the worker group something else")
        return self
