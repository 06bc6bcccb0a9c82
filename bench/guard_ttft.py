"""What the input guards add to time to first token, through the real service, in one run.

Starts three Serve apps from configs/local.yaml, each with its own `small` tier (SmolLM2-135M,
one core) and its own ingress, differing only in the guards on input:

* none        - safety off
* sequential  - the embedded default's input guards (PII redact, then the injection classifier,
                block at 0.6), all before the request goes to the tier
                (`safety.overlap_input_checks: false`)
* overlapped  - the same guards; the injection guard checks while the tier prefills, and the
                first token waits for it (`overlap_input_checks: true`, the default)

Only input is guarded (no output redaction, no retrieval), so the difference is the input
guards' alone. Each request is a streamed chat whose user turn is about 1 KB of ordinary prose
with personal data in it (a different opening per request, so vLLM's prefix cache does not
shorten prefill), greedy, 8 tokens. Requests go one at a time, rotating over the apps, so drift
hits all three alike. TTFT is measured by the client: request sent to first content chunk.

    .venv/bin/python bench/guard_ttft.py [--requests 40] [--no-write]

Prints a table and writes docs/benchmarks/guard-ttft.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from safety import KB_TEXT  # noqa: E402  (bench/safety.py's 1 KB text)

VARIANTS = {
    "none": None,
    "sequential": False,
    "overlapped": True,
}
"""Variant -> `overlap_input_checks` (None: safety off)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt(i: int) -> str:
    """About 1 KB: a distinct opening, then the shared letter, cut to 1024 characters."""
    return (f"Note {i} of {i * 7 + 3}. Please summarise this message in one line. " + KB_TEXT * 2)[:1024]


def app_config(base, overlap: bool | None):
    tier = base.tiers[0]
    update = {"tiers": [tier], "rag": base.rag.model_copy(update={"enabled": False})}
    if overlap is None:
        update["safety"] = base.safety.model_copy(update={"enabled": False})
    else:
        guards = []
        for g in base.safety.guards:  # input only: the embedded default's actions there
            if "input" in g.actions:
                guards.append(g.model_copy(update={"actions": {"input": g.actions["input"]}}))
        update["safety"] = base.safety.model_copy(update={"guards": guards, "overlap_input_checks": overlap})
    routing = base.routing.model_copy(update={"tiers": {}})
    update["routing"] = routing
    update["ingress"] = base.ingress.model_copy(update={"default_tier": tier.name})
    return base.model_copy(update=update)


def ttft_ms(client: httpx.Client, url: str, text: str) -> float:
    body = {
        "model": "small",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: ") :])
                if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                    return 1e3 * (time.perf_counter() - started)
    raise RuntimeError(f"{url}: no content")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=40, help="per variant")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    from ray import serve

    from tierserve.actors.checkpoints import prepare_embedded
    from tierserve.cluster.app import build_application
    from tierserve.cluster.cli import start_ray
    from tierserve.cluster.config import load_config
    from tierserve.cluster.ops import wait_serving

    base = load_config(REPO / "configs" / "local.yaml")
    prepare_embedded("smollm2-135m-instruct", progress=False)
    port = free_port()
    start_ray(base.model_copy(update={"ray": base.ray.model_copy(update={"num_cpus": 8})}), log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, overlap in VARIANTS.items():
        print(f"starting {name} ...", flush=True)
        serve.run(build_application(app_config(base, overlap)), name=f"guards-{name}", route_prefix=f"/{name}")
        wait_serving(f"http://127.0.0.1:{port}/{name}", 60)

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        for i in range(3):  # warm each app's path
            for name in names:
                ttft_ms(client, f"/{name}/v1/chat/completions", prompt(10_000 + i))
        for i in range(args.requests):
            for name in names[i % 3 :] + names[: i % 3]:
                times[name].append(ttft_ms(client, f"/{name}/v1/chat/completions", prompt(i)))
    serve.shutdown()

    p50 = {name: statistics.median(ts) for name, ts in times.items()}
    lines = [
        "| input guards | requests | TTFT p50 (ms) | TTFT p90 (ms) | added to p50 vs none (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, ts in times.items():
        p90 = statistics.quantiles(ts, n=10)[-1]
        lines.append(f"| {name} | {len(ts)} | {p50[name]:.1f} | {p90:.1f} | {p50[name] - p50['none']:+.1f} |")
    body = "\n".join(lines)
    print(body)
    if args.no_write:
        return 0
    import torch

    header = f"""# Input guards and time to first token

Written by `bench/guard_ttft.py` (`.venv/bin/python bench/guard_ttft.py --requests {args.requests}`); one run
on {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}.
How it is measured is in the script's docstring: three apps of one SmolLM2-135M tier each, streamed chats
with a 1 KB user turn, one at a time, rotating over the apps; TTFT from the client.

"""
    (REPO / "docs" / "benchmarks" / "guard-ttft.md").write_text(header + body + "\n")
    print("written to docs/benchmarks/guard-ttft.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
