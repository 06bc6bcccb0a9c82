"""Serving benchmark: tierserve against the vLLM OpenAI server, in-process AsyncLLM and Ray Serve LLM.

All four serve the same prepared SmolLM2-135M-Instruct checkpoint with the same engine options,
one system at a time on the same machine, driven by the same load generator: chat requests
with greedy decoding and `ignore_eos`, so every request produces exactly `--max-tokens` tokens.
For each system and concurrency it reports TTFT p50/p95, inter-chunk latency p50/p95, time per
output token (TPOT) and output tokens/s, prints a table and writes it to docs/benchmarks/serving.md.

    make bench                       # or: .venv/bin/python bench/serving.py [--systems ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
ENGINE = {"dtype": "bfloat16", "max_model_len": 2048, "max_num_seqs": 32}
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
PROMPTS = [
    "Explain how a bicycle works.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of the seasons on Earth?",
    "Describe the water cycle to a child.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarise the plot of a heist movie you invent.",
    "How do vaccines train the immune system?",
]


@dataclass
class Sample:
    ttft: float
    gaps: list[float]
    e2e: float
    tokens: int


@dataclass
class Result:
    system: str
    concurrency: int
    samples: list[Sample]
    wall: float
    errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    """Per process role: CPU seconds per second of the run (1.0 = one core busy)."""

    def q(self, values: list[float], p: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")

    @property
    def ttft_p50(self) -> float:
        return self.q([s.ttft for s in self.samples], 0.5)

    @property
    def ttft_p95(self) -> float:
        return self.q([s.ttft for s in self.samples], 0.95)

    @property
    def gap_p50(self) -> float:
        return self.q([g for s in self.samples for g in s.gaps], 0.5)

    @property
    def gap_p95(self) -> float:
        return self.q([g for s in self.samples for g in s.gaps], 0.95)

    @property
    def tpot(self) -> float:
        return statistics.mean((s.e2e - s.ttft) / max(1, s.tokens - 1) for s in self.samples)

    @property
    def throughput(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall


# ----- load generator ---------------------------------------------------------------------

Stream = Callable[[str, int], AsyncIterator[tuple[str, int | None]]]
"""(prompt, max_tokens) -> async iterator of (text delta, completion tokens if known at the end)."""


async def measure_one(stream: Stream, prompt: str, max_tokens: int) -> Sample:
    start = time.perf_counter()
    arrivals: list[float] = []
    tokens = None
    async for text, usage in stream(prompt, max_tokens):
        if text:
            arrivals.append(time.perf_counter())
        if usage is not None:
            tokens = usage
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return Sample(arrivals[0] - start, gaps, end - start, tokens if tokens is not None else len(arrivals))


ROLES = [
    ("vLLM worker (model)", "VLLM::Worker"),
    ("vLLM engine core", "VLLM::EngineCore"),
    ("Serve proxy", "ProxyActor"),
    ("Serve replicas", "ServeReplica"),
    ("vLLM API server", "vllm.entrypoints.openai"),
    ("load generator", "bench/serving.py"),
]


def cpu_times() -> dict[str, float]:
    """CPU seconds used so far by each process role (first match in ROLES), 'other' for the rest."""
    totals: dict[str, float] = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        times = proc.info["cpu_times"]
        if times is None:
            continue
        role = next((name for name, needle in ROLES if needle in cmd), "other")
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    return totals


async def run_load(system: str, stream: Stream, concurrency: int, requests: int, max_tokens: int) -> Result:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(PROMPTS[i % len(PROMPTS)])
    samples: list[Sample] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        while not queue.empty():
            prompt = queue.get_nowait()
            try:
                samples.append(await measure_one(stream, prompt, max_tokens))
            except Exception as exc:  # counted and reported; a benchmark must not hide failures
                errors += 1
                print(f"  {system}: request failed: {exc!r}", file=sys.stderr)

    before = cpu_times()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    after = cpu_times()
    # Processes that exist at both ends only; a process started meanwhile has no baseline.
    cpu = {role: (after[role] - before.get(role, 0.0)) / wall for role in after if role in before}
    return Result(system, concurrency, samples, wall, errors, cpu)


def openai_stream(base_url: str, model: str) -> Stream:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)

    async def stream(prompt: str, max_tokens: int) -> AsyncIterator[tuple[str, int | None]]:
        chunks = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in chunks:
            text = chunk.choices[0].delta.content if chunk.choices else None
            yield text or "", chunk.usage.completion_tokens if chunk.usage else None

    return stream


# ----- the systems ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str = "server") -> None:
    """Poll `url` until it answers 200; fail early if `proc` exits, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{what}: {url} not ready after {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)  # Ray leftovers


def spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, **ENV}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def one_tier_config() -> Path:
    """configs/local.yaml with its default tier only (`small`: the engine options of every other
    system here, no speculation), so tierserve runs one engine like the others."""
    import yaml

    from tierserve.cluster.config import bundled_config

    data = yaml.safe_load(bundled_config().read_text())
    data["tiers"] = [t for t in data["tiers"] if t["name"] == data["ingress"]["default_tier"]]
    data.pop("routing", None)  # one tier: nothing to route between
    path = REPO / "bench" / "results" / "tierserve-one-tier.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def server_command(system: str, checkpoint: str, port: int) -> tuple[list[str], str, str]:
    """(command, readiness URL, model name to send) for an HTTP system."""
    py = sys.executable
    if system == "tierserve":
        config = one_tier_config()
        return (
            [py, "-m", "tierserve.cluster.cli", "serve", "--config", str(config), "--port", str(port), "--no-prepare"],
            f"http://127.0.0.1:{port}/health",
            "auto",
        )
    if system == "vllm serve":
        args = [
            py,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            checkpoint,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ]
        for k, v in ENGINE.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        return args + ["--served-model-name", "smollm2"], f"http://127.0.0.1:{port}/health", "smollm2"
    if system == "Ray Serve LLM":
        return (
            [py, __file__, "--ray-serve-llm", checkpoint, "--port", str(port)],
            f"http://127.0.0.1:{port}/v1/models",
            "smollm2",
        )
    raise ValueError(system)


def serve_ray_llm(checkpoint: str, port: int) -> None:
    """Run Ray Serve LLM's OpenAI app on the checkpoint until interrupted (a benchmark subject)."""
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = LLMConfig(
        model_loading_config={"model_id": "smollm2", "model_source": checkpoint},
        engine_kwargs=dict(ENGINE),
        placement_group_config={"bundles": [{"CPU": 1}]},
        runtime_env={"env_vars": dict(ENV)},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
    )
    serve.run(build_openai_app({"llm_configs": [config]}), route_prefix="/")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        serve.shutdown()


def inprocess_stream(checkpoint: str) -> tuple[Stream, Callable[[], None]]:
    """vLLM's AsyncLLM in this process: the floor any server adds its overhead to."""
    os.environ.update(ENV)
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=checkpoint, **ENGINE))
    tokenizer = llm.get_tokenizer()
    counter = 0

    async def stream(prompt: str, max_tokens: int) -> AsyncIterator[tuple[str, int | None]]:
        nonlocal counter
        counter += 1
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        produced = 0
        async for out in llm.generate(TokensPrompt(prompt_token_ids=ids), params, f"bench-{counter}"):
            produced += len(out.outputs[0].token_ids)
            yield out.outputs[0].text, produced if out.finished else None

    return stream, llm.shutdown


# ----- driver -----------------------------------------------------------------------------


async def bench_system(system: str, stream: Stream, args: argparse.Namespace) -> list[Result]:
    for prompt in PROMPTS[:2]:  # warm-up: first requests pay one-off costs
        await measure_one(stream, prompt, 8)
    results = []
    for c in (1, 16):
        n = args.requests_c1 if c == 1 else args.requests_c16
        r = await run_load(system, stream, c, n, args.max_tokens)
        ttft = r.ttft_p50 * 1e3
        print(f"  {system:20s} c={c:<3d} TTFT p50 {ttft:7.1f} ms  tok/s {r.throughput:7.1f}  errors {r.errors}")
        results.append(r)
    return results


def run_all(args: argparse.Namespace) -> list[Result]:
    from tierserve.actors.checkpoints import prepare_embedded

    checkpoint = str(prepare_embedded("smollm2-135m-instruct"))
    logs = REPO / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    for system in args.systems:
        print(f"== {system}", flush=True)
        if system == "AsyncLLM in-process":
            stream, shutdown = inprocess_stream(checkpoint)
            results += asyncio.run(bench_system(system, stream, args))
            shutdown()
            continue
        port = free_port()
        cmd, ready, model = server_command(system, checkpoint, port)
        proc = spawn(cmd, logs / f"{system.replace(' ', '_')}.log")
        try:
            wait_http(ready, proc, timeout=600)
            results += asyncio.run(bench_system(system, openai_stream(f"http://127.0.0.1:{port}/v1", model), args))
        finally:
            stop(proc)
    return results


