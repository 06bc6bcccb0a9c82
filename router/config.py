"""Config of the ingress deployment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tierserve.actors.config import DeploymentOptions


class IngressConfig(BaseModel):
    """The OpenAI-compatible front door."""

    model_config = ConfigDict(extra="forbid")

    default_tier: str | None = None
    """The tier `model: auto` goes to; the first tier when unset."""
    health_timeout_s: float = Field(5.0, gt=0)
    """How long `GET /health` waits for each tier's answer."""
    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.5, max_ongoing_requests=256)
    )
