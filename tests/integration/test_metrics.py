"""Prometheus metrics: the node's metrics endpoint (Ray's metrics export), scraped over HTTP and
parsed with prometheus_client's own text-format parser, has tierserve's series for the requests
this test sends."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import wait_for

pytestmark = pytest.mark.integration


def scrape(url: str) -> dict[str, list]:
    """Samples by sample name (`..._total`, `..._bucket`, ...), tierserve's and Ray Serve's."""
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_requests_show_up_in_the_metrics_a_prometheus_scrapes(app, client):
    before = scrape(app.metrics)
    # Repetitive, so that n-gram lookup (quality's speculation before a draft is distilled) drafts.
    repeat = "Repeat after me: red green blue, red green blue, red green blue, red green blue."
    for model in ("small", "quality"):
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": repeat}], max_tokens=16, temperature=0
        )
    stream = client.completions.create(model="auto", prompt="Count: one, two,", max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-tier", messages=[{"role": "user", "content": "x"}])

    # What these requests must have added, as (series, labels, at least). Each process exports
    # its series on its own schedule, so wait until all of them are there.
    expected = [
        ("ray_tierserve_requests_total", {"tier": "quality", "entry": "chat", "outcome": "finished"}, 1),
        ("ray_tierserve_requests_total", {"tier": "small", "entry": "completion", "outcome": "finished"}, 1),
        ("ray_tierserve_requests_total", {"tier": "small", "outcome": "finished"}, 2),
        ("ray_tierserve_routing_decisions_total", {"tier": "small", "reason": "complexity"}, 1),
        ("ray_tierserve_routing_decisions_total", {"tier": "quality", "reason": "named"}, 1),
        ("ray_tierserve_prompt_complexity_count", {"tier": "small"}, 1),
        ("ray_tierserve_slo_requests_total", {"sla_class": "standard", "outcome": "met"}, 2),
        ("ray_tierserve_estimated_cost_total", {"tier": "quality"}, 1e-12),
        ("ray_tierserve_errors_total", {"code": "model_not_found", "status": "404"}, 1),
        ("ray_tierserve_tokens_total", {"tier": "quality", "kind": "output"}, 8),
        ("ray_tierserve_tokens_total", {"tier": "quality", "kind": "input"}, 1),
        ("ray_tierserve_tier_request_duration_seconds_count", {"tier": "small", "outcome": "finished"}, 2),
        *(
            (f"{histogram}_count", {"tier": "small"}, 1)
            for histogram in (
                "ray_tierserve_time_to_first_token_seconds",
                "ray_tierserve_request_duration_seconds",
                "ray_tierserve_tier_time_to_first_token_seconds",
                "ray_tierserve_inter_token_latency_seconds",
                "ray_tierserve_time_per_output_token_seconds",
            )
        ),
    ]

    def missing(now: dict[str, list]) -> list[str]:
        short = [
            f"{name}{labels} grew {total(now, name, **labels) - total(before, name, **labels)} < {least}"
            for name, labels, least in expected
            if total(now, name, **labels) - total(before, name, **labels) < least
        ]
        if not any(s.labels.get("tier") == "quality" for s in now.get("ray_tierserve_running_requests", [])):
            short.append("ray_tierserve_running_requests{tier=quality} not sampled")
        if total(now, "ray_tierserve_speculation_draft_tokens_total", tier="quality") < 1:
            short.append("ray_tierserve_speculation_draft_tokens_total{tier=quality} absent")
        if "ray_tierserve_speculation_k" not in now:
            short.append("ray_tierserve_speculation_k absent")
        return short

    now = wait_for(lambda: (lambda n: None if missing(n) else n)(scrape(app.metrics)), timeout=60, interval=1.0)
    assert now, f"within 60 s the metrics endpoint still lacked: {missing(scrape(app.metrics))}"

    def grew(name: str, **labels: str) -> float:
        return total(now, name, **labels) - total(before, name, **labels)

    assert total(now, "ray_tierserve_waiting_requests", tier="small") >= 0
    # The quality tier speculates adaptively: it starts with drafts on, so it has drafted since
    # it started (waited for above), and reports k per batch-size bucket. Whether this test's
    # request drafted depends on what the controller decided from earlier traffic (off for one
    # stream is what it measures on these CPUs), so a request without drafts needs k=0 there.
    k = {s.labels["batch_sizes"]: s.value for s in now["ray_tierserve_speculation_k"] if s.labels["tier"] == "quality"}
    assert {"1-1", "9-16"} <= set(k)
    if grew("ray_tierserve_speculation_draft_tokens_total", tier="quality") == 0:
        assert k["1-1"] == 0, k
