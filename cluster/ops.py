"""Operating a deployed tierserve: deploy a config, read each tier's state, scale a tier.

Everything here goes through public interfaces a remote operator can reach: Ray's dashboard
(Serve's REST API, `GET`/`PUT /api/serve/applications/`, the same one `serve deploy` and
`serve status` use) and the ingress's own `GET /v1/tiers`. Deploying sends the Serve config
rendered from a tierserve config (`tierserve.cluster.manifests.serve_config`); Serve compares
it with what runs and updates in place. Scaling is a lightweight Serve update of one
deployment's `num_replicas` (or its autoscaling bounds): the other replicas keep running, and
the ingress sees the new count within `ingress.replicas_poll_interval_s`.

The pure functions (`scaled_config`, `status_rows`, `format_status`) take and return plain
JSON, so they are tested without a cluster; `ServeAdmin` is the thin HTTP part.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

SERVE_API = "/api/serve/applications/"
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


class OpsError(RuntimeError):
    """An operation that cannot be done as asked; the message says why and what to do."""


INGRESS_NAME = "ingress"
RETRIEVER_NAME = "retriever"


TIER_PREFIX = "tier-"


def tier_deployment_name(tier: str) -> str:
    """The Serve deployment that runs a tier (one per tier, named after it)."""
    return f"{TIER_PREFIX}{tier}"


# ----- scaling ---------------------------------------------------------------------------------


def deployed_config(details: dict[str, Any]) -> dict[str, Any]:
    """The Serve config (`ServeDeploySchema` as JSON) that Serve is running, rebuilt from
    `GET /api/serve/applications/`; declaratively deployed applications only."""
    apps = details.get("applications") or {}
    imperative = sorted(name for name, app in apps.items() if not app.get("deployed_app_config"))
    if imperative:
        raise OpsError(
            f"application(s) {', '.join(imperative)} were started from Python (`tierserve serve`, serve.run), "
            "not from a Serve config, so Serve has no config to update: deploy with `tierserve deploy` "
            "(or `serve deploy`) to scale in place"
        )
    config: dict[str, Any] = {"applications": [copy.deepcopy(app["deployed_app_config"]) for app in apps.values()]}
    if details.get("proxy_location"):
        config["proxy_location"] = details["proxy_location"]
    http = {k: v for k, v in (details.get("http_options") or {}).items() if k in ("host", "port")}
    if http:
        config["http_options"] = http
    return config


def scaled_config(
    details: dict[str, Any],
    app: str,
    tier: str,
    replicas: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
) -> dict[str, Any]:
    """The running Serve config with one tier's replicas changed: `replicas` for a tier with a
    fixed count, `min_replicas` / `max_replicas` for an autoscaling one (Serve refuses a fixed
    count beside an autoscaling config)."""
    app_details = (details.get("applications") or {}).get(app)
    if app_details is None:
        raise OpsError(
            f"no application {app!r} runs (running: {', '.join(details.get('applications') or {}) or 'none'})"
        )
    name = tier_deployment_name(tier)
    deployment = (app_details.get("deployments") or {}).get(name)
    if deployment is None:
        deployments = app_details.get("deployments") or {}
        tiers = sorted(d.removeprefix(TIER_PREFIX) for d in deployments if d.startswith(TIER_PREFIX))
        raise OpsError(f"application {app!r} has no tier {tier!r} (tiers: {', '.join(tiers)})")
    autoscaling = (deployment.get("deployment_config") or {}).get("autoscaling_config")
    if autoscaling and replicas is not None:
        raise OpsError(
            f"tier {tier!r} autoscales between {autoscaling.get('min_replicas')} and "
            f"{autoscaling.get('max_replicas')} replicas: set --min/--max instead of a count"
        )
    if not autoscaling and (min_replicas is not None or max_replicas is not None):
        raise OpsError(f"tier {tier!r} has a fixed number of replicas: give the count (tierserve scale {tier} N)")
    if replicas is None and min_replicas is None and max_replicas is None:
        raise OpsError("nothing to change: give a replica count, or --min/--max for an autoscaling tier")

    config = deployed_config(details)
    (app_config,) = [a for a in config["applications"] if a.get("name") == app]
    overrides = app_config.setdefault("deployments", [])
    override = next((d for d in overrides if d.get("name") == name), None)
    if override is None:
        override = {"name": name}
        overrides.append(override)
    if replicas is not None:
        if replicas < 1:
            raise OpsError("a tier needs at least one replica")
        override["num_replicas"] = replicas
    else:
        bounds = dict(autoscaling)
        bounds["min_replicas"] = bounds["min_replicas"] if min_replicas is None else min_replicas
        bounds["max_replicas"] = bounds["max_replicas"] if max_replicas is None else max_replicas
        if not 0 <= bounds["min_replicas"] <= bounds["max_replicas"] or bounds["max_replicas"] < 1:
            raise OpsError(
                f"need 0 <= min <= max and max >= 1, got min {bounds['min_replicas']}, max {bounds['max_replicas']}"
            )
        if bounds.get("initial_replicas") is not None:
            bounds["initial_replicas"] = min(
                max(bounds["initial_replicas"], bounds["min_replicas"]), bounds["max_replicas"]
            )
        override["autoscaling_config"] = bounds
    _validate(config)
    return config


def _validate(config: dict[str, Any]) -> None:
    """Serve's own schema, so a bad config fails here and not in the cluster."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)


