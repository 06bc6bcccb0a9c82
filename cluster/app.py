"""The app builder: one validated config in, one Ray Serve application out.

`build_app` is the Serve `import_path` target (`serve run configs/serve.yaml`); `tierserve serve`
calls `build_application` on the same config, so both start the same application.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from tierserve.actors.deployment import TierDeployment
from tierserve.actors.placement import placement_options
from tierserve.cluster.config import AppConfig, load_config
from tierserve.rag.retriever import Retriever
from tierserve.router.ingress import Ingress
from tierserve.router.tiers import TierEntry


def tier_deployment_name(tier: str) -> str:
    return f"tier-{tier}"


INGRESS_NAME = "ingress"
RETRIEVER_NAME = "retriever"


def build_application(config: AppConfig) -> Application:
    """The ingress bound to one deployment per tier, each with its own Serve options, and to
    the retriever when retrieval is on."""
    handles = {
        tier.name: TierDeployment.options(name=tier_deployment_name(tier.name), **placement_options(tier)).bind(
            tier, config.model_cache, config.telemetry
        )
        for tier in config.tiers
    }
    entries = [TierEntry(t.name, t.description, t.deployment.max_replicas()) for t in config.tiers]
    retriever = None
    if config.rag.enabled:
        retriever = Retriever.options(name=RETRIEVER_NAME, **config.rag.deployment.serve_options()).bind(
            config.rag, config.model_cache, config.telemetry
        )
    return Ingress.options(name=INGRESS_NAME, **config.ingress.deployment.serve_options()).bind(
        config.ingress,
        entries,
        handles,
        config.telemetry,
        config.routing,
        config.model_cache,
        retriever,
        config.rag,
        config.safety,
    )


def build_app(args: dict[str, Any]) -> Application:
    """Serve app builder. args: `config` (path of a tierserve YAML; default the embedded one)."""
    return build_application(load_config(args.get("config")))
