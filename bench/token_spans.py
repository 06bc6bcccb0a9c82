"""What one token span costs, in CPU time, and at what token rate that matters.

The end-to-end benchmark (bench/tracing.py) runs the whole stack, where run-to-run noise on a
small machine is larger than a few percent. This one isolates the tier's tracing code: it passes
a synthetic stream of one-token chunks (a decode without speculation) through
`core.streams.observed` to `actors.tracing.GenerationSpan`, in-process, and measures the CPU
time of the whole process (the batch processor's export thread and the OTLP/HTTP export to a
receiver in another process that discards the spans included) per generated token, for:

- no tracer provider (tracing off: the OpenTelemetry API's no-op tracer);
- the SDK with the tier's generation span but no token spans;
- one token span in 16;
- a span per token.

From the extra CPU per token over "off" it derives the token rate at which token spans would use
3% of one core. Results go to docs/benchmarks/token-span-cost.md.

    .venv/bin/python bench/token_spans.py [--tokens 20000] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from serving import free_port
from tracing import DISCARD_RECEIVER

REPO = Path(__file__).resolve().parents[1]
TOKENS_PER_REQUEST = 256


async def chunks(n: int):
    from tierserve.actors.types import TokenChunk

    for i in range(n):
        yield TokenChunk(0, "x", [1000 + i % 500], i + 1, "length" if i == n - 1 else None)


async def drive(tracer, every: int, tokens: int) -> None:
    from tierserve.actors.tracing import generation_span
    from tierserve.actors.types import GenerateRequest, SamplingOptions
    from tierserve.core.streams import observed
    from tierserve.core.types import ChatMessage

    for r in range(tokens // TOKENS_PER_REQUEST):
        request = GenerateRequest(
            f"chatcmpl-{r}", SamplingOptions(max_tokens=TOKENS_PER_REQUEST), messages=[ChatMessage("user", "hi")]
        )
        span = generation_span(request, "bench", "m", token_every=every, speculating=False, otel_tracer=tracer)
        stream = observed(chunks(TOKENS_PER_REQUEST), [span] if span is not None else [])
        async for _ in stream:
            pass


def measure(name: str, tracer, every: int, tokens: int, flush) -> float:
    asyncio.run(drive(tracer, every, 2 * TOKENS_PER_REQUEST))  # warm-up
    flush()
    cpu, wall = time.process_time(), time.perf_counter()
    asyncio.run(drive(tracer, every, tokens))
    flush()  # the spans' export is part of the cost
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    per_token_us = 1e6 * cpu / tokens
    print(f"  {name:28s} {per_token_us:7.2f} us CPU per token  ({wall:.2f} s wall)", flush=True)
    return per_token_us


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5, help="the variants run in turn this many times; medians reported")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    from opentelemetry import trace

    from tierserve.core.telemetry import TelemetryConfig, build_provider

    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", DISCARD_RECEIVER, str(port)])
    try:
        time.sleep(1.0)
        # The provider a tier replica builds, with the default telemetry settings.
        config = TelemetryConfig(exporter="otlp", endpoint=f"http://127.0.0.1:{port}")
        provider = build_provider(config, {"tierserve.component": "tier"})
        sdk = provider.get_tracer("tierserve")
        variants = [
            ("off (no provider)", trace.NoOpTracer(), 1, lambda: None),
            ("SDK, no token spans", sdk, 0, provider.force_flush),
            ("SDK, one token span in 16", sdk, 16, provider.force_flush),
            ("SDK, a span per token", sdk, 1, provider.force_flush),
        ]
        # In turn, round after round, so that the machine's slow spells fall on every variant.
        runs: dict[str, list[float]] = {name: [] for name, *_ in variants}
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}", flush=True)
            for name, tracer, every, flush in variants:
                runs[name].append(measure(name, tracer, every, args.tokens, flush))
        rows = [(name, statistics.median(values)) for name, values in runs.items()]
        provider.shutdown()
    finally:
        receiver.terminate()

    base = rows[0][1]
    lines = [
        "| variant | CPU per token (us) | extra over off (us) | token rate at which the extra is 3% of a core |",
        "|---|---:|---:|---:|",
    ]
    for name, us in rows:
        extra = us - base
        rate = f"{0.03 / (extra * 1e-6):,.0f} tok/s" if extra > 0 else "-"
        lines.append(f"| {name} | {us:.2f} | {extra:.2f} | {rate} |")
    result = "\n".join(lines)
    print(result)
    if args.no_write:
        return
    doc = REPO / "docs" / "benchmarks" / "token-span-cost.md"
    doc.write_text(
        f"""# Token span cost

Measured by `python bench/token_spans.py --tokens {args.tokens} --rounds {args.rounds}`
on {time.strftime("%Y-%m-%d")}, {platform.machine()}, {os.cpu_count()} cores: the tier's tracing
code (`actors/tracing.py`, through `core/streams.py`) fed {args.tokens} one-token chunks in requests
of {TOKENS_PER_REQUEST} tokens, in-process, {args.rounds} rounds of the four variants in turn
(medians), on the tracer provider a tier builds with the default settings; CPU time of the whole
process (batch processor and OTLP/HTTP export to a receiver in another process that discards the
spans included, every span exported) per token.

{result}

The last column: how many tokens per second one replica can stream before the tracing work
takes 3% of one core. Compare it with a tier's output rate (docs/benchmarks/tracing-benchmark.md,
docs/benchmarks/serving.md): above it, sample token spans (`token_spans: N`) or turn them off for that
tier. See docs/telemetry.md.
"""
    )
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