# ----- status ----------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def status_rows(
    tiers: list[dict[str, Any]], details: dict[str, Any] | None = None, app: str = "tierserve"
) -> list[dict[str, Any]]:
    """One row per tier from the ingress's `GET /v1/tiers` (and, given Serve's details, the
    nodes its replicas run on)."""
    deployments = {}
    if details is not None:
        deployments = ((details.get("applications") or {}).get(app) or {}).get("deployments") or {}
    rows = []
    for t in tiers:
        router = t.get("router") or {}
        replicas = router.get("replicas") or {}
        load = router.get("load") or {}
        d = deployments.get(tier_deployment_name(t["name"])) or {}
        if not router.get("healthy"):
            load = {}  # the last load polled before it went down says nothing now
        nodes = sorted({r.get("node_ip") or "?" for r in d.get("replicas") or [] if r.get("state") == "RUNNING"})
        rows.append(
            {
                "tier": t["name"],
                "health": "ok" if router.get("healthy") else "down",
                "replicas": replicas.get("running"),
                "pending": replicas.get("pending"),
                "target": d.get("target_num_replicas"),
                "serve_status": replicas.get("status") or d.get("status"),
                "nodes": nodes,
                "in_flight": router.get("in_flight", 0),
                "engine_running": load.get("running"),
                "engine_waiting": load.get("waiting"),
                "ttft_ms": load.get("ttft_ms"),
                "tpot_ms": load.get("tpot_ms"),
                "error": router.get("last_error") if not router.get("healthy") else t.get("error"),
            }
        )
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of `status_rows`, with each unhealthy tier's reason under it."""
    head = ("TIER", "HEALTH", "REPLICAS", "NODES", "IN FLIGHT", "RUNNING/WAITING", "TTFT ms", "TPOT ms")
    table = [head]
    for r in rows:
        running = "?" if r["replicas"] is None else str(r["replicas"])
        target = f"/{r['target']}" if r["target"] is not None else ""
        pending = f" (+{r['pending']} pending)" if r["pending"] else ""
        engine = "-" if r["engine_running"] is None else f"{r['engine_running']}/{r['engine_waiting']}"
        table.append(
            (
                r["tier"],
                r["health"],
                f"{running}{target}{pending}",
                ",".join(r["nodes"]) or "-",
                str(r["in_flight"]),
                engine,
                _ms(r["ttft_ms"]),
                _ms(r["tpot_ms"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    for r in rows:
        if r["health"] != "ok" and r["error"]:
            lines.append(f"{r['tier']}: {_brief(r['error'])}")
    return "\n".join(lines)


def _brief(error: str) -> str:
    """A reason on one line: Serve's messages can carry a whole traceback, whose first and last
    lines say what happened and why."""
    parts = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return parts[0] if len(parts) < 2 else f"{parts[0]} ... {parts[-1]}"


# ----- HTTP ------------------------------------------------------------------------------------


def ray_auth_token() -> str | None:
    """The Ray cluster's token, where Ray's own clients look for it: `RAY_AUTH_TOKEN`, the file
    named by `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token` (Ray 2.60 enables token
    authentication by default; a cluster started with `RAY_AUTH_MODE=disabled` needs none)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@dataclass
class ServeAdmin:
    """Serve's REST API on a Ray dashboard (`ray start --head` serves it on port 8265)."""

    address: str = DEFAULT_DASHBOARD
    timeout_s: float = 30.0

    def _client(self) -> httpx.Client:
        token = ray_auth_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.address.rstrip("/"), timeout=self.timeout_s, headers=headers)

    def details(self) -> dict[str, Any]:
        try:
            with self._client() as c:
                r = c.get(SERVE_API)
        except httpx.HTTPError as exc:
            raise OpsError(f"cannot reach the Ray dashboard at {self.address}: {exc}") from None
        if r.status_code == 401:
            raise OpsError(
                f"{self.address}: the Ray dashboard wants the cluster's token ({r.text.strip()[:200]}); "
                "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
            )
        if r.status_code != 200:
            raise OpsError(f"{self.address}{SERVE_API}: HTTP {r.status_code}: {r.text[:500]}")
        return r.json()

    def deploy(self, config: dict[str, Any]) -> None:
        """Send a whole Serve config (`serve deploy`): Serve updates what changed, in place."""
        _validate(config)
        try:
            with self._client() as c:
                r = c.put(SERVE_API, json=config)
        except httpx.HTTPError as exc:
            raise OpsError(f"cannot reach the Ray dashboard at {self.address}: {exc}") from None
        if r.status_code != 200:
            raise OpsError(f"Serve refused the config: HTTP {r.status_code}: {r.text[:2000]}")

    def wait_running(self, app: str, timeout_s: float, since: float = 0.0, interval_s: float = 2.0) -> dict[str, Any]:
        """Poll until `app` is RUNNING after a deploy sent at `since` (Unix time); raise on
        DEPLOY_FAILED or after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        last = "not listed yet"
        while time.monotonic() < deadline:
            app_details = (self.details().get("applications") or {}).get(app)
            if app_details is not None:
                status, message = app_details.get("status"), app_details.get("message") or ""
                deployed_at = app_details.get("last_deployed_time_s") or 0.0
                last = f"{status} {message}".strip()
                if deployed_at >= since - 1 and status == "RUNNING":
                    return app_details
                if deployed_at >= since - 1 and status == "DEPLOY_FAILED":
                    raise OpsError(f"deploying {app!r} failed: {message}")
            time.sleep(interval_s)
        raise OpsError(f"{app!r} is not running after {timeout_s:g}s: {last}")


def wait_serving(url: str, timeout_s: float, interval_s: float = 0.5) -> str:
    """Poll the ingress's `GET /health` at `url` (the service's base) until every tier serves;
    return its last `status` (`ok`, or `degraded` / `unavailable` / why it did not answer after
    `timeout_s`). Serve reports an application running as soon as its replicas are; the
    ingress's router sees its tiers within a poll interval after, and `/health` says so."""
    deadline = time.monotonic() + timeout_s
    status = "no answer"
    while True:
        try:
            r = httpx.get(url.rstrip("/") + "/health", timeout=max(interval_s, 10.0))
            status = str(r.json().get("status", f"HTTP {r.status_code}"))
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            status = f"no answer ({type(exc).__name__})"
        if status == "ok" or time.monotonic() >= deadline:
            return status
        time.sleep(interval_s)


def ingress_tiers(url: str, timeout_s: float = 30.0, api_key: str | None = None) -> list[dict[str, Any]]:
    """The ingress's `GET /v1/tiers` at `url` (the service's base, e.g. http://127.0.0.1:8000),
    with an admin-scope API key when auth is on (default `$TIERSERVE_API_KEY`)."""
    api_key = api_key or os.environ.get("TIERSERVE_API_KEY")
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    try:
        r = httpx.get(url.rstrip("/").removesuffix("/v1") + "/v1/tiers", timeout=timeout_s, headers=headers)
    except httpx.HTTPError as exc:
        raise OpsError(f"cannot reach tierserve at {url}: {exc}") from None
    if r.status_code != 200:
        raise OpsError(f"{url}/v1/tiers: HTTP {r.status_code}: {r.text[:500]}")
    return r.json()["data"]
