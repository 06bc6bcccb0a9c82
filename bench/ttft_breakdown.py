"""Where tierserve's time to first token goes: the same request through each hop, in one run.

Starts the embedded app once (configs/local.yaml) and sends identical greedy chat requests,
one at a time, through three entry points, alternating rounds so drift hits all alike:

* tier handle   - DeploymentHandle straight to the tier deployment (engine + one Ray hop)
* ingress handle - DeploymentHandle to the ingress (adds the ingress and its hop to the tier)
* HTTP          - Serve's HTTP proxy (adds HTTP parsing and the proxy's hop to the ingress)

Prints a table and writes docs/benchmarks/ttft-breakdown.md.

    .venv/bin/python bench/ttft_breakdown.py [--rounds 2] [--requests 25]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Why is the sky blue?"
MAX_TOKENS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=25)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    from ray import serve

    from tierserve.actors.types import GenerateRequest, SamplingOptions
    from tierserve.cluster.app import build_application, tier_deployment_name
    from tierserve.cluster.cli import start_ray
    from tierserve.cluster.config import load_config
    from tierserve.cluster.ops import wait_serving
    from tierserve.core.types import ChatMessage

    config = load_config(REPO / "configs" / "local.yaml")
    port = free_port()
    start_ray(config, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(config), name="ttft", route_prefix="/")
    wait_serving(f"http://127.0.0.1:{port}", 60)
    tier = serve.get_deployment_handle(tier_deployment_name(config.tiers[0].name), app_name="ttft").options(stream=True)
    ingress = serve.get_app_handle("ttft").options(stream=True)
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def via_tier(i: int) -> Iterator[object]:
        sampling = SamplingOptions(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        request = GenerateRequest(f"ttft-{i}", sampling, messages=[ChatMessage("user", PROMPT)])
        return iter(tier.generate.remote(request))

    def via_ingress(i: int) -> Iterator[object]:
        return iter(ingress.chat_stream.remote(body))

    def via_http(i: int) -> Iterator[object]:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    yield line

    paths: list[tuple[str, Callable[[int], Iterator[object]]]] = [
        ("tier handle", via_tier),
        ("ingress handle", via_ingress),
        ("HTTP (proxy)", via_http),
    ]
    ttfts: dict[str, list[float]] = {name: [] for name, _ in paths}
    for fn in (f for _, f in paths):  # warm-up
        for _ in fn(-1):
            pass
    n = 0
    for _ in range(args.rounds):
        for name, fn in paths:
            for _ in range(args.requests):
                n += 1
                start = time.perf_counter()
                stream = fn(n)
                next(stream)
                ttfts[name].append(time.perf_counter() - start)
                for _ in stream:
                    pass
    serve.shutdown()

    base = statistics.median(ttfts["tier handle"])
    rows = ["| entry point | TTFT p50 (ms) | TTFT p95 (ms) | p50 added over tier handle (ms) |", "|---|---|---|---|"]
    for name, values in ttfts.items():
        values.sort()
        p50, p95 = statistics.median(values), values[int(0.95 * (len(values) - 1))]
        rows.append(f"| {name} | {p50 * 1e3:.1f} | {p95 * 1e3:.1f} | {(p50 - base) * 1e3:+.1f} |")
    table = "\n".join(rows)
    print(table)
    if not args.no_write:
        doc = REPO / "docs" / "benchmarks" / "ttft-breakdown.md"
        doc.write_text(
            f"# Time to first token by entry point\n\nMeasured by `python bench/ttft_breakdown.py` on "
            f"{time.strftime('%Y-%m-%d')}: the embedded app (configs/local.yaml), one request at a time, "
            f"{args.rounds} rounds x {args.requests} greedy chat requests per entry point, "
            f"{MAX_TOKENS} tokens each.\n\n"
            f"{table}\n"
        )
        print(f"wrote {doc}")


if __name__ == "__main__":
    main()
