"""`serve run configs/serve.yaml`, Ray Serve's own CLI on the shipped Serve config, starts the
embedded default on a new local cluster with this machine's own CPU count, as a new user would
run it (the README offers it). Nothing raises the cluster's logical CPUs: the config's
reservations must fit the 2 cores of the machine it is made for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tierserve.cluster.config import load_config

from .conftest import _free_port, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 600


def test_the_embedded_default_reserves_no_more_than_two_cores():
    config = load_config(REPO / "configs" / "local.yaml", check_engine=False)
    reserved = config.ingress.deployment.num_cpus + config.rag.deployment.num_cpus
    reserved += sum(tier.deployment.num_cpus for tier in config.tiers)
    assert reserved <= 2 and config.ray.num_cpus is None


def test_serve_run_starts_the_shipped_serve_config(tmp_path):
    shipped = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    port = _free_port()
    shipped["http_options"]["port"] = port  # the file's 8000 may be taken on a test machine; all else as shipped
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(shipped))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve-run.log", "wb")
    # `--address local` starts a new cluster as on a fresh machine (without it, Ray joins a running
    # one: the test app's). The cluster gets the machine's CPUs; the config's path is relative to
    # the repository, where a user runs the command.
    proc = subprocess.Popen(
        [str(BIN / "serve"), "run", "--address", "local", str(path)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, (tmp_path / "serve-run.log").read_text()[-4000:]
        try:
            return httpx.get(f"{base}/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_for(healthy, timeout=READY_TIMEOUT_S, interval=2), (tmp_path / "serve-run.log").read_text()[-4000:]
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120)
        reply = client.chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
        )
        assert "Paris" in reply.choices[0].message.content
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: Serve shuts down, the cluster with it
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
