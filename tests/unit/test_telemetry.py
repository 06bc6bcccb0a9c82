"""Telemetry settings, the tier's generation and token spans (on an in-memory exporter), and
the process bootstrap (in a fresh interpreter, as each replica runs it)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tierserve.actors.config import TierConfig
from tierserve.actors.tracing import generation_span
from tierserve.actors.types import GenerateRequest, SamplingOptions, TokenChunk, Usage
from tierserve.core.streams import observed
from tierserve.core.telemetry import TelemetryConfig, extract, inject
from tierserve.core.types import ChatMessage

OTEL_ENV = [
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
]


@pytest.fixture
def clean_env(monkeypatch):
    for name in OTEL_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_tracing_is_on_only_when_spans_have_somewhere_to_go(clean_env):
    assert not TelemetryConfig().is_enabled()
    assert TelemetryConfig(endpoint="http://collector:4318").is_enabled()
    assert TelemetryConfig(exporter="console").is_enabled()
    assert not TelemetryConfig(exporter="none", endpoint="http://collector:4318").is_enabled()
    assert not TelemetryConfig(enabled=False, endpoint="http://collector:4318").is_enabled()
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert TelemetryConfig().is_enabled()
    clean_env.setenv("OTEL_SDK_DISABLED", "true")
    assert not TelemetryConfig().is_enabled()
    clean_env.delenv("OTEL_SDK_DISABLED")
    clean_env.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not TelemetryConfig().is_enabled()


def test_token_span_sampling_all_one_in_n_none_and_per_tier():
    config = TelemetryConfig(token_spans=8)
    assert TelemetryConfig().token_span_every() == 1
    assert TelemetryConfig(token_spans="none").token_span_every() == 0
    assert config.token_span_every() == 8
    assert config.token_span_every("all") == 1  # a tier's own setting wins
    with pytest.raises(ValueError):
        TelemetryConfig(token_spans=0)
    with pytest.raises(ValueError):
        TierConfig(name="t", model="m", token_spans=0)
    assert not TelemetryConfig().token_text  # token text is opt-in


def test_trace_context_round_trips_through_a_carrier():
    provider = TracerProvider()
    span = provider.get_tracer("t").start_span("parent")
    carrier = inject(trace.set_span_in_context(span))
    assert carrier["traceparent"].split("-")[1] == trace.format_trace_id(span.get_span_context().trace_id)
    assert trace.get_current_span(extract(carrier)).get_span_context().span_id == span.get_span_context().span_id


async def _chunks(steps: list[list[int]], usage: Usage):
    for i, ids in enumerate(steps, start=1):
        await asyncio.sleep(0.002)
        last = i == len(steps)
        yield TokenChunk(0, "x" * len(ids), ids, i, "length" if last else None, usage=usage if last else None)


def _run(steps, every=1, speculating=True, decode=None, parent=None):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    request = GenerateRequest(
        "chatcmpl-1",
        SamplingOptions(max_tokens=16, temperature=0.0),
        messages=[ChatMessage("user", "hi")],
        trace_context=parent or {},
    )
    usage = Usage(3, sum(len(s) for s in steps))

    async def consume():
        span = generation_span(
            request,
            "quality",
            "embedded:m",
            token_every=every,
            speculating=speculating,
            decode=decode,
            otel_tracer=provider.get_tracer("t"),
        )
        return [c async for c in observed(_chunks(steps, usage), [span])]

    chunks = asyncio.run(consume())
    return chunks, exporter.get_finished_spans()


def test_a_generation_span_with_a_span_per_token_marking_accepted_drafts():
    parent_provider = TracerProvider()
    parent = parent_provider.get_tracer("t").start_span("POST /v1/chat/completions")
    carrier = inject(trace.set_span_in_context(parent))
    chunks, spans = _run([[5], [6, 7, 8], [9]], decode=lambda i: f"<{i}>", parent=carrier)
    assert [c.token_ids for c in chunks] == [[5], [6, 7, 8], [9]]  # passed through untouched
    generation = next(s for s in spans if s.name == "chat quality")
    tokens = [s for s in spans if s.name == "token"]
    assert generation.parent.span_id == parent.get_span_context().span_id
    assert generation.context.trace_id == parent.get_span_context().trace_id
    assert generation.kind == trace.SpanKind.SERVER
    a = generation.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "quality"
    assert a["gen_ai.response.finish_reasons"] == ("length",)
    assert a["gen_ai.usage.input_tokens"] == 3 and a["gen_ai.usage.output_tokens"] == 5
    assert a["tierserve.token_spans"] == 5
    assert [t.attributes["tierserve.token.index"] for t in tokens] == [0, 1, 2, 3, 4]
    assert [t.attributes["tierserve.token.step"] for t in tokens] == [1, 2, 2, 2, 3]
    assert [t.attributes["tierserve.token.speculative"] for t in tokens] == [False, True, True, False, False]
    assert [t.attributes["tierserve.token.text"] for t in tokens] == ["<5>", "<6>", "<7>", "<8>", "<9>"]
    assert all(t.parent.span_id == generation.context.span_id for t in tokens)
    # Each token's span runs from the previous arrival to its own; a step's later tokens take no time.
    assert tokens[0].start_time == generation.start_time
    assert (
        tokens[1].start_time == tokens[0].end_time and tokens[2].start_time == tokens[2].end_time == tokens[1].end_time
    )
    assert tokens[1].attributes["tierserve.token.gap_ms"] > 0 and tokens[2].attributes["tierserve.token.gap_ms"] == 0


def test_token_spans_thinned_or_off_and_no_speculation_flag_on_a_plain_tier():
    _, spans = _run([[1], [2], [3], [4], [5], [6], [7]], every=3, speculating=False)
    tokens = [s for s in spans if s.name == "token"]
    assert [t.attributes["tierserve.token.index"] for t in tokens] == [0, 3, 6]
    assert "tierserve.token.text" not in tokens[0].attributes
    _, spans = _run([[1, 2, 3]], every=0, speculating=False)
    assert [s.name for s in spans] == ["chat quality"]
    _, spans = _run([[1, 2, 3]], speculating=False)
    assert not any(t.attributes["tierserve.token.speculative"] for t in spans if t.name == "token")


def test_a_failing_stream_marks_the_span_and_reraises():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def broken():
        yield TokenChunk(0, "a", [1], 1)
        raise RuntimeError("engine died")

    async def consume():
        request = GenerateRequest("cmpl-1", prompt="p")
        span = generation_span(
            request, "small", "m", token_every=1, speculating=False, otel_tracer=provider.get_tracer("t")
        )
        async for _ in observed(broken(), [span]):
            pass

    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(consume())
    (generation,) = [s for s in exporter.get_finished_spans() if s.name == "text_completion small"]
    assert generation.status.status_code == trace.StatusCode.ERROR
    assert generation.attributes["error.type"] == "RuntimeError"


BOOTSTRAP = """
import sys, time
from opentelemetry import trace
from tierserve.core.telemetry import TelemetryConfig, setup_telemetry, shutdown_telemetry, tracer
config = TelemetryConfig.model_validate_json(sys.argv[1])
assert setup_telemetry(config, "tier", tier="small")
assert setup_telemetry(config, "ingress")  # once per process: the second call changes nothing
start = time.perf_counter()
for i in range(200):
    with tracer().start_as_current_span("work") as span:
        span.set_attribute("i", i)
