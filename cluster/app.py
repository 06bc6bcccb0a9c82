"""The app builder: one validated config in, one Ray Serve application out.

`build_app` is the Serve `import_path` target (`serve run configs/serve.yaml`, and the serve.yaml
`tierserve deploy render` writes); `tierserve serve` calls `build_application` on the same config,
so all start the same application.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from tierserve.actors.deployment import TierDeployment
from tierserve.actors.placement import placement_options
from tierserve.cluster.config import AppConfig, ConfigError, load_config, parse_config
from tierserve.cluster.ops import INGRESS_NAME, RETRIEVER_NAME, tier_deployment_name
from tierserve.rag.retriever import Retriever
from tierserve.router.ingress import Ingress
from tierserve.router.tiers import TierEntry


def build_application(config: AppConfig) -> Application:
    """The ingress bound to one deployment per tier, each with its own Serve options, and to
    the retriever when retrieval is on."""
    handles = {
        tier.name: TierDeployment.options(name=tier_deployment_name(tier.name), **placement_options(tier)).bind(
            tier, config.model_cache, config.telemetry
        )
        for tier in config.tiers
    }
    entries = [TierEntry(t.name, t.description, t.deployment.max_replicas(), t.tools is not None) for t in config.tiers]
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
    """Serve app builder. args: `tierserve` (the config itself as a mapping, as in the serve.yaml that
    `tierserve deploy render` writes, so no file is needed on the cluster) or `config` (path of a
    tierserve YAML; default the embedded one)."""
    if "tierserve" in args:
        if "config" in args:
            raise ConfigError("Serve args: give `tierserve` (the config) or `config` (its path), not both")
        return build_application(parse_config(args["tierserve"], source="Serve args `tierserve`"))
    return build_application(load_config(args.get("config")))
