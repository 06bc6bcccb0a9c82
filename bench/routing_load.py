"""Load test of the SLA router: mixed SLA classes, the fast tier alone against the router.

The embedded default (configs/local.yaml: tiers `small` and `quality`, one core each) runs in
one Ray Serve app. A seeded open-loop (Poisson) stream of chat requests, drawn from the held-out
labelled prompts of configs/complexity/prompts.jsonl, each with an SLA class
(interactive / standard / batch, with that class's answer length), is offered at each rate
twice, back to back with the same arrivals: all to `small` (the single-tier baseline) and as
`model: auto` (the router spreads it by complexity, budget and load, and sheds what no tier can
take). The highest rate each keeps >= 95% of requests within budget is what it sustains; the
issue's goal is the router holding that at twice what the fast tier alone sustains.

A request meets its SLO when it succeeds with time to first token and time per output token
(both measured by the client) within its class's budget; a shed (429) or failed request does
not. The series runs once per engine scheduling policy (`--policies`, default fcfs then priority,
the shipped one). Prints a table and writes docs/benchmarks/routing-load.md.

    .venv/bin/python bench/routing_load.py [--rates 3,5,7,9] [--duration-s 60] [--policies fcfs,priority]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CLASSES = [  # (class, share of requests, max_tokens)
    ("interactive", 0.4, 32),
    ("standard", 0.4, 64),
    ("batch", 0.2, 128),
]


@dataclass
class Outcome:
    sla_class: str
    status: int
    tier: str = ""
    reason: str = ""
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    met: bool = False
    missed: str = ""
    """What missed: ttft, tpot, or both; empty when met or when the request failed."""


@dataclass
class Run:
    label: str
    model: str
    rate: float
    outcomes: list[Outcome]
    wall_s: float

    def share(self, pred, of=None) -> float:
        pool = [o for o in self.outcomes if of is None or o.sla_class == of]
        return sum(1 for o in pool if pred(o)) / len(pool) if pool else float("nan")

    @property
    def met(self) -> float:
        return self.share(lambda o: o.met)

    def q(self, attr: str, p: float) -> float:
        values = sorted(getattr(o, attr) for o in self.outcomes if getattr(o, attr) is not None)
        return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def workload(seed: int, rate: float, duration_s: float) -> list[tuple[float, str, str, int]]:
    """(arrival offset s, prompt, SLA class, max_tokens) for a Poisson stream of `rate` req/s."""
    from tierserve.router.complexity import load_prompts

    prompts = [p.text for p in load_prompts(split="heldout")]
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        name, _, max_tokens = rng.choices(CLASSES, weights=[c[1] for c in CLASSES])[0]
        out.append((t, rng.choice(prompts), name, max_tokens))


async def one(client: httpx.AsyncClient, model: str, prompt: str, sla_class: str, max_tokens: int, budgets) -> Outcome:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "sla_class": sla_class,
    }
    start = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(sla_class, r.status_code)
            out = Outcome(
                sla_class, 200, r.headers.get("x-tierserve-tier", ""), r.headers.get("x-tierserve-route-reason", "")
            )
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out.status = 500
                    return out
                if event.get("choices") and event["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError:
        return Outcome(sla_class, 599)
    out.ttft_ms = 1e3 * (first - start) if first else None
    out.tpot_ms = 1e3 * (last - first) / (tokens - 1) if first and tokens > 1 else None
    ttft_budget, tpot_budget = budgets[sla_class]
    late_first = out.ttft_ms is None or (ttft_budget is not None and out.ttft_ms > ttft_budget)
    slow = tpot_budget is not None and out.tpot_ms is not None and out.tpot_ms > tpot_budget
    out.met = not late_first and not slow
    out.missed = "both" if late_first and slow else "ttft" if late_first else "tpot" if slow else ""
    return out


async def drive(base: str, label: str, model: str, rate: float, duration_s: float, seed: int, budgets) -> Run:
    arrivals = workload(seed, rate, duration_s)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def at(offset: float, prompt: str, sla_class: str, max_tokens: int) -> Outcome:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            return await one(client, model, prompt, sla_class, max_tokens, budgets)

        outcomes = await asyncio.gather(*(at(*a) for a in arrivals))
    run = Run(label, model, rate, list(outcomes), time.perf_counter() - start)
    tiers = Counter(o.tier for o in run.outcomes if o.status == 200)
    print(
        f"  {label:28s} {rate:5.2f} req/s  n={len(run.outcomes):4d}  met {run.met:6.1%}  "
        f"429 {run.share(lambda o: o.status == 429):5.1%}  TTFT p50 {run.q('ttft_ms', 0.5):7.0f} ms  "
        f"tiers {dict(tiers)}",
        flush=True,
    )
    return run


def start_ray_and_serve() -> tuple[str, object]:
    from ray import serve

    from tierserve.actors.checkpoints import prepare_embedded
    from tierserve.cluster.cli import start_ray
    from tierserve.cluster.config import load_config

    prepare_embedded("smollm2-135m-instruct")
    config = load_config()
    config = config.model_copy(update={"ray": config.ray.model_copy(update={"metrics_export_port": None})})
    start_ray(config, log_to_driver=False)
    from serving import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}", config


def deploy(base: str, config, policy: str) -> None:
    """The app with every tier's engine on `policy` (vLLM `scheduling_policy`) at `base`;
    replaces the running one (its tiers restart)."""
    from ray import serve

    from tierserve.cluster.app import build_application
    from tierserve.cluster.ops import wait_serving

    tiers = [t.model_copy(update={"engine": {**t.engine, "scheduling_policy": policy}}) for t in config.tiers]
    serve.run(build_application(config.model_copy(update={"tiers": tiers})), name="tierserve", route_prefix="/")
    wait_serving(base, 60)


def table(runs: list[Run]) -> str:
    lines = [
        "| run | sent to | rate req/s | requests | SLO met | interactive | standard | batch | missed TTFT "
        "| missed TPOT | shed (429) | failed | TTFT p50 / p95 ms | TPOT p50 / p95 ms | served by |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        tiers = Counter(o.tier for o in r.outcomes if o.status == 200)
        split = ", ".join(f"{t} {n / len(r.outcomes):.0%}" for t, n in sorted(tiers.items()))
        per_class = " | ".join(f"{r.share(lambda o: o.met, c):.1%}" for c, _, _ in CLASSES)
        lines.append(
            f"| {r.label} | `{r.model}` | {r.rate:.2f} | {len(r.outcomes)} | **{r.met:.1%}** | {per_class} | "
            f"{r.share(lambda o: o.missed in ('ttft', 'both')):.1%} | "
            f"{r.share(lambda o: o.missed in ('tpot', 'both')):.1%} | "
            f"{r.share(lambda o: o.status == 429):.1%} | {r.share(lambda o: o.status not in (200, 429)):.1%} | "
            f"{r.q('ttft_ms', 0.5):.0f} / {r.q('ttft_ms', 0.95):.0f} | "
            f"{r.q('tpot_ms', 0.5):.1f} / {r.q('tpot_ms', 0.95):.1f} | {split} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="3,5,7,9", help="offered loads, req/s, ascending")
    p.add_argument("--duration-s", type=float, default=60, help="seconds of load per rate and variant")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--policies",
        default="fcfs,priority",
        help="engine scheduling policies to run (each a redeploy): fcfs ignores the SLA classes' "
        "priorities, priority (as shipped) serves the most urgent class waiting first",
    )
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    sys.path.insert(0, str(REPO / "bench"))
    base, config = start_ray_and_serve()
    budgets = {name: (c.ttft_ms, c.tpot_ms) for name, c in config.routing.sla_classes.items()}
    runs: list[Run] = []

    async def measure(policy: str) -> None:
        print(f"engines scheduling {policy}; warm-up", flush=True)
        await drive(base, "warm-up", "auto", 1.0, 10, args.seed + 99, budgets)
        # Side by side at each rate, the same arrivals: all to the fast tier, then as `auto`.
        for rate in (float(r) for r in args.rates.split(",")):
            seconds = args.duration_s
            runs.append(await drive(base, f"small alone, {policy}", "small", rate, seconds, args.seed, budgets))
            runs.append(await drive(base, f"router (auto), {policy}", "auto", rate, seconds, args.seed, budgets))

    for policy in args.policies.split(","):
        deploy(base, config, policy)
        asyncio.run(measure(policy))
    text = table(runs)
    print(text)
    if not args.no_write:
        write_doc(text, args, config, runs)


def sustained(runs: list[Run], label: str) -> float | None:
    """The highest rate at which `label` kept >= 95% within budget, if it did at all."""
    ok = [r.rate for r in runs if r.label == label and r.met >= 0.95]
    return max(ok) if ok else None


def write_doc(text: str, args: argparse.Namespace, config, runs: list[Run]) -> None:
    classes = ", ".join(
        f"{name} (TTFT <= {c.ttft_ms:g} ms, TPOT <= {c.tpot_ms:g} ms)" if c.ttft_ms else f"{name} (no budget)"
        for name, c in config.routing.sla_classes.items()
    )
    mix = ", ".join(f"{name} {share:.0%} with max_tokens {mt}" for name, share, mt in CLASSES)

    def said(rate: float | None) -> str:
        return f"{rate:g} req/s" if rate is not None else "none of the rates"

    held = "; ".join(
        f"engines {policy}: small alone {said(sustained(runs, f'small alone, {policy}'))}, "
        f"the router {said(sustained(runs, f'router (auto), {policy}'))}"
        for policy in args.policies.split(",")
    )

    command = (
        f".venv/bin/python bench/routing_load.py --rates {args.rates} --duration-s {args.duration_s:g} "
        f"--policies {args.policies}"
    )
    doc = f"""# Router load test

