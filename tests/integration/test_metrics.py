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

    def updated():
        now = scrape(app.metrics)
        done = total(now, "ray_tierserve_requests_total", tier="small", outcome="ok") - total(
            before, "ray_tierserve_requests_total", tier="small", outcome="ok"
        )
        sampled = any(s.labels.get("tier") == "quality" for s in now.get("ray_tierserve_running_requests", []))
        drafted = total(now, "ray_tierserve_speculation_draft_tokens_total", tier="quality") >= 1
        return now if done >= 2 and sampled and drafted and "ray_tierserve_speculation_k" in now else None

    now = wait_for(updated, timeout=60, interval=1.0)
    assert now, "tierserve series did not reach the metrics endpoint within 60 s"

    def grew(name: str, **labels: str) -> float:
        return total(now, name, **labels) - total(before, name, **labels)

    assert grew("ray_tierserve_requests_total", tier="quality", entry="chat", outcome="ok") >= 1
    assert grew("ray_tierserve_requests_total", tier="small", entry="completion", outcome="ok") >= 1
    assert grew("ray_tierserve_routing_decisions_total", tier="small", reason="default") >= 1
    assert grew("ray_tierserve_routing_decisions_total", tier="quality", reason="named") >= 1
    assert grew("ray_tierserve_errors_total", code="model_not_found", status="404") >= 1
    for histogram in (
        "ray_tierserve_time_to_first_token_seconds",
        "ray_tierserve_request_duration_seconds",
        "ray_tierserve_tier_time_to_first_token_seconds",
        "ray_tierserve_inter_token_latency_seconds",
        "ray_tierserve_time_per_output_token_seconds",
    ):
        assert grew(f"{histogram}_count", tier="small") >= 1, histogram
    assert grew("ray_tierserve_tokens_total", tier="quality", kind="output") >= 8
    assert grew("ray_tierserve_tokens_total", tier="quality", kind="input") >= 1
    assert grew("ray_tierserve_tier_request_duration_seconds_count", tier="small", outcome="finished") >= 2
    assert total(now, "ray_tierserve_waiting_requests", tier="small") >= 0
    # The quality tier speculates adaptively: it starts with drafts on, so it has drafted since
    # it started (waited for above), and reports k per batch-size bucket. Whether this test's
    # request drafted depends on what the controller decided from earlier traffic (off for one
    # stream is what it measures on these CPUs), so a request without drafts needs k=0 there.
    k = {s.labels["batch_sizes"]: s.value for s in now["ray_tierserve_speculation_k"] if s.labels["tier"] == "quality"}
    assert {"1-1", "9-16"} <= set(k)
    if grew("ray_tierserve_speculation_draft_tokens_total", tier="quality") == 0:
        assert k["1-1"] == 0, k
