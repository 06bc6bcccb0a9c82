"""Overload: a burst of several times what the embedded default can hold, through the real service.

Starts the embedded default (configs/local.yaml: `small` and `quality`, guards and retrieval
on) and sends `--burst` streamed `model: auto` chats at once, a third `interactive` and the rest
`standard`, each asking for `--tokens` tokens (ignore_eos, so every admitted answer is that
long). It records, per request, the status, the time to it, `Retry-After`, and for admitted
ones the time to first token against the class's budget. The burst is repeated `--rounds`
times to see whether the ingress's memory stays flat, and after each round the router's
in-flight counts must be back to zero.

    .venv/bin/python bench/overload.py [--burst 240] [--tokens 64] [--rounds 3] [--no-write]

Prints a table and writes it to docs/reliability.md (section `overload`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import replace_section  # noqa: E402

BUDGET_TTFT_MS = {"interactive": 1000.0, "standard": 3000.0}


@dataclass
class Outcome:
    sla_class: str
    status: int
    status_ms: float
    """Request sent to status line (for a refusal: the whole answer)."""
    retry_after: str | None = None
    ttft_ms: float | None = None
    tokens: int = 0
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client: httpx.AsyncClient, i: int, tokens: int) -> Outcome:
    sla = "interactive" if i % 3 == 0 else "standard"
    body = {
        "model": "auto",
        "messages": [
            {"role": "user", "content": f"Request {i}: write a short note about rivers and {i % 17} bridges."}
        ],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "sla_class": sla,
    }
    started = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            out = Outcome(sla, r.status_code, 1e3 * (time.perf_counter() - started), r.headers.get("retry-after"))
            if r.status_code != 200:
                out.error = json.loads(await r.aread())["error"]["code"]
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out.error = event["error"]["code"]
                    continue
                if any(c["delta"].get("content") for c in event.get("choices", [])):
                    out.tokens += 1
                    if out.ttft_ms is None:
                        out.ttft_ms = 1e3 * (time.perf_counter() - started)
            return out
    except httpx.HTTPError as exc:
        return Outcome(sla, -1, 1e3 * (time.perf_counter() - started), error=type(exc).__name__)


def serve_embedded(app_name: str) -> str:
    """Start Ray and the embedded default (configs/local.yaml) as `app_name` on a free local
    port; return its base URL. The caller shuts Serve and Ray down."""
    from ray import serve

    from tierserve.actors.checkpoints import prepare_embedded
    from tierserve.cluster.app import build_app
    from tierserve.cluster.cli import start_ray
    from tierserve.cluster.config import load_config

    config_path = REPO / "configs" / "local.yaml"
    prepare_embedded("smollm2-135m-instruct", progress=False)
    config = load_config(config_path)
    start_ray(config.model_copy(update={"ray": config.ray.model_copy(update={"num_cpus": 8})}), log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": str(config_path)}), name=app_name, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def ingress_rss_mb(app_name: str) -> float:
    """Resident memory of the ingress replica (Ray titles it `ServeReplica:APP:ingress`)."""
    from tierserve.cluster.ops import INGRESS_NAME

    title = f"ServeReplica:{app_name}:{INGRESS_NAME}"
    rss = [p.memory_info().rss for p in psutil.process_iter(["cmdline"]) if title in " ".join(p.info["cmdline"] or [])]
    return sum(rss) / 2**20


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


async def burst(base: str, n: int, tokens: int) -> list[Outcome]:
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        return list(await asyncio.gather(*(one(client, i, tokens) for i in range(n))))


def in_flight(http: httpx.Client) -> dict[str, int]:
    return {t["name"]: t["router"]["in_flight"] for t in http.get("/v1/tiers", timeout=60).json()["data"]}


def summarise(outcomes: list[Outcome]) -> dict:
    admitted = [o for o in outcomes if o.status == 200]
    shed = [o for o in outcomes if o.status in (429, 503)]
    row = {
        "sent": len(outcomes),
        "admitted": len(admitted),
        "shed": len(shed),
        "other": sorted({(o.status, o.error) for o in outcomes if o.status not in (200, 429, 503)}),
        "shed_with_retry_after": sum(1 for o in shed if o.retry_after),
        "shed_p50_ms": quantile([o.status_ms for o in shed], 0.5),
        "shed_p99_ms": quantile([o.status_ms for o in shed], 0.99),
        "stream_errors": sorted({o.error for o in admitted if o.error}),
    }
    for sla, budget in BUDGET_TTFT_MS.items():
        mine = [o for o in admitted if o.sla_class == sla and o.ttft_ms is not None]
        row[f"{sla}_admitted"] = len(mine)
        row[f"{sla}_ttft_p50_ms"] = quantile([o.ttft_ms for o in mine], 0.5)
        row[f"{sla}_ttft_p99_ms"] = quantile([o.ttft_ms for o in mine], 0.99)
        row[f"{sla}_within"] = sum(1 for o in mine if o.ttft_ms <= budget)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| round | sent | admitted | shed (429/503) | with Retry-After | shed p50 / p99 ms "
        "| interactive admitted, within 1 s TTFT | its TTFT p50 / p99 ms | standard admitted, within 3 s "
        "| its TTFT p50 / p99 ms | ingress RSS MB | in flight after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | {r['sent']} | {r['admitted']} | {r['shed']} | {r['shed_with_retry_after']} | "
            f"{fmt(r['shed_p50_ms'])} / {fmt(r['shed_p99_ms'])} | "
            f"{r['interactive_admitted']}, {r['interactive_within']} | "
            f"{fmt(r['interactive_ttft_p50_ms'])} / {fmt(r['interactive_ttft_p99_ms'])} | "
            f"{r['standard_admitted']}, {r['standard_within']} | "
            f"{fmt(r['standard_ttft_p50_ms'])} / {fmt(r['standard_ttft_p99_ms'])} | "
            f"{r['rss_mb']:.0f} | {r['in_flight_after']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=240)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import ray
    from ray import serve

    base = serve_embedded("overload")
    rows = []
    try:
        with httpx.Client(base_url=base) as http:
            for _ in range(8):  # warm both tiers (first requests compile and fit the step model)
                for tier in ("small", "quality"):
                    http.post("/v1/completions", json={"model": tier, "prompt": "Hello", "max_tokens": 8}, timeout=300)
            time.sleep(2)
            for _ in range(args.rounds):
                outcomes = asyncio.run(burst(base, args.burst, args.tokens))
                row = summarise(outcomes)
                deadline = time.monotonic() + 60
                while (counts := in_flight(http)) and any(counts.values()) and time.monotonic() < deadline:
                    time.sleep(0.5)
                row["in_flight_after"] = sum(counts.values())
                row["rss_mb"] = ingress_rss_mb("overload")
                rows.append(row)
                print(json.dumps(row, default=str), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    text = table(rows)
    print(text)
    if not args.no_write:
        cpu = f"{platform.machine()}, {psutil.cpu_count()} cores"
        head = (
            f"`.venv/bin/python bench/overload.py --burst {args.burst} --tokens {args.tokens} --rounds {args.rounds}` "
            f"({time.strftime('%Y-%m-%d')}, {cpu}; {args.burst} streamed `auto` chats at once, a third "
            f"interactive, {args.tokens} tokens each):\n\n"
        )
        other = sorted({str(x) for r in rows for x in r["other"]})
        tail = (
            f"\n\nOther statuses: {', '.join(other) or 'none'}. Errors inside admitted streams: "
            + (", ".join(sorted({e for r in rows for e in r["stream_errors"]})) or "none")
            + "."
        )
        replace_section(REPO / "docs" / "reliability.md", "overload", head + text + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
