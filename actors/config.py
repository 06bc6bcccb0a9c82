"""Config of a model tier and of the Serve deployment that runs it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

EMBEDDED_PREFIX = "embedded:"


class DeploymentOptions(BaseModel):
    """How Ray Serve runs a deployment's replicas."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)
    """Replicas of this deployment."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests one replica accepts at once; more wait in the caller's queue."""
    num_cpus: float = Field(1.0, ge=0)
    """Logical CPUs Ray reserves per replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves per replica."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per replica, e.g. {"tier_large": 1} to pin a tier to labelled nodes."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables of the replica process (e.g. VLLM_CPU_KVCACHE_SPACE)."""
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`."""
        actor_options: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor_options["num_gpus"] = self.num_gpus
        if self.resources:
            actor_options["resources"] = dict(self.resources)
        if self.env:
            actor_options["runtime_env"] = {"env_vars": dict(self.env)}
        return {
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": actor_options,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }


class TierConfig(BaseModel):
    """One model tier: a model, the vLLM options to run it, and its Serve deployment."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=48)
    """Tier name; clients may send it as `model`."""
    model: str
    """`embedded:<name>` for a checkpoint tierserve prepares itself, a local checkpoint directory,
    or a model id the engine can load."""
    description: str = ""
    engine: dict[str, Any] = Field(default_factory=dict)
    """Passed untouched to vLLM's `AsyncEngineArgs` (max_model_len, dtype, tensor_parallel_size, ...)."""
    stream_interval_ms: float = Field(0.0, ge=0, le=1000)
    """Chunks of a stream are sent to the ingress at most this often; the first goes at once and
    whatever piled up meanwhile travels as one message. 0 sends as fast as the consumer takes them."""
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)

    @property
    def embedded_name(self) -> str | None:
        """The embedded model's name when `model` is `embedded:<name>`."""
        if self.model.startswith(EMBEDDED_PREFIX):
            return self.model[len(EMBEDDED_PREFIX) :]
        return None
