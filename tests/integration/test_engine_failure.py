"""A dead engine: the stream in flight ends with an SSE error event, health says so, the replica
restarts its engine in place, and the tier serves again. Breaks the shared app, so it runs last."""

import json
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tierserve.cluster.app import tier_deployment_name

from .conftest import TIER, wait_for

SERVE_LOGS = Path("/tmp/ray/session_latest/logs/serve")
"""Where Serve writes each replica's log on this node (Ray's default temporary directory)."""

pytestmark = [pytest.mark.integration, pytest.mark.destructive]


def replica_of(tier: str) -> psutil.Process:
    (replica,) = [p for p in psutil.process_iter(["cmdline"]) if f"tier-{tier}" in " ".join(p.info["cmdline"] or [])]
    return replica


def engine_core_of(tier: str) -> psutil.Process:
    """The engine-core process ('VLLM::EngineCore') under the tier's Serve replica."""
    (core,) = [c for c in replica_of(tier).children(recursive=True) if "EngineCore" in " ".join(c.cmdline())]
    return core


def test_engine_death_mid_stream(app, http):
    replica = replica_of(TIER)
    core = engine_core_of(TIER)
    # Named: `auto` may choose the other tier when this one is predicted over the budget.
    body = {"model": TIER, "prompt": "Tell me a long story.", "max_tokens": 512, "ignore_eos": True, "stream": True}
    events = []
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[len("data: ") :])
            if len(events) == 3:
                core.send_signal(signal.SIGKILL)
                killed = time.monotonic()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_unavailable" and error["type"] == "service_unavailable_error"
    assert len(events) < 256  # cut short, not 512 tokens

    # Health reports the dead tier while it is down, and still 200 (degraded): the other tier serves,
    # so a load balancer keeps the node ...
    def health() -> dict:
        r = http.get("/health", timeout=30)
        return {**r.json(), "http": r.status_code}

    down = wait_for(lambda: health()["status"] == "degraded", timeout=60)
    assert down, "health never reported the dead engine"
    state = health()
    if state["status"] == "degraded":
        assert state["http"] == 200 and TIER not in state["serving"] and state["tiers"][TIER] != "ok"
    # ... `auto` falls back to the tier that serves meanwhile ...
    r = httpx.post(f"{app.http}/v1/completions", json={"model": "auto", "prompt": "Hi", "max_tokens": 2}, timeout=120)
    assert r.status_code == 200, r.text
    # ... and the replica restarts its engine in place (a new engine core under the same replica
    # process), after which the tier serves again.
    up = wait_for(lambda: health()["status"] == "ok", timeout=420, interval=2)
    assert up, "the tier did not recover"
    assert replica_of(TIER).pid == replica.pid, "Serve replaced the replica instead"
    assert engine_core_of(TIER).pid != core.pid

    # The router learns of the new replica within a couple of seconds (a load poll, or Serve's
    # replica count); until then a request naming the tier gets a 503 with Retry-After.
    def hello() -> httpx.Response | None:
        r = httpx.post(
            f"{app.http}/v1/completions", json={"model": TIER, "prompt": "Hello", "max_tokens": 4}, timeout=120
        )
        assert r.status_code in (200, 503), r.text
        return r if r.status_code == 200 else None

    r = wait_for(hello, timeout=30, interval=0.5)
    assert r is not None and r.json()["usage"]["completion_tokens"] >= 1

    # The replica's log file says so, and has Serve's line for the request just served: what a
    # replica logs after its engine's start reaches the file (vLLM's logging set-up closes
    # Serve's handler there; `log_handlers_kept` restores it).
    (log,) = SERVE_LOGS.glob(f"replica_{app.name}_{tier_deployment_name(TIER)}_*.log")
    assert f"tier {TIER}: engine died; restarting it in place" in log.read_text()
    assert wait_for(lambda: "CALL generate OK" in log.read_text().split("engine died")[-1], timeout=10, interval=0.5)
    print(
        f"\nengine killed: health degraded, `auto` served meanwhile; engine restarted in its replica; tier {TIER} "
        f"serving again after "
        f"{time.monotonic() - killed:.0f} s"
    )
