"""Which tier a request's `model` field names."""

from __future__ import annotations

from dataclasses import dataclass

from tierserve.core.errors import InvalidRequest, ModelNotFound

AUTO = "auto"


@dataclass(frozen=True, slots=True)
class TierEntry:
    name: str
    description: str = ""
    replicas: int = 1
    """Replicas the tier runs (autoscaling: its maximum), for the router's capacity."""
    tools: bool = False
    """Whether it serves tool calling (its config sets `tools`)."""


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

    def serving_tools(self, allowed: set[str] | None, named: str | None) -> set[str]:
        """The tiers a request with tools may go to, of those `allowed` (None: all); a 400
        naming `tools` when the `named` tier (or every tier) serves none."""
        tiers = {name for name, t in self.tiers.items() if t.tools and (allowed is None or name in allowed)}
        if named is not None and named not in tiers:
            others = f"; tiers that do: {', '.join(sorted(tiers))}" if tiers else ""
            raise InvalidRequest(f"tier {named!r} does not serve tool calling{others}", "tools", "tools_not_supported")
        if not tiers:
            raise InvalidRequest("no tier of this service serves tool calling", "tools", "tools_not_supported")
        return tiers
