"""configs/grafana-dashboard.json and configs/prometheus.yml: well-formed, and the dashboard
queries only series tierserve defines (or Ray Serve's own)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def defined_metrics() -> set[str]:
    names = set()
    for module in ("actors/metrics.py", "router/metrics.py", "rag/metrics.py", "safety/metrics.py"):
        names |= set(re.findall(r'"(tierserve_[a-z_]+)"', (REPO / module).read_text()))
    return names


def test_every_dashboard_query_names_a_defined_series():
    dashboard = json.loads((REPO / "configs" / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] == "tierserve" and dashboard["panels"]
    defined = defined_metrics()
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            queried |= set(re.findall(r"\bray_(tierserve_[a-z_]+)", target["expr"]))
    base = {re.sub(r"_(total|bucket|count|sum)$", "", q) for q in queried}
    assert base and base <= defined, base - defined
    assert base == defined  # every series is on the board


def test_prometheus_config_scrapes_rays_metrics_export():
    config = yaml.safe_load((REPO / "configs" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
