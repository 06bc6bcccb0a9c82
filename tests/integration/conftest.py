"""One local Ray Serve app for all integration tests, built from configs/local.yaml exactly as
`serve run configs/serve.yaml` builds it, on a free port of this machine."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
APP_NAME = "tierserve-test"
TIER = "small"
"""The default tier (`model: auto`)."""
TIERS = ["small", "quality"]
MODELS = ["auto", *TIERS, "all-MiniLM-L6-v2"]
"""What `GET /v1/models` lists: `auto`, the tiers, the retriever's embedding model."""
"""Every tier of configs/local.yaml, in order."""


@dataclass
class RunningApp:
    name: str
    http: str
    """Base URL of Serve's HTTP proxy, e.g. http://127.0.0.1:PORT"""
    metrics: str = ""
    """URL of the node's Prometheus metrics (Ray's metrics export)."""

    @property
    def openai_base(self) -> str:
        return f"{self.http}/v1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app() -> RunningApp:
    import ray
    from ray import serve

    from tierserve.actors.checkpoints import prepare_embedded
    from tierserve.cluster.app import build_app
    from tierserve.cluster.cli import start_ray
    from tierserve.cluster.config import load_config
    from tierserve.cluster.ops import wait_serving

    config_path = REPO / "configs" / "local.yaml"
    prepare_embedded("smollm2-135m-instruct", progress=False)
    port = _free_port()
    config = load_config(config_path)
    # Logical CPUs only: the shared app and the apps some tests deploy beside it reserve more
    # than the 2 physical cores; vLLM's core binding bounds what they really use.
    metrics_port = _free_port()
    ray_config = config.ray.model_copy(update={"num_cpus": 8, "metrics_export_port": metrics_port})
    config = config.model_copy(update={"ray": ray_config})
    # Workers report metrics to the node every second (Ray's default is 10 s), so tests wait less.
    start_ray(config, log_to_driver=False, _system_config={"metrics_report_interval_ms": 1000})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": str(config_path)}), name=APP_NAME, route_prefix="/")
    running = RunningApp(APP_NAME, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics")
    status = wait_serving(running.http, 60)
    assert status == "ok", f"/health says {status!r} a minute after Serve runs the app"
    yield running
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def client(app):
    from openai import OpenAI

    return OpenAI(base_url=app.openai_base, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(app):
    with httpx.Client(base_url=app.http, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def ingress_handle(app):
    from ray import serve

    return serve.get_app_handle(app.name)


@pytest.fixture(scope="session")
def tier_handle(app):
    from ray import serve

    from tierserve.cluster.app import tier_deployment_name

    return serve.get_deployment_handle(tier_deployment_name(TIER), app_name=app.name)


def run_app(app: RunningApp, application, name: str) -> str:
    """`serve.run` an application at /`name` beside the shared one and wait, as `tierserve serve`
    does, until its `/health` says every tier serves; return its base URL."""
    from ray import serve

    from tierserve.cluster.ops import wait_serving

    serve.run(application, name=name, route_prefix=f"/{name}")
    base = f"{app.http}/{name}"
    status = wait_serving(base, 60)
    assert status == "ok", f"{name}: /health says {status!r} a minute after Serve runs it"
    return base


def wait_for(predicate, timeout: float, interval: float = 0.2):
    """Poll `predicate` until it returns a truthy value or `timeout` seconds pass; return the last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


@pytest.fixture(scope="module")
def receiver():
    """A real OTLP/HTTP receiver for an app whose `telemetry` points at it (one per module)."""
    from .otlp_receiver import OtlpReceiver

    r = OtlpReceiver()
    yield r
    r.close()
