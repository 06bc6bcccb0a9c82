"""A caller that goes away mid-stream gets its engine request aborted, over HTTP and over a handle."""

import httpx
import pytest

from .conftest import wait_for

pytestmark = pytest.mark.integration

LONG = {"model": "auto", "prompt": "Tell me a very long story.", "max_tokens": 512, "ignore_eos": True, "stream": True}


def idle_with_more_aborts(tier_handle, before: int):
    stats = tier_handle.stats.remote().result()
    return stats if stats.aborted > before and stats.running == 0 else None


def test_http_disconnect_aborts_the_engine_request(app, tier_handle):
    before = tier_handle.stats.remote().result()
    with httpx.Client(base_url=app.http, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=LONG) as r:
            assert r.status_code == 200
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events >= 5:
                    break
    # The connection is closed here, long before 512 tokens could have been generated.
    after = wait_for(lambda: idle_with_more_aborts(tier_handle, before.aborted), timeout=30)
    assert after, f"engine request was not aborted: {tier_handle.stats.remote().result()}"
    assert after.finished == before.finished


def test_handle_cancellation_aborts_the_engine_request(ingress_handle, tier_handle):
    before = tier_handle.stats.remote().result()
    stream = ingress_handle.options(stream=True).complete_stream.remote({**LONG})
    for i, _ in enumerate(stream):
        if i >= 5:
            break
    stream.cancel()
    after = wait_for(lambda: idle_with_more_aborts(tier_handle, before.aborted), timeout=30)
    assert after, f"engine request was not aborted: {tier_handle.stats.remote().result()}"