Command: `{command}`
({time.strftime("%Y-%m-%d")}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, one run).

The embedded default (configs/local.yaml): tiers `small` and `quality`, the same SmolLM2-135M on
one core each, and the router's settings as shipped. Open-loop Poisson arrivals of held-out
labelled prompts (configs/complexity/prompts.jsonl), greedy, `ignore_eos`. Mix: {mix}.
SLA classes: {classes}. A request meets its SLO if it succeeds within its class's TTFT and TPOT
budgets, measured by the client; shed and failed requests do not. At each rate the same
arrivals go twice, back to back: all to `small` (the single-tier baseline), then as `model: auto`.
The whole series runs once per engine scheduling policy (`{args.policies}`, the app redeployed
between): `fcfs` serves each engine's queue in arrival order; `priority` (as shipped) gives a
free slot to the waiting request of the most urgent SLA class (interactive 0, standard 1,
batch 2), and the router's queue predictions count only the requests that go ahead.

{text}

Kept >= 95% within budget up to ({held}), of the rates tried. The load generator runs on the
same two cores as both engines and the Serve processes; runs on this machine vary by tens of
percent from one run to the next, so compare rows of one rate within this run.
"""
    path = REPO / "docs" / "benchmarks" / "routing-load.md"
    path.write_text(doc)
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
