"""A real two-node Ray cluster on this machine, driven the way an operator drives one.

`ray start --head` and `ray start --address ...` run as separate processes (each node its own
raylet); the worker node carries a custom resource and a label that the `far` tier requires.
Everything goes through the public surfaces: `tierserve deploy apply` sends the Serve config
rendered from a tierserve config to the head's dashboard, `tierserve status` and `tierserve
scale` read and change the deployment, and requests go through the OpenAI client to the ingress
on the head. The tests run in order on one cluster:

1. the `far` tier's replica runs on the worker node and answers through the head's ingress;
2. the worker node dies: the service reports `far` down, `auto` goes to `near`, a request naming
   `far` gets a 503 at once; the node comes back and `far` serves again, on the new node;
3. `tierserve scale` adds and removes a replica without restarting the running one;
4. a changed config deployed under load (rolling update): every in-flight request completes.

Every wait is bounded; every process the tests start is killed at the end. They run with
`make test-cluster` (pytest -m cluster), apart from `make test`: about 17 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from .conftest import _free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.cluster]  # run by `make test-cluster`, not `make test`

APP = "tierserve-multinode"
WORKER_LABEL = {"tierserve-node": "worker"}
HEAD_LABEL = {"tierserve-node": "head"}
"""Serve spreads replicas over nodes; `near` and the ingress are pinned to the head so losing the
worker node takes down `far` alone."""
FAR_RESOURCE = "tierserve_far"
ENGINE = {"dtype": "float32", "max_model_len": 2048, "max_num_seqs": 32}
"""configs/local.yaml's `small` engine, so vLLM's compile cache is shared with the other tests."""
DEPLOY_TIMEOUT_S = 900
BIN = Path(sys.executable).parent
"""Where this environment's `ray` and `tierserve` commands are."""


def tier(name: str, **deployment) -> dict:
    return {
        "name": name,
        "model": "embedded:smollm2-135m-instruct",
        "description": f"{name} tier",
        "max_completion_tokens": 256,
        "engine": ENGINE,
        "deployment": {
            "num_cpus": 1,
            "max_ongoing_requests": 64,
            "max_surge_percent": 100,  # a rolling update starts the new replica before stopping the old
            "graceful_shutdown_timeout_s": 120,
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            **deployment,
        },
    }


def app_config(port: int, near_max_tokens: int = 256) -> dict:
    near = tier("near", label_selector=HEAD_LABEL)
    near["max_completion_tokens"] = near_max_tokens
    # No surge for `far`: its replacement starts once the old replica is gone (`auto` meanwhile
    # goes to `near`), which keeps a rolling update to three engines on this machine's two cores.
    far = tier("far", resources={FAR_RESOURCE: 1}, label_selector=WORKER_LABEL, max_surge_percent=0)
    return {
        "name": APP,
        "server": {"host": "127.0.0.1", "port": port, "proxy_location": "HeadOnly"},
        "ingress": {
            "default_tier": "far",  # `auto` goes to `far` while it is up
            "deployment": {
                "num_cpus": 0.25,
                "max_ongoing_requests": 256,
                "max_surge_percent": 100,
                "label_selector": HEAD_LABEL,
            },
        },
        "routing": {"default_sla_class": None},
        "tiers": [near, far],
    }


