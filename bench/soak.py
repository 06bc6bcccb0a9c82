"""Soak: mixed traffic through the real service for a long while; resources must stay flat.

Starts the embedded default (configs/local.yaml: `small` and `quality`, guards and retrieval
on) and keeps `--concurrency` clients busy for `--minutes` with a seeded mix of what callers
send: streamed `auto` chats of both SLA classes, whole completions on each tier, chats with
retrieval, chats carrying personal data, streams the client drops after two tokens, malformed
requests and the read-only endpoints. Every `--sample-s` it records each Serve process's
resident memory and open file descriptors (a tier's engine-core process counted with its
replica), each engine's KV-cache use and the router's in-flight count. At the end it drains,
then checks the KV caches and in-flight counts are back to zero.

With `--heap-profile`, Python's `tracemalloc` runs inside the ingress and retriever replicas
(started through Ray's `__ray_call__`, so the product carries no profiling code): a snapshot at
minute 5 and one once drained, compared line by line, say which allocations grew; then
`malloc_trim(0)` in every replica says how much of the resident growth was memory the C
allocator held free rather than memory in use. tracemalloc slows allocation, so figures from a
profiled run are for the heap, not for throughput.

    .venv/bin/python bench/soak.py [--minutes 30] [--concurrency 4] [--sample-s 60] [--seed 0]
        [--heap-profile] [--no-write]

Prints a table and writes it to docs/reliability.md (section `soak`, or `soak-heap` with
`--heap-profile`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import platform
import random
import sys
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overload import serve_embedded  # noqa: E402
from report import replace_section  # noqa: E402

APP = "soak"
TOPICS = ["rivers", "bridges", "tea", "trains", "volcanoes", "libraries", "bees", "clocks"]
PII = "My e-mail is jane.doe@example.com and my card is 4111 1111 1111 1111; "
HI = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
MALFORMED: list[tuple[str, object]] = [
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", {**HI, "min_tokens": 9, "max_tokens": 2}),
    ("/v1/chat/completions", {**HI, "messages": [{"role": "user", "content": "\ud800"}]}),
    ("/v1/completions", {"model": "small", "prompt": ""}),
    ("/v1/chat/completions", {**HI, "stop": ["x"] * 40}),
    ("/v1/chat/completions", {**HI, "temperature": 1e999}),
    ("/v1/chat/completions", {**HI, "model": "no-such-tier"}),
    ("/v1/chat/completions", {**HI, "retrieval": {"index": "../x"}}),
]
KINDS = ["stream", "stream", "stream", "complete", "complete", "rag", "rag", "pii", "drop", "malformed", "read"]


def chat(rng: random.Random, prefix: str = "") -> dict:
    topic = rng.choice(TOPICS)
    return {
        "model": "auto",
        "messages": [{"role": "user", "content": f"{prefix}Write two sentences about {topic}."}],
        "max_tokens": 32,
        "sla_class": rng.choice(["interactive", "standard"]),
    }


def error_code(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "(no OpenAI error body)"


def outcome(r: httpx.Response) -> str:
    """The status, and the error's code for anything but a 200 (`400 invalid_request`)."""
    return "200" if r.status_code == 200 else f"{r.status_code} {error_code(r.content)}"


async def one(client: httpx.AsyncClient, rng: random.Random, counts: collections.Counter) -> None:
    kind = rng.choice(KINDS)
    try:
        if kind in ("stream", "drop", "pii"):
            body = {**chat(rng, PII if kind == "pii" else ""), "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    counts[f"{r.status_code} {error_code(await r.aread())}"] += 1
                    return
                seen = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        seen += 1
                        if "error" in json.loads(line[6:]):
                            counts[f"{kind} stream error"] += 1
                    if kind == "drop" and seen >= 2:
                        break  # leaving the block closes the connection mid-stream
                status = "200"
        elif kind == "complete":
            tier, topic = rng.choice(["small", "quality"]), rng.choice(TOPICS)
            body = {"model": tier, "prompt": f"A note on {topic}:", "max_tokens": 24}
            status = outcome(await client.post("/v1/completions", json=body))
        elif kind == "rag":
            question = [{"role": "user", "content": "How does tierserve pick a tier?"}]
            body = {**chat(rng), "messages": question, "retrieval": True}
            status = outcome(await client.post("/v1/chat/completions", json=body))
        elif kind == "malformed":
            path, body = rng.choice(MALFORMED)
            if isinstance(body, bytes):
                r = await client.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = await client.post(
                    path,
                    content=json.dumps(body).encode("utf-8", "surrogatepass"),
                    headers={"content-type": "application/json"},
                )
            status = outcome(r)
        else:
            status = outcome(await client.get(rng.choice(["/v1/models", "/v1/tiers", "/health", "/v1/indexes"])))
    except httpx.HTTPError as exc:
        counts[f"client {type(exc).__name__}"] += 1
        return
    counts[status] += 1


async def clients(base: str, n: int, seconds: float, seed: int, counts: collections.Counter) -> None:
    async def loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=base, timeout=300) as client:
            while time.monotonic() < end:
                await one(client, rng, counts)

    end = time.monotonic() + seconds
    await asyncio.gather(*(loop(i) for i in range(n)))


