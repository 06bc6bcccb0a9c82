"""Overload: a burst of several times what the embedded default can hold, through the real service.

Starts the embedded default (configs/local.yaml: `small` and `quality`, guards and retrieval
on) and sends `--burst` streamed `model: auto` chats at once, a third `interactive` and the rest
`standard`, each asking for `--tokens` tokens (ignore_eos, so every admitted answer is that
long). It records, per request, the status, the time to it, `Retry-After`, and for admitted
ones the time to first token against the class's budget. The burst is repeated `--rounds`
times to see whether the ingress's memory stays flat, and after each round the router's
in-flight counts must be back to zero.

With `--rate`, the overload is an open loop instead, the issue's "4x capacity" as a rate: it
first measures the service's capacity (completed requests per second from `--capacity-clients`
clients sending back to back for `--capacity-s`), then sends Poisson arrivals (seeded) at each
of `--multiples` times that rate for `--duration-s`. A burst asks how fast the front end works
through 240 requests that arrive in the same millisecond; the open loop asks what a caller sees
while offered load stays above capacity.

    .venv/bin/python bench/overload.py [--burst 240] [--tokens 64] [--rounds 3] [--no-write]
    .venv/bin/python bench/overload.py --rate [--variants ...] [--multiples 4] [--duration-s 60] [--seed 0]
    .venv/bin/python bench/overload.py --rate --tier small ...

With `--tier`, every request names that tier, so one engine runs on its core and the HTTP proxy,
the ingress and this load generator have the other core: the front end is not short of CPU, as
on a GPU node, where it has cores of its own.

Prints a table and writes it to docs/reliability.md (section `overload` or `overload-rate`,
with `-TIER` after it for `--tier`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import socket
import sys
import time
from dataclasses import asdict, dataclass
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
    sent_s: float = 0.0
    """When it was sent, from the start of its round."""
    tier: str | None = None
    predicted_ttft_ms: float | None = None
    """What the router predicted for it (the final chunk's `tierserve` field)."""
    tokens: int = 0
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client: httpx.AsyncClient, i: int, tokens: int, model: str = "auto") -> Outcome:
    sla = "interactive" if i % 3 == 0 else "standard"
    body = {
        "model": model,
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
                if event.get("tierserve"):
                    out.tier = event["tierserve"]["tier"]
                    out.predicted_ttft_ms = event["tierserve"]["predicted_ttft_ms"]
                if any(c["delta"].get("content") for c in event.get("choices", [])):
                    out.tokens += 1
                    if out.ttft_ms is None:
                        out.ttft_ms = 1e3 * (time.perf_counter() - started)
            return out
    except httpx.HTTPError as exc:
        return Outcome(sla, -1, 1e3 * (time.perf_counter() - started), error=type(exc).__name__)


def serve_embedded(app_name: str, routing: dict | None = None) -> str:
    """Start Ray and the embedded default (configs/local.yaml, with `routing` options changed)
    as `app_name` on a free local port; return its base URL. The caller shuts Serve and Ray down."""
    from ray import serve

    from tierserve.actors.checkpoints import prepare_embedded
    from tierserve.cluster.app import build_application
    from tierserve.cluster.cli import start_ray
    from tierserve.cluster.config import load_config
    from tierserve.cluster.ops import wait_serving

    prepare_embedded("smollm2-135m-instruct", progress=False)
    config = load_config(REPO / "configs" / "local.yaml")
    config = config.model_copy(update={"routing": config.routing.model_copy(update=routing or {})})
    start_ray(config.model_copy(update={"ray": config.ray.model_copy(update={"num_cpus": 8})}), log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(config), name=app_name, route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_serving(base, 60)
    return base


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


async def burst(base: str, n: int, tokens: int, model: str) -> list[Outcome]:
    async with client_for(base, n + 8) as client:
        return list(await asyncio.gather(*(one(client, i, tokens, model) for i in range(n))))


def client_for(base: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base, timeout=600, limits=limits)


async def capacity(base: str, clients: int, duration_s: float, tokens: int, model: str) -> float:
    """Completed requests per second with `clients` sending back to back (a closed loop, so the
    service is never offered more than it holds): the answers that end in the last three
    quarters of `duration_s` (the first quarter holds the clients' first answers)."""
    done: list[float] = []
    stop = time.perf_counter() + duration_s

    async def client(c: httpx.AsyncClient, k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            out = await one(c, 3 * i + 1, tokens, model)  # standard: i % 3 != 0
            if out.status == 200 and out.tokens:
                done.append(time.perf_counter())
            i += clients

    async with client_for(base, clients + 8) as c:
        started = time.perf_counter()
        await asyncio.gather(*(client(c, k) for k in range(clients)))
    # Answers still running at `stop` end after it: counting them would add up to `clients`.
    counted = [t for t in done if started + duration_s / 4 <= t < stop]
    return len(counted) / (0.75 * duration_s)


async def open_loop(base: str, rate: float, duration_s: float, tokens: int, seed: int, model: str) -> list[Outcome]:
    """Poisson arrivals at `rate` per second for `duration_s`, each sent when it arrives
    whatever the service is doing (an open loop); every outcome, once all have ended."""
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration_s:
        arrivals.append(t)
        t += rng.expovariate(rate)
    async with client_for(base, len(arrivals) + 8) as c:
        started = time.perf_counter()
        tasks = []
        for i, at in enumerate(arrivals):
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(c, i, tokens, model)))
        outcomes = list(await asyncio.gather(*tasks))
    for out, at in zip(outcomes, arrivals):
        out.sent_s = at
    return outcomes


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
        "ttft_over_predicted_p50": quantile(
            [o.ttft_ms / o.predicted_ttft_ms for o in admitted if o.ttft_ms and o.predicted_ttft_ms], 0.5
        ),
    }
    for sla, budget in BUDGET_TTFT_MS.items():
        mine = [o for o in admitted if o.sla_class == sla and o.ttft_ms is not None]
        row[f"{sla}_admitted"] = len(mine)
        row[f"{sla}_ttft_p50_ms"] = quantile([o.ttft_ms for o in mine], 0.5)
        row[f"{sla}_ttft_p99_ms"] = quantile([o.ttft_ms for o in mine], 0.99)
        row[f"{sla}_within"] = sum(1 for o in mine if o.ttft_ms <= budget)
    return row