class Cluster:
    """Ray nodes started as `ray start --block` processes; `kill_node` takes one down with
    everything it runs (its raylet, workers and their engine processes), as a lost machine."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.gcs_port = _free_port()
        self.dashboard = f"http://127.0.0.1:{_free_port()}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, psutil.Process] = {}

    def _start(self, name: str, args: list[str]) -> None:
        ports = {
            "--dashboard-agent-listen-port": _free_port(),
            "--dashboard-agent-grpc-port": _free_port(),
            "--metrics-export-port": _free_port(),
            "--runtime-env-agent-port": _free_port(),
        }
        command = [str(BIN / "ray"), "start", "--block", *args]
        command += ["--object-store-memory", str(256 * 1024**2), "--disable-usage-stats"]
        command += [str(x) for kv in ports.items() for x in kv]
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (the node outlives this call)
        self.nodes[name] = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_head(self) -> None:
        dashboard_port = self.dashboard.rsplit(":", 1)[1]
        self._start(
            "head",
            ["--head", "--port", str(self.gcs_port), "--num-cpus", "3", "--include-dashboard", "true"]
            + ["--labels", "tierserve-node=head"]
            + ["--dashboard-host", "127.0.0.1", "--dashboard-port", dashboard_port],
        )

    def start_worker(self, name: str) -> None:
        self._start(
            name,
            ["--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", "2"]
            + ["--resources", json.dumps({FAR_RESOURCE: 2}), "--labels", "tierserve-node=worker"],
        )

    def track(self) -> None:
        """Remember every process under the nodes (workers start their own sessions)."""
        for node in self.nodes.values():
            try:
                root = psutil.Process(node.pid)
                for p in [root, *root.children(recursive=True)]:
                    self.seen.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                pass

    def kill_node(self, name: str) -> None:
        node = self.nodes.pop(name)
        root = psutil.Process(node.pid)
        victims = [root, *root.children(recursive=True)]
        for p in victims:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=30)
        node.wait(timeout=30)

    def stop(self) -> None:
        self.track()
        for p in self.seen.values():
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(self.seen.values()), timeout=60)
        for node in self.nodes.values():
            node.wait(timeout=30)

    def get(self, path: str) -> dict:
        token = self.env["RAY_AUTH_TOKEN"]
        r = httpx.get(self.dashboard + path, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        r.raise_for_status()
        return r.json()

    def alive_nodes(self) -> list[dict]:
        nodes = self.get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def worker_node_id(self) -> str | None:
        ids = [n["node_id"] for n in self.alive_nodes() if n.get("labels", {}).get("tierserve-node") == "worker"]
        return ids[0] if ids else None

    def replicas(self, deployment: str) -> list[dict]:
        app = self.get("/api/serve/applications/")["applications"].get(APP) or {}
        return (app.get("deployments") or {}).get(deployment, {}).get("replicas") or []

    def deploy(self, config: dict, filename: str) -> None:
        """Write `config` as a tierserve YAML and `tierserve deploy apply` it; wait until it runs."""
        path = self.workdir / filename
        path.write_text(yaml.safe_dump(config))
        wait = str(DEPLOY_TIMEOUT_S)
        done = self.tierserve(
            "deploy", "apply", "--config", str(path), "--address", self.dashboard, "--wait-s", wait,
            timeout=DEPLOY_TIMEOUT_S + 300,
        )  # fmt: skip
        self.track()
        assert done.returncode == 0, done.stdout + done.stderr

    def tierserve(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The `tierserve` CLI against this cluster, as an operator runs it."""
        command = [str(BIN / "tierserve"), *args]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tierserve.actors.checkpoints import prepare_embedded

    prepare_embedded("smollm2-135m-instruct", progress=False)
    c = Cluster(tmp_path_factory.mktemp("multinode"))
    try:
        c.start_head()
        assert wait_for(lambda: _up(c), timeout=120, interval=1), "the head node did not start"
        c.start_worker("worker-1")
        assert wait_for(lambda: c.worker_node_id(), timeout=120, interval=1), "the worker node did not join"
        c.track()
        yield c
    finally:
        c.stop()


def _up(c: Cluster) -> bool:
    try:
        return len(c.alive_nodes()) == 1
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def service(cluster):
    """The app deployed with `tierserve deploy apply`; its HTTP base URL."""
    port = _free_port()
    cluster.deploy(app_config(port), "tierserve.yaml")
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def openai_client(service):
    from openai import OpenAI

    return OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0, timeout=120)


def tiers_view(service: str) -> dict[str, dict]:
    r = httpx.get(f"{service}/v1/tiers", timeout=30)
    r.raise_for_status()
    return {t["name"]: t for t in r.json()["data"]}


def healthy(service: str, name: str) -> bool:
    try:
        return bool(tiers_view(service)[name]["router"]["healthy"])
    except httpx.HTTPError:
        return False


def test_far_tier_runs_on_the_worker_node_and_answers_through_the_head(cluster, service, openai_client):
    worker = cluster.worker_node_id()
    head = [n["node_id"] for n in cluster.alive_nodes() if n["node_id"] != worker]
    (far,) = cluster.replicas("tier-far")
    (near,) = cluster.replicas("tier-near")
    (ingress,) = cluster.replicas("ingress")
    assert far["state"] == "RUNNING" and far["node_id"] == worker
    assert near["node_id"] in head and ingress["node_id"] in head

    reply = openai_client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert reply.headers["x-tierserve-tier"] == "far"
    assert reply.parse().usage.completion_tokens >= 1

    status = cluster.tierserve("status", "--url", service, "--address", cluster.dashboard, "--app", APP)
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:3]}
    assert rows["far"][1] == "ok" and rows["far"][2] == "1/1"
    assert rows["near"][1] == "ok"