def processes() -> dict[str, list[psutil.Process]]:
    """Serve's processes by role; a replica's children (a tier's engine core) count with it."""
    out: dict[str, list[psutil.Process]] = {}
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if f"ServeReplica:{APP}:" in line:
            # The title names the method the replica runs: `ServeReplica:APP:ingress.handle_request`.
            role = line.split(f"ServeReplica:{APP}:", 1)[1].split()[0].split(".")[0]
        elif "ProxyActor" in line:
            role = "http-proxy"
        elif "ServeController" in line:
            role = "controller"
        else:
            continue
        try:
            out[role] = [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return out


def measure(procs: dict[str, list[psutil.Process]]) -> dict[str, tuple[float, int]]:
    out = {}
    for role, group in procs.items():
        rss, fds = 0, 0
        for p in group:
            try:
                rss += p.memory_info().rss
                fds += p.num_fds()
            except psutil.NoSuchProcess:
                pass
        out[role] = (rss / 2**20, fds)
    return out


def tier_view(http: httpx.Client) -> dict[str, tuple[float, int]]:
    """Each tier's KV-cache use (percent) and the router's in-flight count."""
    tiers = http.get("/v1/tiers", timeout=60).json()["data"]
    return {
        t["name"]: (100 * t.get("stats", {}).get("kv_cache_usage", float("nan")), t["router"]["in_flight"])
        for t in tiers
    }


HEAP_ROLES = ("ingress", "retriever")
HEAP_DIR = Path("/tmp/tierserve-soak-heap")  # replicas and this script share the machine


def replicas() -> dict[str, object]:
    """The app's replica actors by deployment name (Serve names them
    `SERVE_REPLICA::APP#DEPLOYMENT#ID`)."""
    import ray

    out = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        parts = actor["name"].split("#")
        if parts[0] == f"SERVE_REPLICA::{APP}" and len(parts) == 3:
            out[parts[1]] = ray.get_actor(actor["name"], namespace=actor["namespace"])
    return out


def _trace_start(_replica: object, frames: int) -> None:
    import tracemalloc

    tracemalloc.start(frames)


def _trace_snapshot(_replica: object, path: str) -> int:
    """Dump a snapshot; return the bytes tracemalloc sees in use."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.take_snapshot().dump(path)
    return tracemalloc.get_traced_memory()[0]


def _trim(_replica: object) -> tuple[int, int]:
    """Resident bytes before and after glibc hands its free memory back to the system."""
    import ctypes

    import psutil

    before = psutil.Process().memory_info().rss
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return before, psutil.Process().memory_info().rss


def heap_snapshots(actors: dict[str, object], tag: str) -> dict[str, int]:
    import ray

    HEAP_DIR.mkdir(exist_ok=True)
    refs = {r: actors[r].__ray_call__.remote(_trace_snapshot, str(HEAP_DIR / f"{r}-{tag}.bin")) for r in HEAP_ROLES}
    return {r: ray.get(ref, timeout=300) for r, ref in refs.items()}


def heap_report(traced: dict[str, dict[str, int]], trims: dict[str, tuple[int, int]], minute: int, top: int = 8) -> str:
    """What grew between the two snapshots (the first at `minute`), by source line, and what
    malloc_trim gave back."""
    import tracemalloc

    lines = [
        f"| replica | Python heap at minute {minute} / drained MB | resident before / after malloc_trim MB |",
        "|---|---|---|",
    ]
    for r in sorted(trims):
        heap = f"{traced['base'][r] / 2**20:.1f} / {traced['end'][r] / 2**20:.1f}" if r in traced["base"] else "-"
        lines.append(f"| {r} | {heap} | {trims[r][0] / 2**20:.0f} / {trims[r][1] / 2**20:.0f} |")
    ignore = [tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"), tracemalloc.Filter(False, "*tracemalloc*")]
    for r in HEAP_ROLES:
        before = tracemalloc.Snapshot.load(str(HEAP_DIR / f"{r}-base.bin")).filter_traces(ignore)
        after = tracemalloc.Snapshot.load(str(HEAP_DIR / f"{r}-end.bin")).filter_traces(ignore)
        stats = after.compare_to(before, "lineno")
        lines += ["", f"{r}: largest growth by line, minute {minute} to drained", ""]
        lines += ["| line | KB | blocks |", "|---|---|---|"]
        for st in stats[:top]:
            frame = st.traceback[0]
            where = f"{'/'.join(Path(frame.filename).parts[-3:])}:{frame.lineno}"
            lines.append(f"| `{where}` | {st.size_diff / 1024:+.0f} | {st.count_diff:+d} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sample-s", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heap-profile", action="store_true", help="tracemalloc in the ingress and retriever")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import ray
    from ray import serve

    base = serve_embedded(APP)
    counts: collections.Counter = collections.Counter()
    samples: list[dict] = []
    try:
        with httpx.Client(base_url=base) as http:
            for tier in ("small", "quality"):  # warm both tiers before the first sample
                http.post("/v1/completions", json={"model": tier, "prompt": "Hello", "max_tokens": 8}, timeout=300)
            procs = processes()
            actors = replicas() if args.heap_profile else {}
            traced: dict[str, dict[str, int]] = {"base": {}, "end": {}}
            heap_from = min(5, args.minutes / 2)  # the minute of the first snapshot
            if actors:
                ray.get([actors[r].__ray_call__.remote(_trace_start, 8) for r in HEAP_ROLES])
            started = time.monotonic()

            async def run() -> None:
                traffic = asyncio.create_task(clients(base, args.concurrency, 60 * args.minutes, args.seed, counts))
                while not traffic.done():
                    sample = {"minute": (time.monotonic() - started) / 60, "requests": sum(counts.values())}
                    if actors and not traced["base"] and sample["minute"] >= heap_from:
                        traced["base"] = await asyncio.to_thread(heap_snapshots, actors, "base")
                    sample["procs"] = measure(procs)
                    sample["tiers"] = await asyncio.to_thread(tier_view, http)
                    samples.append(sample)
                    print(json.dumps(sample), flush=True)
                    await asyncio.wait({traffic}, timeout=args.sample_s)
                await traffic

            asyncio.run(run())
            deadline = time.monotonic() + 60
            view = tier_view(http)
            while any(n for _, n in view.values()) and time.monotonic() < deadline:
                time.sleep(0.5)
                view = tier_view(http)
            final = {
                "minute": (time.monotonic() - started) / 60,
                "requests": sum(counts.values()),
                "procs": measure(procs),
                "tiers": view,
                "drained": True,
            }
            samples.append(final)
            print(json.dumps(final), flush=True)
            if actors:
                traced["end"] = heap_snapshots(actors, "end")
                trims = {r: ray.get(a.__ray_call__.remote(_trim), timeout=300) for r, a in actors.items()}
    finally:
        serve.shutdown()
        ray.shutdown()

    text = report(samples, counts)
    if actors:
        base_minute = next(s["minute"] for s in samples if s["minute"] >= heap_from)
        text += "\n\n" + heap_report(traced, trims, round(base_minute))
    print(text)
    if not args.no_write:
        cpu = f"{platform.machine()}, {psutil.cpu_count()} cores"
        head = (
            f"`.venv/bin/python bench/soak.py --minutes {args.minutes:g} --concurrency {args.concurrency} "
            f"--sample-s {args.sample_s:g}{' --heap-profile' if actors else ''} --seed {args.seed}` "
            f"({time.strftime('%Y-%m-%d')}, {cpu}; {args.concurrency} clients sending the mix without pause):\n\n"
        )
        replace_section(REPO / "docs" / "reliability.md", "soak-heap" if actors else "soak", head + text)
    return 0


def report(samples: list[dict], counts: collections.Counter) -> str:
    roles = sorted({r for s in samples for r in s["procs"]})
    tiers = sorted({t for s in samples for t in s["tiers"]})
    lines = [
        "| minute | requests | "
        + " | ".join(f"{r} RSS MB / fds" for r in roles)
        + " | "
        + " | ".join(f"{t} KV % / in flight" for t in tiers)
        + " |",
        "|---" * (2 + len(roles) + len(tiers)) + "|",
    ]
    step = max(1, (len(samples) - 1) // 10)
    shown = [s for i, s in enumerate(samples[:-1]) if i % step == 0] + [samples[-1]]
    for s in shown:
        minute = f"{s['minute']:.1f}" + (" (drained)" if s.get("drained") else "")
        procs = " | ".join(f"{s['procs'][r][0]:.0f} / {s['procs'][r][1]}" if r in s["procs"] else "-" for r in roles)
        kv = " | ".join(f"{s['tiers'][t][0]:.1f} / {s['tiers'][t][1]}" if t in s["tiers"] else "-" for t in tiers)
        lines.append(f"| {minute} | {s['requests']} | {procs} | {kv} |")
    # Growth after the first few minutes (imports, caches and the step model settle first).
    base = next((s for s in samples if s["minute"] >= 5), samples[0])
    last = samples[-1]
    growth = []
    for r in roles:
        if r in base["procs"] and r in last["procs"]:
            (rss0, fds0), (rss1, fds1) = base["procs"][r], last["procs"][r]
            growth.append(f"{r} {rss1 - rss0:+.0f} MB ({100 * (rss1 / rss0 - 1):+.1f}%), fds {fds1 - fds0:+d}")
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    server_errors = sum(v for k, v in counts.items() if k[:1] == "5" and not k.startswith("503"))
    return (
        "\n".join(lines)
        + f"\n\nFrom minute {base['minute']:.1f} to the end: {'; '.join(growth)}."
        + f"\n\nOutcomes: {statuses}. Server errors other than 503: {server_errors}."
    )


if __name__ == "__main__":
    sys.exit(main())