def table(rows: list[dict], first: str = "round") -> str:
    """One line a row; `first` names the column that tells rows apart (its value: `label`)."""
    lines = [
        f"| {first} | sent | admitted | shed (429/503) | with Retry-After | shed p50 / p99 ms "
        "| interactive admitted, within 1 s TTFT | its TTFT p50 / p99 ms | standard admitted, within 3 s "
        "| its TTFT p50 / p99 ms | TTFT / predicted, p50 | ingress RSS MB | in flight after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['sent']} | {r['admitted']} | {r['shed']} | {r['shed_with_retry_after']} | "
            f"{fmt(r['shed_p50_ms'])} / {fmt(r['shed_p99_ms'])} | "
            f"{r['interactive_admitted']}, {r['interactive_within']} | "
            f"{fmt(r['interactive_ttft_p50_ms'])} / {fmt(r['interactive_ttft_p99_ms'])} | "
            f"{r['standard_admitted']}, {r['standard_within']} | "
            f"{fmt(r['standard_ttft_p50_ms'])} / {fmt(r['standard_ttft_p99_ms'])} | "
            f"{fmt(r['ttft_over_predicted_p50'], 2)} | "
            f"{r['rss_mb']:.0f} | {r['in_flight_after']} |"
        )
    return "\n".join(lines)


