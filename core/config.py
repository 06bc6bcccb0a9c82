"""Settings every deployment shares: how Ray Serve runs its replicas, and where tierserve caches files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def default_cache_dir() -> Path:
    """`$TIERSERVE_CACHE`, else `~/.cache/tierserve`."""
    return Path(os.environ.get("TIERSERVE_CACHE") or Path.home() / ".cache" / "tierserve")


class DeploymentOptions(BaseModel):
    """How Ray Serve runs a deployment's replicas."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(None, ge=1)
    """Replicas of this deployment: 1 when unset, chosen by Serve's autoscaler when `autoscaling` is set."""
    autoscaling: dict[str, Any] | None = None
    """Ray Serve's `autoscaling_config` (min_replicas, max_replicas, target_ongoing_requests, ...),
    checked against Serve's own schema; replaces `num_replicas`."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests one replica accepts at once; more wait in the caller's queue."""
    max_queued_requests: int = Field(-1, ge=-1)
    """Requests a caller may queue for this deployment beyond its replicas' `max_ongoing_requests`
    (Serve's back-pressure): more are refused at once, which the ingress answers with 429 and
    `Retry-After` (the HTTP proxy, for the ingress's own queue, with a plain 503). -1: no bound."""
    num_cpus: float = Field(1.0, ge=0)
    """Logical CPUs Ray reserves per replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves per replica."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per replica, e.g. {"tier_large": 1} to pin a tier to nodes started with that
    resource (`ray start --resources`, a worker group's `resources` in the `cluster:` section)."""
    label_selector: dict[str, str] = Field(default_factory=dict)
    """Ray node labels a replica needs (Ray's `label_selector`): {"pool": "large"} (equal), {"pool": "!spot"}
    (not equal or absent), {"zone": "in(a,b)"}, {"zone": "!in(a,b)"}. GPU tiers apply it to every rank bundle."""
    accelerator_type: str | None = None
    """Ray's `accelerator_type` ("L4", "A100", "H100", ...): only nodes with that accelerator. GPU tiers ask it
    of every rank bundle, as the resource `accelerator_type:<type>` that Ray gives such nodes."""
    max_replicas_per_node: int | None = Field(None, ge=1, le=100)
    """At most this many replicas of the deployment on one node (Serve's `max_replicas_per_node`); not for GPU
    tiers, whose replicas are placement groups (Serve refuses both together)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables of the replica process (e.g. VLLM_CPU_KVCACHE_SPACE)."""
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    """How long a stopping replica (scaled down, replaced by an update) may finish the requests
    it has before it is killed: set it above the longest answer a tier streams."""
    max_surge_percent: int = Field(0, ge=0, le=100)
    """Extra replicas Serve may start while it replaces this deployment's replicas for a new
    config (Serve's `max_surge_percent`, as a share of the replica count): above 0, old replicas
    keep serving until their replacements run, at the cost of the extra resources meanwhile;
    0 stops an old replica before its replacement starts."""

    @field_validator("autoscaling")
    @classmethod
    def _serve_autoscaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from ray.serve.config import AutoscalingConfig

            AutoscalingConfig(**value)  # raises naming the bad field
        return value

    @field_validator("label_selector")
    @classmethod
    def _ray_label_selector(cls, value: dict[str, str]) -> dict[str, str]:
        from ray._private.label_utils import validate_label_selector  # the check Serve's own schema runs

        error = validate_label_selector(value)
        if error:
            raise ValueError(error)
        return value

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set num_replicas or autoscaling, not both")
        return self

    def replica_bounds(self) -> tuple[int, int]:
        """The fewest and the most replicas this deployment runs: `num_replicas` both times, or
        autoscaling's minimum and maximum."""
        if self.autoscaling is not None:
            from ray.serve.config import AutoscalingConfig

            bounds = AutoscalingConfig(**self.autoscaling)
            return bounds.min_replicas, bounds.max_replicas
        return self.num_replicas or 1, self.num_replicas or 1

    def max_replicas(self) -> int:
        """The most replicas this deployment runs: `num_replicas`, or autoscaling's maximum."""
        return self.replica_bounds()[1]

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`."""
        actor_options: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor_options["num_gpus"] = self.num_gpus
        if self.resources:
            actor_options["resources"] = dict(self.resources)
        if self.label_selector:
            actor_options["label_selector"] = dict(self.label_selector)
        if self.accelerator_type:
            actor_options["accelerator_type"] = self.accelerator_type
        if self.env:
            actor_options["runtime_env"] = {"env_vars": dict(self.env)}
        replicas: dict[str, Any] = (
            {"autoscaling_config": dict(self.autoscaling)}
            if self.autoscaling is not None
            else {"num_replicas": self.num_replicas or 1}
        )
        if self.max_replicas_per_node is not None:
            replicas["max_replicas_per_node"] = self.max_replicas_per_node
        return {
            **replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": actor_options,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "max_surge_percent": self.max_surge_percent,
        }
