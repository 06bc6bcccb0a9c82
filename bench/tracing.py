"""What tracing costs: output throughput and TTFT with token spans for every token, one in 16,
none, and tracing off, side by side in one run.

It starts a local Ray Serve with two applications of the embedded model, each tier its own
engine bound to the same core (so only the tracing differs):

- app `untraced`: no telemetry; tier `off`;
- app `traced`: OTLP/HTTP export to a receiver in a separate process that accepts and discards
  (the exporter's serialisation and sending are counted, a collector's work is not); tiers
  `all` (a span per token), `sampled` (`token_spans: 16`) and `none` (request, routing and
  generation spans only).

Each round runs every variant, in rotated order, at concurrency 16 and 1 through Serve's HTTP
proxy with the official OpenAI client (streaming, greedy, fixed output length); the table gives
medians over rounds and ratios against `off`, and is written to docs/benchmarks/tracing-benchmark.md.

    .venv/bin/python bench/tracing.py [--rounds 3] [--max-tokens 128] [--no-write]
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

from serving import Result, free_port, openai_stream, run_load

REPO = Path(__file__).resolve().parents[1]
VARIANTS = [
    ("off", "untraced", "tracing off"),
    ("none", "traced", "tracing on, no token spans"),
    ("sampled", "traced", "tracing on, one token span in 16"),
    ("all", "traced", "tracing on, a span per token"),
]

DISCARD_RECEIVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def tier(name: str, **fields) -> dict:
    return {
        "name": name,
        "model": "embedded:smollm2-135m-instruct",
        "engine": {"dtype": "bfloat16", "max_model_len": 2048, "max_num_seqs": 32},
        # Every engine on the same core: the variants differ only in tracing.
        "deployment": {"num_cpus": 1, "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "1"}},
        **fields,
    }


def start(receiver_port: int) -> str:
    import ray
    from ray import serve

    from tierserve.cluster.app import build_application
    from tierserve.cluster.config import SERVE_THROUGHPUT_ENV, parse_config
    from tierserve.cluster.ops import wait_serving

    os.environ.update(SERVE_THROUGHPUT_ENV)
    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": dict(SERVE_THROUGHPUT_ENV)})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    ingress = {"deployment": {"num_cpus": 0}}
    untraced = {"name": "untraced", "tiers": [tier("off")], "ingress": ingress, "telemetry": {"enabled": False}}
    traced = {
        "name": "traced",
        "tiers": [tier("none", token_spans="none"), tier("sampled", token_spans=16), tier("all", token_spans="all")],
        "ingress": ingress,
        "telemetry": {"exporter": "otlp", "endpoint": f"http://127.0.0.1:{receiver_port}"},
    }
    for app in (untraced, traced):
        serve.run(build_application(parse_config(app)), name=app["name"], route_prefix=f"/{app['name']}")
        wait_serving(f"http://127.0.0.1:{port}/{app['name']}", 60)
    return f"http://127.0.0.1:{port}"


async def measure(base: str, args: argparse.Namespace) -> dict[tuple[str, int], list[Result]]:
    streams = {name: openai_stream(f"{base}/{app}/v1", name) for name, app, _ in VARIANTS}
    for name in streams:  # warm-up
        await run_load(name, streams[name], 2, 2, 8)
    results: dict[tuple[str, int], list[Result]] = {}
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for name, _, _ in order:
            for concurrency, requests in ((16, args.requests_c16), (1, args.requests_c1)):
                result = await run_load(name, streams[name], concurrency, requests, args.max_tokens)
                results.setdefault((name, concurrency), []).append(result)
                print(
                    f"  round {r + 1} {name:8s} c={concurrency:<2d} {result.throughput:6.1f} tok/s  "
                    f"TTFT p50 {result.ttft_p50 * 1e3:6.1f} ms  errors {result.errors}",
                    flush=True,
                )
    return results


def table(results: dict[tuple[str, int], list[Result]]) -> str:
    lines = [
        "| variant | what | concurrency | output tok/s | vs off | TTFT p50 ms | vs off | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency in (16, 1):
        base = results[("off", concurrency)]
        base_tps = statistics.median(r.throughput for r in base)
        base_ttft = statistics.median(r.ttft_p50 for r in base)
        for name, _, what in VARIANTS:
            runs = results[(name, concurrency)]
            tps = statistics.median(r.throughput for r in runs)
            ttft = statistics.median(r.ttft_p50 for r in runs)
            errors = sum(r.errors for r in runs)
            lines.append(
                f"| {name} | {what} | {concurrency} | {tps:.1f} | {tps / base_tps:.3f}x | "
                f"{ttft * 1e3:.1f} | {ttft / base_ttft:.2f}x | {errors} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--requests-c16", type=int, default=32)
    p.add_argument("--requests-c1", type=int, default=6)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    from tierserve.actors.checkpoints import prepare_embedded

    prepare_embedded("smollm2-135m-instruct")
    receiver_port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", DISCARD_RECEIVER, str(receiver_port)])
    try:
        base = start(receiver_port)
        started = time.perf_counter()
        results = asyncio.run(measure(base, args))
        print(f"measured in {time.perf_counter() - started:.0f} s")
    finally:
        receiver.terminate()
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    result = table(results)
    print(result)
    if args.no_write:
        return
    doc = REPO / "docs" / "benchmarks" / "tracing-benchmark.md"
    doc.write_text(
        f"""# Tracing overhead benchmark

Measured by `python bench/tracing.py` on {time.strftime("%Y-%m-%d")}, {platform.machine()}, {os.cpu_count()} cores,
no GPU. SmolLM2-135M-Instruct, one engine per variant, all bound to the same core; streaming chat
through Serve's HTTP proxy with the OpenAI client, greedy, {args.max_tokens} output tokens per request;
{args.requests_c16} requests at concurrency 16 and {args.requests_c1} at concurrency 1 per round,
{args.rounds} rounds in rotated order; medians over rounds. Spans go over OTLP/HTTP to a receiver
in another process that discards them.

{result}

`vs off`: the same measure relative to `off` (no tracer provider at all). See docs/telemetry.md.
"""
    )
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