def settle(http: httpx.Client, row: dict) -> dict:
    """Wait (up to 60 s) for the router's in-flight counts to reach zero; record them and the
    ingress's memory on `row`."""
    deadline = time.monotonic() + 60
    while (counts := in_flight(http)) and any(counts.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    row["in_flight_after"] = sum(counts.values())
    row["rss_mb"] = ingress_rss_mb("overload")
    print(json.dumps(row, default=str), flush=True)
    return row


VARIANTS = {
    "shipped": {},
    "shed past 1x budget": {"shed_over_budget": 1.0},
    "no TTFT feedback": {"ttft_feedback": False},
    "shed past 3x budget": {"shed_over_budget": 3.0},
    "neither": {"ttft_feedback": False, "shed_over_budget": 3.0},
}
"""Routing options changed from configs/local.yaml's (TTFT feedback on, shed past 0.8x budget),
by name; `neither` is the embedded default before 2026-12-07."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=240)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", action="store_true", help="open-loop arrivals at multiples of capacity")
    parser.add_argument("--multiples", default="4", help="offered load, as multiples of measured capacity")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--capacity-clients", type=int, default=16)
    parser.add_argument("--capacity-s", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), help="with --rate, default: all; else: shipped"
    )
    parser.add_argument(
        "--tier", help="every request names this tier (one engine runs, the other core is left to the front end)"
    )
    parser.add_argument("--outcomes", type=Path, help="also write every request's outcome here (JSON lines)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    variants = args.variants or (list(VARIANTS) if args.rate else ["shipped"])
    model = args.tier or "auto"

    import ray
    from ray import serve

    rows = []
    served = None
    for variant in variants:
        base = serve_embedded("overload", VARIANTS[variant])
        prefix = "" if len(variants) == 1 else f"{variant}, "
        try:
            with httpx.Client(base_url=base) as http:
                for _ in range(8):  # warm both tiers (first requests compile and fit the step model)
                    for tier in ("small", "quality"):
                        body = {"model": tier, "prompt": "Hello", "max_tokens": 8}
                        http.post("/v1/completions", json=body, timeout=300)
                time.sleep(2)

                def record(outcomes: list[Outcome], label: str) -> None:
                    if args.outcomes is not None:
                        with args.outcomes.open("a") as f:
                            f.writelines(json.dumps({"round": label, **asdict(o)}) + "\n" for o in outcomes)
                    row = summarise(outcomes)
                    row["label"] = label
                    rows.append(settle(http, row))

                if args.rate:
                    # Every variant runs the closed loop (it also warms the router's fits); the
                    # offered load is the first variant's capacity, so all see the same arrivals.
                    measured = asyncio.run(capacity(base, args.capacity_clients, args.capacity_s, args.tokens, model))
                    settle(http, {"variant": variant, "capacity_rps": measured})
                    served = served or measured
                    for k, multiple in enumerate(float(m) for m in args.multiples.split(",")):
                        arrivals = open_loop(
                            base, multiple * served, args.duration_s, args.tokens, args.seed + k, model
                        )
                        record(asyncio.run(arrivals), f"{prefix}{multiple:g}x ({multiple * served:.1f}/s)")
                else:
                    for i in range(args.rounds):
                        record(asyncio.run(burst(base, args.burst, args.tokens, model)), f"{prefix}{i + 1}")
        finally:
            serve.shutdown()
            ray.shutdown()

    first = "offered load" if args.rate else "round"
    text = table(rows, first if len(variants) == 1 else f"variant, {first}")
    print(text)
    if not args.no_write:
        cpu = f"{platform.machine()}, {psutil.cpu_count()} cores"
        suffix = f"-{args.tier}" if args.tier else ""
        tier = f" --tier {args.tier}" if args.tier else ""
        asked = f"chats for `{args.tier}` (one engine runs)" if args.tier else "`auto` chats"
        if args.rate:
            section = "overload-rate" + suffix
            named = " ".join(f'"{v}"' for v in variants)
            head = (
                f"`.venv/bin/python bench/overload.py --rate --variants {named} "
                f"--multiples {args.multiples} --duration-s {args.duration_s:g} --tokens {args.tokens} "
                f"--seed {args.seed}{tier}` "
                f"({time.strftime('%Y-%m-%d')}, {cpu}; capacity "
                f"{served:.2f} completed requests/s with {args.capacity_clients} clients back to back; then Poisson "
                f"arrivals of streamed {asked} for {args.duration_s:g} s at each multiple of it, a third "
                f"interactive, {args.tokens} tokens each):\n\n"
            )
        else:
            section = "overload" + suffix
            head = (
                f"`.venv/bin/python bench/overload.py --burst {args.burst} --tokens {args.tokens} "
                f"--rounds {args.rounds}{tier}` "
                f"({time.strftime('%Y-%m-%d')}, {cpu}; {args.burst} streamed {asked} at once, a third "
                f"interactive, {args.tokens} tokens each):\n\n"
            )
        other = sorted({str(x) for r in rows for x in r["other"]})
        tail = (
            f"\n\nOther statuses: {', '.join(other) or 'none'}. Errors inside admitted streams: "
            + (", ".join(sorted({e for r in rows for e in r["stream_errors"]})) or "none")
            + "."
        )
        replace_section(REPO / "docs" / "reliability.md", section, head + text + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