print(f"{(time.perf_counter() - start) * 1e3:.1f}")
shutdown_telemetry()
"""


def _bootstrap(config: TelemetryConfig, tmp_path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-c", BOOTSTRAP, config.model_dump_json()],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_bootstrap_writes_json_lines_with_the_resource(tmp_path):
    path = tmp_path / "spans.jsonl"
    done = _bootstrap(
        TelemetryConfig(exporter="jsonl", jsonl_path=str(path), resource={"deployment.environment.name": "test"}),
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 200 and {line["name"] for line in lines} == {"work"}
    resource = lines[0]["resource"]["attributes"]
    assert resource["service.name"] == "tierserve" and resource["tierserve.component"] == "tier"
    assert resource["tierserve.tier"] == "small" and resource["deployment.environment.name"] == "test"


def test_an_unreachable_collector_never_blocks_or_fails_the_traced_code(tmp_path):
    started = time.monotonic()
    done = _bootstrap(TelemetryConfig(endpoint="http://127.0.0.1:9", batch_delay_ms=10), tmp_path)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) < 1000  # 200 spans made while every export fails
    assert time.monotonic() - started < 60


def test_bootstrap_exports_over_otlp_grpc_to_a_real_grpc_receiver(tmp_path):
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = []

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802 (gRPC's naming)
            received.extend(s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        config = TelemetryConfig(protocol="grpc", endpoint=f"http://127.0.0.1:{port}", batch_delay_ms=10)
        done = _bootstrap(config, tmp_path)
        assert done.returncode == 0, done.stderr
        assert received.count("work") == 200
    finally:
        server.stop(None)