def table(results: list[Result]) -> str:
    by = {(r.system, r.concurrency): r for r in results}
    base_ttft = by.get(("AsyncLLM in-process", 1))
    base_tput = by.get(("vllm serve", 16))
    columns = [
        "system", "concurrency", "TTFT p50 (ms)", "TTFT p95 (ms)", "chunk gap p50 (ms)", "chunk gap p95 (ms)",
        "TPOT (ms)", "output tok/s", "TTFT p50 / in-process (c=1)", "tok/s / vllm serve (c=16)", "errors",
    ]  # fmt: skip
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        ttft_ratio = f"{r.ttft_p50 / base_ttft.ttft_p50:.2f}x" if base_ttft and r.concurrency == 1 else ""
        tput_ratio = f"{r.throughput / base_tput.throughput:.2f}x" if base_tput and r.concurrency == 16 else ""
        cells = [
            r.system, r.concurrency, f"{r.ttft_p50 * 1e3:.1f}", f"{r.ttft_p95 * 1e3:.1f}", f"{r.gap_p50 * 1e3:.1f}",
            f"{r.gap_p95 * 1e3:.1f}", f"{r.tpot * 1e3:.1f}", f"{r.throughput:.1f}", ttft_ratio, tput_ratio, r.errors,
        ]  # fmt: skip
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows)


def cpu_table(results: list[Result]) -> str:
    """Where the 2 cores went during each system's concurrency-16 run."""
    runs = [r for r in results if r.concurrency == 16]
    roles = [name for name, _ in ROLES] + ["other"]
    rows = ["| system | " + " | ".join(roles) + " | total |", "|" + "---|" * (len(roles) + 2)]
    for r in runs:
        cells = [f"{r.cpu.get(role, 0.0):.2f}" for role in roles]
        rows.append(f"| {r.system} | " + " | ".join(cells) + f" | {sum(r.cpu.values()):.2f} |")
    return "\n".join(rows)


def write_doc(results: list[Result], args: argparse.Namespace) -> Path:
    doc = REPO / "docs" / "benchmarks" / "serving.md"
    header = f"""# Serving benchmark

Measured by `python bench/serving.py` (`make bench`) on {time.strftime("%Y-%m-%d")}, {platform.machine()},
{os.cpu_count()} cores, no GPU. SmolLM2-135M-Instruct (bf16), vLLM CPU {_vllm_version()}, engine options {ENGINE}
for every system. Chat requests, greedy, `ignore_eos`, {args.max_tokens} output tokens each;
{args.requests_c1} requests at concurrency 1, {args.requests_c16} at concurrency 16, after 2 warm-up requests.
One system at a time, all through the same load generator (the `openai` async client over HTTP,
or a direct `AsyncLLM.generate` loop for the in-process row).

- TTFT: request start to the first non-empty text delta.
- chunk gap: time between consecutive text deltas as the client sees them (a delta may carry several tokens).
- TPOT: (end-to-end - TTFT) / (tokens - 1), per request, averaged.
- output tok/s: all output tokens / wall time of the run.

"""
    cpu = """

## Where the CPU goes (concurrency 16)

CPU seconds per second of the concurrency-16 run, by process role (1.00 = one core busy; the
machine has 2). Sampled with psutil over all processes on the machine at the start and end of
the run.

"""
    reading = """
## Reading the numbers

- tierserve streams each request through two Ray Serve hops the in-process engine does not
  have: the tier replica to the ingress (a streaming DeploymentHandle; the tier sends its first
  chunk at once and afterwards whatever piled up, merged per choice) and the ingress to Serve's
  HTTP proxy. Each hop is a Python process doing per-chunk work; `bench/ttft_breakdown.py`
  measures what each entry point adds to TTFT (docs/benchmarks/ttft-breakdown.md).
- On this 2-core machine vLLM pins its model worker to one core and keeps the other for the
  frontend; the engine-core process busy-polls the worker, and every serving process (proxy,
  replicas, API server) and the load generator share what is left. The CPU table shows how
  much each system's serving processes take from the cores the model needs. On a GPU node the
  model runs on the accelerator and the same CPU work does not slow decoding.
- Ray Serve LLM runs the same engine behind the same kind of hops, with its own batching of
  streamed chunks.
"""
    doc.write_text(header + table(results) + cpu + cpu_table(results) + "\n" + reading)
    return doc


def _vllm_version() -> str:
    from importlib.metadata import version

    try:
        return version("vllm-cpu")
    except Exception:
        return version("vllm")


SYSTEMS = ["AsyncLLM in-process", "tierserve", "vllm serve", "Ray Serve LLM"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-c1", type=int, default=16)
    p.add_argument("--requests-c16", type=int, default=64)
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--ray-serve-llm", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ray_serve_llm:
        serve_ray_llm(args.ray_serve_llm, args.port)
        return
    results = run_all(args)
    print(table(results))
    print(cpu_table(results))
    if not args.no_write:
        print(f"wrote {write_doc(results, args)}")


if __name__ == "__main__":
    main()
