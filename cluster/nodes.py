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
RAY_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311"
"""Ray's own image of the installed Ray release (tierserve pins it); `-gpu` is appended when a tier runs on GPUs."""

ACCELERATOR_LABEL = "ray.io/accelerator-type"
"""The node label Ray sets from the GPU it detects, e.g. 'A100'."""

CLUSTER_NAME = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""`ray up` cluster names and RayService names: a DNS-1035 label (KubeRay allows at most 47 characters)."""
CLUSTER_NAME_MAX = 47

GROUP_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
"""Worker group names become Kubernetes pod names: lowercase letters, digits and '-'."""


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
    """Logical CPUs of the node: its CPU resource in `ray up`, its pod's CPU limit on Kubernetes."""
    memory_gb: float | None = Field(None, gt=0)
    """Memory of the node in GiB (the pod's memory limit on Kubernetes); None leaves it to the node."""
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

    def ray_resources(self) -> dict[str, int]:
        """Ray resources of one such node: CPUs, GPUs, memory in bytes, custom resources."""
        return _ray_resources(self.cpus, 0, self.memory_gb, None, self.resources)

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
        return _ray_resources(self.cpus, self.gpus, self.memory_gb, self.accelerator_type, self.resources)

    def ray_labels(self) -> dict[str, str]:
        if self.accelerator_type:
            return {ACCELERATOR_LABEL: self.accelerator_type, **self.labels}
        return dict(self.labels)


class ClusterConfig(BaseModel):
    """The cluster `tierserve deploy render` writes deploy files for (docs/deployment.md)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=CLUSTER_NAME, max_length=CLUSTER_NAME_MAX)
    """`ray up` cluster name and RayService name; default the application's `name`. KubeRay wants a
    DNS-1035 label of at most 47 characters."""
    image: str | None = None
    """Container image of every node; default rayproject/ray:2.60.0-py311, with `-gpu` when a tier runs on GPUs."""
    setup_commands: list[str] | None = None
    """Shell commands that install tierserve on each node before Ray starts (`ray up`'s setup_commands;
    on Kubernetes they run in the Ray container before `ray start`). Default: pip install "tierserve[gpu]"
    when a tier runs on GPUs, else "tierserve[cpu]". [] when the image already has tierserve."""
    provider: dict[str, Any] = Field(default_factory=lambda: {"type": "aws", "region": "us-west-2"})
    """`ray up`'s provider block, passed untouched: set your cloud here. `type: local` (machines you list in
    head_ip / worker_ips) takes one kind of worker node."""
    auth: dict[str, Any] = Field(default_factory=dict)
    """`ray up`'s auth block (ssh_user, ssh_private_key, ...); empty: the provider's defaults."""
    head: HeadNode = Field(default_factory=HeadNode)
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
