"""Telemetry bootstrap: one call per process sets up OpenTelemetry tracing from the config.

Every deployment's constructor calls `setup_telemetry` with the app's `TelemetryConfig` (the
builder hands it over); the rest of tierserve uses the OpenTelemetry API only (`tracer()`,
`inject`, `extract`). When tracing is off no provider is installed, the API's tracer is the
no-op one, and a span costs a function call. Spans leave through a batch processor on its own
thread, so an exporter that is down or slow drops spans (and logs that) but never delays or
fails a request.

The standard environment variables work as in any OpenTelemetry SDK: `OTEL_SDK_DISABLED`,
`OTEL_TRACES_EXPORTER` (otlp, console, none), `OTEL_EXPORTER_OTLP_PROTOCOL` (http/protobuf, grpc),
`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`. The config file's `telemetry` block sets the same
things for a deployment whose environment you do not control; where both are given, the config
file wins, except `OTEL_SDK_DISABLED` and `OTEL_SERVICE_NAME`.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
"""Seconds, doubling from 5 ms: token gaps of a fast GPU to whole answers on a CPU."""

TRACER_NAME = "tierserve"
_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.Lock()
_configured: dict[str, Any] = {}

TokenSpanSetting = Literal["all", "none"] | Annotated[int, Field(ge=1)]
"""Which generated tokens get a span: every token, none, or one in N tokens (N >= 1). The
spans themselves are `tierserve.actors.tracing.TokenSpans`."""


@functools.cache
def _version() -> str:
    try:
        return metadata.version("tierserve")
    except metadata.PackageNotFoundError:
        return "0"


class TelemetryConfig(BaseModel):
    """Tracing for every deployment of the app (`telemetry:` in the config file)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    """None: on when an exporter has somewhere to send spans (an OTLP endpoint in the config
    or the environment, or the console / jsonl exporter), off otherwise."""
    exporter: Literal["otlp", "console", "jsonl", "none"] | None = None
    """None: `OTEL_TRACES_EXPORTER`, else otlp."""
    protocol: Literal["http/protobuf", "grpc"] | None = None
    """OTLP transport; None: `OTEL_EXPORTER_OTLP_PROTOCOL`, else http/protobuf."""
    endpoint: str | None = None
    """OTLP base endpoint (`http://collector:4318`; traces go to `<endpoint>/v1/traces` over
    HTTP). None: the standard environment variables."""
    jsonl_path: str | None = None
    """jsonl exporter: the file each process appends one JSON span per line to."""
    service_name: str = "tierserve"
    resource: dict[str, str] = Field(default_factory=dict)
    """Extra resource attributes (e.g. deployment.environment.name)."""
    batch_delay_ms: int = Field(1000, ge=1)
    """How long the batch processor waits before sending a batch of spans."""
    queue_size: int = Field(32768, ge=512)
    """Spans the batch processor holds while the exporter catches up; beyond it, new spans are
    dropped (with a warning) rather than slowing requests. Room for a burst of token spans."""
    token_spans: TokenSpanSetting = "all"
    """A span per generated token: for every token, none, or one in N tokens (an int)."""
    token_text: bool = False
    """Put each token's text on its span. Off by default: generated text may hold personal data."""

    def token_span_every(self, override: str | int | None = None) -> int:
        """Every how many tokens a token span is made (0: never), from `token_spans` or a
        deployment's own `override` of it."""
        setting = self.token_spans if override is None else override
        if setting == "all":
            return 1
        if setting == "none":
            return 0
        return int(setting)

    def resolved_exporter(self) -> str:
        return self.exporter or os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip() or "otlp"

    def is_enabled(self) -> bool:
        if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return False
        exporter = self.resolved_exporter()
        if self.enabled is not None:
            return self.enabled and exporter != "none"
        if exporter in ("console", "jsonl"):
            return True
        if exporter == "otlp":
            return bool(
                self.endpoint
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            )
        return False


class JsonLinesSpanExporter:
    """Appends each finished span to a file as one line of JSON (OpenTelemetry's own span JSON)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = "".join(span.to_json(indent=None) + "\n" for span in spans)  # indent=None: one line
        try:
            with self._lock, self.path.open("a") as out:
                out.write(lines)
        except OSError:
            logger.warning("cannot write spans to %s", self.path, exc_info=True)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _exporter(config: TelemetryConfig) -> Any:
    kind = config.resolved_exporter()
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind == "jsonl":
        return JsonLinesSpanExporter(config.jsonl_path or "tierserve-spans.jsonl")
    if kind != "otlp":
        raise ValueError(f"unknown traces exporter {kind!r} (otlp, console, jsonl, none)")
    protocol = config.protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=config.endpoint) if config.endpoint else GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    if config.endpoint:
        return HttpExporter(endpoint=config.endpoint.rstrip("/") + "/v1/traces")
    return HttpExporter()


def build_provider(config: TelemetryConfig, resource: dict[str, Any]) -> Any:
    """An SDK tracer provider exporting as `config` says, through a batch processor."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {**resource, **config.resource}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = config.service_name
    provider = TracerProvider(resource=Resource.create(attributes))
    processor = BatchSpanProcessor(
        _exporter(config), schedule_delay_millis=config.batch_delay_ms, max_queue_size=config.queue_size
    )
    provider.add_span_processor(processor)
    return provider


def setup_telemetry(config: TelemetryConfig, component: str, **attributes: str) -> bool:
    """Install this process's tracer provider from `config` (once; later calls are no-ops).
    `component` (ingress, tier) and `attributes` (e.g. tier=...) become resource attributes.
    Returns whether tracing is on in this process."""
    with _lock:
        if "enabled" in _configured:
            return _configured["enabled"]
        enabled = config.is_enabled()
        _configured["enabled"] = enabled
        if not enabled:
            return False
        resource = {
            "service.version": _version(),
            "tierserve.component": component,
            "process.pid": os.getpid(),
            **{f"tierserve.{key}": value for key, value in attributes.items()},
        }
        replica = _replica_id()
        if replica:
            resource["service.instance.id"] = replica
        provider = build_provider(config, resource)
        trace.set_tracer_provider(provider)
        _configured["provider"] = provider
        logger.info("tracing on: %s exporter, component %s", config.resolved_exporter(), component)
        return True


def shutdown_telemetry() -> None:
    """Flush and stop this process's exporter (a replica going away)."""
    provider = _configured.get("provider")
    if provider is not None:
        provider.shutdown()


def _replica_id() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a Serve replica
        return None


@functools.cache
def tracer() -> trace.Tracer:
    """tierserve's tracer, looked up once per process (each lookup reads package metadata). Before
    a provider is installed this is the API's proxy tracer, which follows the provider set later."""
    return trace.get_tracer(TRACER_NAME, _version())


def inject(context: otel_context.Context | None = None) -> dict[str, str]:
    """A W3C trace-context carrier (`traceparent`, `tracestate`) for `context` (default: current)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier


def extract(carrier: Any) -> otel_context.Context:
    """The context a W3C carrier (HTTP headers, `GenerateRequest.trace_context`) describes."""
    return _PROPAGATOR.extract(carrier)
