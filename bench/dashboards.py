"""End-to-end check of tierserve's observability against real tools: a trace UI (Arize Phoenix)
receiving tierserve's OTLP spans, a headless browser showing that trace, and (optionally) a
real Prometheus scraping tierserve's metrics.

What it does, every process it starts bounded in time and stopped on exit:

1. starts Phoenix (from its own virtualenv, `.venv-phoenix`; `make trace-ui` creates it) on
   free local ports, with its data in a temporary folder;
2. starts `tierserve serve` with a temporary copy of configs/local.yaml (by default only the
   `small` tier, see --tiers) whose `telemetry:` block turns token text on and names the Phoenix
   project, with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at Phoenix;
3. optionally starts Prometheus (Debian's `prometheus`) with configs/prometheus.yml's settings
   and a static target on tierserve's metrics export port;
4. sends one streaming chat request with the official `openai` client (model `small`,
   temperature 0) and reads the `x-trace-id` response header;
5. asks Phoenix's REST API (`GET /v1/projects/{project}/spans?trace_id=...`) for that trace and
   checks it: the span names `POST /v1/chat/completions`, `route`, `chat small`, their
   parent/child links, and one `token` span per output token (count = the usage's
   completion_tokens, indices 0..n-1, token texts joined = the streamed text);
6. opens the trace in headless Chromium (Playwright, driving Debian's /usr/bin/chromium) and
   saves a screenshot (default docs/images/phoenix-token-trace.png);
7. asks Prometheus's HTTP API for `ray_tierserve_requests_total` until it has a sample.

    make dashboards            # or: .venv/bin/python bench/dashboards.py [--no-prometheus] [--out PNG]

It prints a JSON summary and writes it to bench/results/dashboards.json; it exits non-zero when
a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from serving import free_port, wait_http

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROJECT = "tierserve"
PROMPT = "Write one sentence about the sea."

# Run by .venv-phoenix's python (Playwright lives there, next to Phoenix, not in tierserve's venv).
SCREENSHOT_SCRIPT = textwrap.dedent(
    """
    import sys
    from playwright.sync_api import sync_playwright

    url, out, chromium, profile, width, height, flags = sys.argv[1:8]
    token_text = sys.argv[8] if len(sys.argv) > 8 else ""
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            headless=True,
            args=[f for f in flags.split(" ") if f != "--headless"],
            viewport={"width": int(width), "height": int(height)},
        )
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(url)
        # The trace page: its span tree lists the request, route, generation and token spans.
        page.get_by_text("chat small", exact=True).first.wait_for()
        page.get_by_text("token", exact=True).first.wait_for()
        page.wait_for_load_state("networkidle")
        # Select one token span so the detail pane shows its attributes (index, gap, text).
        tokens = page.get_by_text("token", exact=True)
        count = tokens.count()
        if count > 2:
            tokens.nth(2).click()
            page.wait_for_timeout(1500)
        page.wait_for_timeout(1000)
        page.screenshot(path=out)
        print(f"token labels visible: {count}; url: {page.url}")
        context.close()
    """
)


def log(message: str) -> None:
    print(f"[dashboards {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Processes:
    """Every process this script starts, each in its own session, stopped (group and session) on exit."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen, int]] = []

    def start(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        log(f"starting {name}: {' '.join(cmd)} (log {log_path})")
        proc = subprocess.Popen(
            cmd,
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs.append((name, proc, signal.SIGINT if name == "tierserve" else signal.SIGTERM))
        return proc

    def stop_all(self) -> None:
        for name, proc, first_signal in reversed(self.procs):
            stop(name, proc, first_signal)


def session_members(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def stop(name: str, proc: subprocess.Popen, first_signal: int, grace: float = 60) -> None:
    """Ask the process to stop (tierserve: SIGINT shuts Serve and Ray down), then kill its group and
    whatever is left in its session (Ray and vLLM children)."""
    sid = proc.pid  # start_new_session: the session id is the process's pid
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, first_signal)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            log(f"{name} did not stop in {grace:.0f}s; killing it")
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while (left := session_members(sid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL if time.monotonic() > deadline - 7 else signal.SIGTERM)
            except OSError:
                pass
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    left = session_members(sid)
    log(f"stopped {name}" + (f" (still running: {left})" if left else ""))


def phoenix_env(work: Path) -> dict[str, str]:
    return {
        "PHOENIX_WORKING_DIR": str(work),
        # Offline machine: no web fonts, telemetry pixels or other requests to the internet.
        "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }


def tierserve_config(path: Path, tiers: list[str], metrics_port: int, http_port: int) -> None:
    """configs/local.yaml with only `tiers`, free ports, and a telemetry block (token text on,
    spans in Phoenix project `tierserve`, a short batch delay). The OTLP endpoint comes from
    OTEL_EXPORTER_OTLP_ENDPOINT."""
    import yaml

    data = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    data["tiers"] = [t for t in data["tiers"] if t["name"] in tiers]
    if not data["tiers"]:
        raise SystemExit(f"no tier of configs/local.yaml is named {tiers}")
    if data["ingress"].get("default_tier") not in tiers:
        data["ingress"]["default_tier"] = data["tiers"][0]["name"]
    data["server"] = {**data.get("server", {}), "host": "127.0.0.1", "port": http_port}
    data["ray"] = {**data.get("ray", {}), "metrics_export_port": metrics_port}
    data["telemetry"] = {
        "exporter": "otlp",
        "protocol": "http/protobuf",
        "token_spans": "all",
        "token_text": True,
        "batch_delay_ms": 200,
        "resource": {"openinference.project.name": PROJECT},
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def prometheus_config(path: Path, metrics_port: int) -> None:
    """configs/prometheus.yml's settings, with the static single-node target instead of Ray's
    service-discovery file (that file is written by `ray start`, not by a private cluster)."""
    import yaml

    data = yaml.safe_load((REPO / "configs" / "prometheus.yml").read_text())
    data["scrape_configs"] = [
        {"job_name": "tierserve-local", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
    ]
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def chat(base_url: str, model: str, max_tokens: int) -> dict:
    """One streaming chat request with the official client; the trace id from the response header."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", timeout=120, max_retries=0)
    started = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    trace_id = raw.headers.get("x-trace-id")
    pieces: list[str] = []
    usage = None
    chunks = 0
    for chunk in raw.parse():
        chunks += 1
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                pieces.append(choice.delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    return {
        "trace_id": trace_id,
        "traceresponse": raw.headers.get("traceresponse"),
        "text": "".join(pieces),
        "chunks": chunks,
        "completion_tokens": usage.completion_tokens if usage else None,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "seconds": round(time.perf_counter() - started, 3),
    }


def attr(span: dict, key: str):
    """An attribute from Phoenix's span JSON, flat (`a.b.c`) or nested ({a: {b: {c}}})."""
    attributes = span.get("attributes") or {}
    if key in attributes:
        return attributes[key]
    value = attributes
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def phoenix_spans(phoenix: str, trace_id: str, expected: int | None, timeout: float) -> list[dict]:
    """The trace's spans from Phoenix's REST API, polled until `expected` of them arrived."""
    import httpx

    url = f"{phoenix}/v1/projects/{PROJECT}/spans"
    deadline = time.monotonic() + timeout
    spans: list[dict] = []
    while time.monotonic() < deadline:
        response = httpx.get(url, params={"trace_id": trace_id, "limit": 1000}, timeout=10)
        if response.status_code == 200:
            spans = response.json()["data"]
            if expected is not None and len(spans) >= expected:
                time.sleep(1)  # late stragglers would show up as a count mismatch
                return httpx.get(url, params={"trace_id": trace_id, "limit": 1000}, timeout=10).json()["data"]
        elif response.status_code != 404:  # 404: the project does not exist until its first span
            response.raise_for_status()
        time.sleep(1)
    return spans


def check_trace(spans: list[dict], answer: dict, tier: str) -> tuple[dict, list[str]]:
    problems: list[str] = []
    by_name: dict[str, list[dict]] = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    names = {name: len(group) for name, group in by_name.items()}
    request = by_name.get("POST /v1/chat/completions", [])
    route = by_name.get("route", [])
    generation = by_name.get(f"chat {tier}", [])
    tokens = by_name.get("token", [])
    for label, group in (("POST /v1/chat/completions", request), ("route", route), (f"chat {tier}", generation)):
        if len(group) != 1:
            problems.append(f"expected one {label!r} span, found {len(group)}")
    if request and route and route[0]["parent_id"] != request[0]["context"]["span_id"]:
        problems.append("route is not a child of the request span")
    if request and generation and generation[0]["parent_id"] != request[0]["context"]["span_id"]:
        problems.append(f"chat {tier} is not a child of the request span")
    if request and request[0]["parent_id"]:
        problems.append("the request span has a parent (expected the root)")
    n = answer["completion_tokens"]
    if n is None:
        problems.append("the stream carried no usage (completion_tokens unknown)")
    elif len(tokens) != n:
        problems.append(f"{len(tokens)} token spans for {n} completion tokens")
    if generation:
        parent = generation[0]["context"]["span_id"]
        strays = [s for s in tokens if s["parent_id"] != parent]
        if strays:
            problems.append(f"{len(strays)} token spans are not children of chat {tier}")
        made = attr(generation[0], "tierserve.token_spans")
        if made is not None and n is not None and int(made) != n:
            problems.append(f"chat {tier} says tierserve.token_spans={made}, expected {n}")
        output = attr(generation[0], "gen_ai.usage.output_tokens")
        if output is not None and n is not None and int(output) != n:
            problems.append(f"gen_ai.usage.output_tokens={output}, expected {n}")
    ordered = sorted(tokens, key=lambda s: attr(s, "tierserve.token.index") or 0)
    indices = [attr(s, "tierserve.token.index") for s in ordered]
    if indices != list(range(len(tokens))):
        problems.append(f"token indices are not 0..{len(tokens) - 1}: {indices}")
    texts = [attr(s, "tierserve.token.text") for s in ordered]
    joined = "".join(t for t in texts if t is not None)
    if None in texts:
        problems.append("token spans without tierserve.token.text (token_text is on)")
    elif joined != answer["text"]:
        problems.append(f"token texts {joined!r} != streamed text {answer['text']!r}")
    gaps = sorted(float(attr(s, "tierserve.token.gap_ms") or 0) for s in ordered)
    summary = {
        "spans": len(spans),
        "span_names": names,
        "token_spans": len(tokens),
        "completion_tokens": n,
        "token_text_joined": joined,
        "token_gap_ms": {
            "first": round(float(attr(ordered[0], "tierserve.token.gap_ms") or 0), 2) if ordered else None,
            "median": round(gaps[len(gaps) // 2], 2) if gaps else None,
            "max": round(gaps[-1], 2) if gaps else None,
        },
        "speculative_tokens": sum(1 for s in ordered if attr(s, "tierserve.token.speculative")),
    }
    return summary, problems


def screenshot(phoenix_venv: Path, url: str, out: Path, work: Path, width: int, height: int) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    script = work / "screenshot.py"
    script.write_text(SCREENSHOT_SCRIPT)
    cmd = [
        str(phoenix_venv / "bin" / "python"),
        str(script),
        url,
        str(out),
        chromium,
        str(work / "chromium-profile"),
        str(width),
        str(height),
        " ".join(CHROMIUM_FLAGS),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, start_new_session=True)
    if result.returncode != 0:
        raise RuntimeError(f"screenshot failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout.strip()


def prometheus_sample(prometheus: str, query: str, timeout: float) -> list[dict]:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=5)
            result = response.json().get("data", {}).get("result", [])
            if result:
                return result
        except httpx.HTTPError:
            pass
        time.sleep(2)
    return []


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "phoenix-token-trace.png")
    p.add_argument("--phoenix-venv", type=Path, default=REPO / ".venv-phoenix")
    p.add_argument("--tiers", default="small", help="tiers of configs/local.yaml to start (comma-separated)")
    p.add_argument("--model", default="small", help="model (tier) the request asks for")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--start-timeout", type=float, default=420, help="seconds for tierserve to come up")
    p.add_argument("--no-prometheus", action="store_true", help="skip the Prometheus scrape check")
    p.add_argument("--no-screenshot", action="store_true")
    p.add_argument("--window", default="1600x1000", help="browser viewport WxH")
    p.add_argument("--keep-temp", action="store_true", help="keep the temporary folder (logs, configs, data)")
    args = p.parse_args()

    phoenix_bin = args.phoenix_venv / "bin" / "phoenix"
    if not phoenix_bin.exists():
        print(f"{phoenix_bin} is missing: run `make trace-ui` (or `make dashboards`) first", file=sys.stderr)
        return 2
    prometheus_bin = shutil.which("prometheus")
    use_prometheus = not args.no_prometheus and prometheus_bin is not None
    tier_names = [t.strip() for t in args.tiers.split(",") if t.strip()]

    work = Path(tempfile.mkdtemp(prefix="tierserve-dashboards-"))
    procs = Processes()
    summary: dict = {"temp": str(work)}
    problems: list[str] = []
    try:
        # 1. Phoenix
        phoenix_port, grpc_port = free_port(), free_port()
        phoenix = f"http://127.0.0.1:{phoenix_port}"
        ph = procs.start(
            "phoenix",
            [str(phoenix_bin), "serve", "--host", "127.0.0.1"]
            + ["--port", str(phoenix_port), "--grpc-port", str(grpc_port)],
            work / "phoenix.log",
            phoenix_env(work / "phoenix"),
        )
        wait_http(f"{phoenix}/healthz", ph, 120, "phoenix")
        import httpx

        summary["phoenix"] = {
            "url": phoenix,
            "version": httpx.get(f"{phoenix}/arize_phoenix_version", timeout=5).text.strip(),
        }
        log(f"phoenix {summary['phoenix']['version']} ready at {phoenix} (OTLP/gRPC port {grpc_port})")

        # 2. tierserve, traced into Phoenix
        http_port, metrics_port = free_port(), free_port()
        config = work / "tierserve.yaml"
        tierserve_config(config, tier_names, metrics_port, http_port)
        ts = procs.start(
            "tierserve",
            [str(REPO / ".venv" / "bin" / "tierserve"), "serve", "--config", str(config)],
            work / "tierserve.log",
            {"OTEL_EXPORTER_OTLP_ENDPOINT": phoenix},
        )

        # 3. Prometheus (while tierserve starts)
        prometheus = None
        if use_prometheus:
            prom_port = free_port()
            prometheus = f"http://127.0.0.1:{prom_port}"
            prometheus_config(work / "prometheus.yml", metrics_port)
            pr = procs.start(
                "prometheus",
                [
                    prometheus_bin,
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'prometheus-data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                work / "prometheus.log",
            )
            wait_http(f"{prometheus}/-/ready", pr, 60, "prometheus")
            log(f"prometheus ready at {prometheus}, scraping 127.0.0.1:{metrics_port}")

        base = f"http://127.0.0.1:{http_port}"
        started = time.monotonic()
        # /health answers 200 once every tier's engine is up (the ingress alone answers /v1/models
        # earlier, and a request sent then would wait in Serve's queue for the tier).
        wait_http(f"{base}/health", ts, args.start_timeout, "tierserve")
        summary["tierserve_start_s"] = round(time.monotonic() - started, 1)
        log(f"tierserve ready at {base} after {summary['tierserve_start_s']} s")

        # 4. One streaming chat request
        answer = chat(f"{base}/v1", args.model, args.max_tokens)
        summary["request"] = answer
        log(f"answer ({answer['completion_tokens']} tokens, trace {answer['trace_id']}): {answer['text']!r}")
        if not answer["trace_id"]:
            raise RuntimeError("the response has no x-trace-id header: is tracing on?")

        # 5. The trace, through Phoenix's REST API
        expected = answer["completion_tokens"] + 3 if answer["completion_tokens"] else None
        spans = phoenix_spans(phoenix, answer["trace_id"], expected, 60)
        trace_summary, trace_problems = check_trace(spans, answer, args.model)
        summary["trace"] = trace_summary
        problems += trace_problems
        log(f"phoenix holds {len(spans)} spans of the trace: {trace_summary['span_names']}")

        # 6. The trace in the browser
        if not args.no_screenshot:
            width, height = (int(v) for v in args.window.split("x"))
            url = f"{phoenix}/redirects/traces/{answer['trace_id']}"
            out = screenshot(args.phoenix_venv, url, args.out, work, width, height)
            summary["screenshot"] = {"path": str(args.out), "url": url, "browser": out}
            log(f"screenshot {args.out}: {out}")

        # 7. Prometheus scrape
        if prometheus:
            query = "ray_tierserve_requests_total"
            result = prometheus_sample(prometheus, query, 90)
            summary["prometheus"] = {
                "query": query,
                "samples": [{"labels": r["metric"], "value": r["value"][1]} for r in result],
            }
            if not result:
                problems.append(f"prometheus has no sample of {query} after 90 s")
            log(f"prometheus {query}: {summary['prometheus']['samples']}")
        else:
            summary["prometheus"] = "skipped" if args.no_prometheus else "prometheus not installed"
    except Exception as exc:  # report, clean up, fail
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        procs.stop_all()
        summary["problems"] = problems
        results = REPO / "bench" / "results"
        results.mkdir(parents=True, exist_ok=True)
        (results / "dashboards.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
        if problems:
            for name in ("phoenix.log", "tierserve.log", "prometheus.log"):
                path = work / name
                if path.exists():
                    tail = path.read_text(errors="replace").splitlines()[-15:]
                    print(f"--- last lines of {name}:\n" + "\n".join(tail), file=sys.stderr)
        if args.keep_temp or problems:
            log(f"temporary files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
