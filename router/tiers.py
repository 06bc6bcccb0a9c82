"""Which tier a request's `model` field names."""

from __future__ import annotations

from dataclasses import dataclass

from tierserve.core.errors import ModelNotFound

AUTO = "auto"


@dataclass(frozen=True, slots=True)
class TierEntry:
    name: str
    description: str = ""
    replicas: int = 1
    """Replicas the tier runs (autoscaling: its maximum), for the router's capacity."""


class TierDirectory:
    """Resolves `model` to a tier name: a tier's own name, or `auto` for the default tier."""

    def __init__(self, tiers: list[TierEntry], default: str | None = None):
        if not tiers:
            raise ValueError("at least one tier is required")
        self.tiers = {t.name: t for t in tiers}
        self.default = default or tiers[0].name
        if self.default not in self.tiers:
            raise ValueError(f"default tier {self.default!r} is not one of {sorted(self.tiers)}")

    def resolve(self, model: str) -> str:
        if model == AUTO:
            return self.default
        if model in self.tiers:
            return model
        known = ", ".join([AUTO, *self.tiers])
        raise ModelNotFound(f"The model {model!r} does not exist. Available models: {known}.", "model")

    def model_ids(self) -> list[str]:
        """What `GET /v1/models` lists: `auto` first, then every tier."""
        return [AUTO, *self.tiers]