def test_losing_the_worker_node_fails_over_and_recovers(cluster, service, openai_client):
    cluster.kill_node("worker-1")

    assert wait_for(lambda: not healthy(service, "far"), timeout=90, interval=1), "far never reported down"
    view = tiers_view(service)["far"]
    assert view["router"]["replicas"]["running"] == 0
    status = cluster.tierserve("status", "--url", service, "--app", APP)
    # Exit status 1: a tier is down (scripts can wait on it).
    assert status.returncode == 1 and "far: no running replica" in status.stdout, status.stdout + status.stderr

    # `auto` goes to the tier that can serve ...
    reply = openai_client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert reply.headers["x-tierserve-tier"] == "near"
    assert reply.headers["x-tierserve-route-reason"] == "target_unhealthy"
    # ... and a request naming the lost tier gets a clean 503 at once, not a hang.
    started = time.monotonic()
    r = httpx.post(f"{service}/v1/completions", json={"model": "far", "prompt": "Hi", "max_tokens": 4}, timeout=60)
    assert r.status_code == 503 and time.monotonic() - started < 10
    assert r.json()["error"]["code"] == "no_tier_available" and "retry-after" in r.headers

    # The node comes back (a new raylet with the same resource): Serve places the replica there.
    cluster.start_worker("worker-2")
    assert wait_for(lambda: cluster.worker_node_id(), timeout=120, interval=1), "the new worker did not join"
    new_worker = cluster.worker_node_id()
    assert wait_for(lambda: healthy(service, "far"), timeout=DEPLOY_TIMEOUT_S, interval=2), "far did not recover"
    cluster.track()
    (far,) = [r for r in cluster.replicas("tier-far") if r["state"] == "RUNNING"]
    assert far["node_id"] == new_worker
    r = httpx.post(f"{service}/v1/completions", json={"model": "far", "prompt": "Hi", "max_tokens": 4}, timeout=120)
    assert r.status_code == 200 and r.headers["x-tierserve-tier"] == "far"


def test_scale_adds_and_removes_a_replica_without_restarting_the_running_one(cluster, service):
    (before,) = cluster.replicas("tier-far")
    done = cluster.tierserve("scale", "far", "2", "--address", cluster.dashboard, "--app", APP)
    assert done.returncode == 0, done.stdout + done.stderr

    def running() -> list[dict]:
        return [r for r in cluster.replicas("tier-far") if r["state"] == "RUNNING"]

    assert wait_for(lambda: len(running()) == 2, timeout=DEPLOY_TIMEOUT_S, interval=2), "no second replica"
    cluster.track()
    assert before["replica_id"] in {r["replica_id"] for r in running()}
    # The ingress counts the new capacity (Serve's count, read every couple of seconds).
    assert wait_for(lambda: tiers_view(service)["far"]["router"]["replicas"]["running"] == 2, timeout=30)

    done = cluster.tierserve("scale", "far", "1", "--address", cluster.dashboard, "--app", APP)
    assert done.returncode == 0, done.stdout + done.stderr
    assert wait_for(lambda: len(cluster.replicas("tier-far")) == 1, timeout=180, interval=2)
    r = httpx.post(f"{service}/v1/completions", json={"model": "far", "prompt": "Hi", "max_tokens": 4}, timeout=120)
    assert r.status_code == 200


def test_rolling_update_keeps_serving_and_cuts_no_request(cluster, service):
    """Deploy a changed config while streams run; every stream ends whole, none errs."""
    results: list[tuple[int, str | None, int | None]] = []  # (status, finish_reason, completion tokens)
    stop = threading.Event()

    def load() -> None:
        body = {
            "model": "near",
            "prompt": "Count to a hundred:",
            "max_tokens": 48,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        while not stop.is_set():
            finish, tokens = None, None
            try:
                with httpx.stream("POST", f"{service}/v1/completions", json=body, timeout=300) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            event = json.loads(line[len("data: ") :])
                            if "error" in event:
                                finish = "error: " + event["error"]["code"]
                            elif event.get("usage"):
                                tokens = event["usage"]["completion_tokens"]
                            for choice in event.get("choices") or []:
                                finish = choice.get("finish_reason") or finish
                    results.append((r.status_code, finish, tokens))
            except httpx.HTTPError as exc:
                results.append((0, f"transport: {exc!r}", tokens))
            stop.wait(1.0)  # leave the two cores some room for the replacements to start

    threads = [threading.Thread(target=load, daemon=True)]  # one client, back to back
    for t in threads:
        t.start()
    try:
        cluster.deploy(app_config(int(service.rsplit(":", 1)[1]), near_max_tokens=64), "tierserve-v2.yaml")
        # Serve reports RUNNING once the new replicas serve; the old ones may still be draining.
        assert wait_for(lambda: len(cluster.replicas("tier-near")) == 1, timeout=300, interval=2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)

    assert len(results) >= 3, results
    assert all(r == (200, "length", 48) for r in results), [r for r in results if r != (200, "length", 48)]
    # The new config is the one serving: `near` now allows at most 64 tokens.
    r = httpx.post(f"{service}/v1/completions", json={"model": "near", "prompt": "Hi", "max_tokens": 100}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
