"""The application config: one YAML file, validated once, split into each deployment's section.

`load_config` reports every problem with the file, the line and the YAML path of the bad field
(`configs/x.yaml:12: tiers[0].engine.max_model_len: Input should be a valid integer`), including
engine options vLLM does not know.
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tierserve.actors.config import TierConfig
from tierserve.cluster.nodes import ClusterConfig
from tierserve.core.config import default_cache_dir
from tierserve.core.telemetry import TelemetryConfig
from tierserve.rag.config import RagConfig
from tierserve.router.config import IngressConfig, RoutingConfig
from tierserve.safety.config import SafetyConfig


class ConfigError(ValueError):
    """A config file that cannot be used; the message names file, line and field."""


class ServerConfig(BaseModel):
    """Where Serve's HTTP proxy listens."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    request_timeout_s: float | None = Field(None, gt=0)
    """End-to-end HTTP request timeout enforced by Serve's proxy; None waits as long as it takes."""
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = "EveryNode"
    """Which nodes run Serve's HTTP proxy in a deploy from a Serve config (`tierserve deploy
    apply`, the rendered serve.yaml): every node (put a load balancer in front), the head only,
    or none (Python handles only). Proxies on several nodes of one machine would share a port,
    so nodes started on one machine need HeadOnly."""


SERVE_THROUGHPUT_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}
"""Ray Serve's throughput mode (user code and router on each replica's main event loop, gRPC
between replicas), keeping the HTTP proxy in front, and gRPC between the proxy and the replicas
too: Ray 2.60 decides the proxy's transport before throughput mode switches gRPC on, so the mode
alone leaves every streamed chunk from ingress to proxy a Ray object (360 against 151 us of
proxy CPU per output token, "proxy by reference" in docs/benchmarks/serving.md). Replica logs,
the access log included, are written as they come: throughput mode would hold up to 1,000
records a replica in memory until the buffer fills or an error is logged, and a replica that dies
loses them. configs/serve.yaml repeats it as the application's runtime_env (a test keeps the
two equal)."""


class RayConfig(BaseModel):
    """How `tierserve serve` gets a Ray cluster."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = None
    """An existing cluster to join (e.g. 'auto'); None starts a private local one."""
    num_cpus: float | None = Field(None, gt=0)
    """Logical CPUs of a local cluster; every replica reserves some."""
    metrics_export_port: int | None = Field(None, ge=1, le=65535)
    """Where a local cluster serves Prometheus metrics (tierserve's and Ray Serve's); None: Ray
    picks a port. A joined cluster uses its nodes' own (`ray start --metrics-export-port`)."""
    env: dict[str, str] = Field(default_factory=lambda: dict(SERVE_THROUGHPUT_ENV))
    """Environment of Ray's and Serve's processes (the job's runtime env; a local cluster's
    processes inherit it from the start)."""


class AppConfig(BaseModel):
    """Everything `tierserve` serves: tiers, the ingress, the server and the Ray cluster."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("tierserve", pattern=r"^[A-Za-z0-9_-]+$")
    """Serve application name."""
    model_cache: str | None = None
    """Where prepared checkpoints live; default $TIERSERVE_CACHE or ~/.cache/tierserve."""
    server: ServerConfig = Field(default_factory=ServerConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    tiers: list[TierConfig] = Field(min_length=1)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    """How `model: auto` picks a tier, fallback and load shedding (docs/routing.md)."""
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    """Tracing of every deployment (docs/telemetry.md); off unless an exporter has somewhere to send."""
    rag: RagConfig = Field(default_factory=RagConfig)
    """Retrieval-augmented generation: the index store, the embedder and the retriever (docs/rag.md)."""
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    """The guard chain on input, retrieved chunks and output: PII and prompt injection (docs/safety.md)."""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """The nodes of a cluster deploy, for `tierserve deploy render` (docs/deployment.md); `tierserve serve`
    does not use it."""

    @model_validator(mode="after")
    def _tier_names(self) -> AppConfig:
        names = [t.name for t in self.tiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tier names must be unique; repeated: {', '.join(dupes)}")
        if "auto" in names:
            raise ValueError("'auto' is reserved and cannot name a tier")
        unknown = sorted(set(self.routing.tiers) - set(names))
        if unknown:
            raise ValueError(f"routing.tiers names no such tier: {', '.join(unknown)} (tiers: {', '.join(names)})")
        if self.ingress.default_tier is not None and self.ingress.default_tier not in names:
            raise ValueError(f"ingress.default_tier {self.ingress.default_tier!r} is not a tier ({', '.join(names)})")
        return self


def bundled_config(name: str = "local.yaml") -> Path:
    """Path of a config file shipped with the package (`configs/` in the source tree)."""
    return Path(str(resources.files("tierserve.configs").joinpath(name)))


def yaml_path(loc: tuple[Any, ...]) -> str:
    """('tiers', 0, 'engine') -> 'tiers[0].engine'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest YAML node along `loc` that exists in the file."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
            if pair is None:
                break
            node, line = pair[1], pair[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _existing_loc(data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The prefix of pydantic's `loc` that is a real path in the data (drops union-branch tags),
    plus the first missing key (a missing required field is still named)."""
    out: list[Any] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str):
            out.append(part)
            break
        else:
            break
        out.append(part)
    return tuple(out)


def parse_config(data: Any, source: str = "<config>", text: str | None = None, check_engine: bool = True) -> AppConfig:
    """Validate a config mapping; raise ConfigError naming each bad field's YAML path."""
    root = yaml.compose(text) if text else None
    try:
        config = AppConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = _existing_loc(data, tuple(err["loc"]))
            line = _line_of(root, loc)
            where = f"{source}:{line}" if line else source
            lines.append(f"{where}: {yaml_path(loc)}: {err['msg']}")
        raise ConfigError("invalid config\n  " + "\n  ".join(lines)) from None
    if check_engine:
        _check_engine_options(config, data, source, root)
    return config


def _check_engine_options(config: AppConfig, data: Any, source: str, root: yaml.Node | None) -> None:
    """Engine options go to vLLM untouched, so a typo is caught here rather than in a replica;
    so is a tool-call parser vLLM does not have."""
    if importlib.util.find_spec("vllm") is None:  # a config-only install: nothing to check against
        return
    from tierserve.actors.engine import unknown_engine_options

    lines = []
    for i, tier in enumerate(config.tiers):
        for key in unknown_engine_options(tier.engine):
            loc = ("tiers", i, "engine", key)
            line = _line_of(root, loc)
            lines.append(f"{source}:{line}: {yaml_path(loc)}: not an option of vLLM's AsyncEngineArgs")
        if tier.tools is not None:
            try:
                tier.tools.parser_class()
            except ValueError as exc:
                loc = ("tiers", i, "tools", "parser")
                lines.append(f"{source}:{_line_of(root, loc)}: {yaml_path(loc)}: {exc}")
    if lines:
        raise ConfigError("invalid config\n  " + "\n  ".join(lines))


def load_config(path: str | Path | None = None, check_engine: bool = True) -> AppConfig:
    """Load and validate a YAML config file (default: the bundled embedded config)."""
    path = Path(path) if path else bundled_config()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    return parse_config(data, str(path), text, check_engine)


def model_cache_dir(config: AppConfig | None, override: str | None = None) -> Path:
    """Where models, classifiers and indexes are cached: `override` (a `--cache-dir`), else the
    config's `model_cache`, else `$TIERSERVE_CACHE` or `~/.cache/tierserve`."""
    chosen = override or (config.model_cache if config else None)
    return Path(chosen) if chosen else default_cache_dir()
