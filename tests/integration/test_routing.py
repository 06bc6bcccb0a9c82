"""The router through the real stack: `model: auto` by complexity and budget on the shared app;
load shedding and fallback on small apps of tiny random-weight tiers deployed beside it."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

from tierserve.core.errors import Overloaded, unwrap_error

from .conftest import run_app, wait_for
from .tiny_models import build_tiny_llama

pytestmark = pytest.mark.integration

EASY = "Say hello to my friend Sam."
HARD = (
    "Prove that there are infinitely many prime numbers, then write a Python function that "
    "returns the n-th prime efficiently, and explain step by step why its running time is what it is."
)


def chat(client, content: str, **extra):
    return client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0, **extra
    )


def test_auto_sends_easy_prompts_to_small_and_hard_ones_to_quality(client):
    for prompt, tier in ((EASY, "small"), (HARD, "quality")):
        raw = chat(client, prompt)
        body = raw.parse()
        assert raw.headers["x-tierserve-tier"] == tier == body.model
        assert raw.headers["x-tierserve-route-reason"] == "complexity"
        extension = body.model_extra["tierserve"]
        assert extension["tier"] == tier and extension["target_tier"] == tier
        assert float(raw.headers["x-tierserve-complexity"]) == pytest.approx(extension["complexity"], abs=1e-3)
        assert extension["fallback_from"] == [] and extension["sla_class"] == "standard"
        usage = body.usage
        assert extension["estimated_cost"] > 0
        assert extension["estimated_cost"] == pytest.approx(
            expected_cost(tier, usage.prompt_tokens, usage.completion_tokens), rel=1e-6
        )


def expected_cost(tier: str, prompt: int, completion: int) -> float:
    from tierserve.cluster.config import load_config

    cost = load_config(check_engine=False).routing.tiers[tier].cost
    return (prompt * cost.input_per_million + completion * cost.output_per_million) / 1e6


def test_a_prompt_too_long_for_small_goes_to_the_tier_with_the_context_for_it(client):
    # `batch` (no budget): on a slow CPU no tier is predicted to meet the standard budget for
    # 1,800 words, and the reason would be best_effort; this test is about the context.
    raw = client.completions.with_raw_response.create(
        model="auto", prompt="word " * 1800, max_tokens=2, extra_body={"sla_class": "batch"}
    )
    assert raw.headers["x-tierserve-tier"] == "quality"
    target = raw.parse().model_extra["tierserve"]["target_tier"]
    assert raw.headers["x-tierserve-route-reason"] == ("target_context" if target == "small" else "complexity")


def test_a_named_tier_is_served_there_whatever_the_prompt(client):
    raw = client.chat.completions.with_raw_response.create(
        model="small", messages=[{"role": "user", "content": HARD}], max_tokens=4
    )
    assert raw.headers["x-tierserve-tier"] == "small" and raw.headers["x-tierserve-route-reason"] == "named"
    assert "x-tierserve-complexity" not in raw.headers


def test_sla_class_and_budgets_from_body_or_headers(client):
    raw = chat(client, EASY, extra_body={"sla_class": "interactive"})
    assert raw.headers["x-tierserve-sla-class"] == "interactive"
    assert raw.parse().model_extra["tierserve"]["slo_ttft_ms"] == 1000
    raw = chat(client, EASY, extra_headers={"x-sla-class": "batch"})
    assert raw.headers["x-tierserve-sla-class"] == "batch"
    raw = chat(client, EASY, extra_headers={"x-slo-ttft-ms": "1500", "x-slo-tpot-ms": "80"})
    extension = raw.parse().model_extra["tierserve"]
    assert (extension["sla_class"], extension["slo_ttft_ms"], extension["slo_tpot_ms"]) == ("custom", 1500, 80)
    assert float(raw.headers["x-tierserve-predicted-ttft-ms"]) > 0


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"extra_body": {"sla_class": "platinum"}}, "sla_class"),
        ({"extra_headers": {"x-sla-class": "platinum"}}, "sla_class"),
        ({"extra_headers": {"x-slo-ttft-ms": "soon"}}, "x-slo-ttft-ms"),
        ({"extra_headers": {"x-slo-tpot-ms": "-5"}}, "x-slo-tpot-ms"),
        ({"extra_body": {"slo_ttft_ms": 0}}, "slo_ttft_ms"),
    ],
)
def test_bad_budgets_are_a_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, EASY, **extra)
    error = err.value.body
    assert err.value.status_code == 400 and error["param"] == param, error


def test_the_stream_says_where_it_went_and_ends_with_the_cost(app):
    body = {"model": "auto", "messages": [{"role": "user", "content": HARD}], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{app.http}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["x-tierserve-tier"] == "quality"
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["tierserve"]["tier"] == "quality" and last["tierserve"]["estimated_cost"] > 0


def test_tiers_show_the_routers_view(http):
    def polled():
        data = http.get("/v1/tiers").json()["data"]
        return data if all(t["router"]["load"] for t in data) else None

    data = wait_for(polled, timeout=30, interval=0.5)
    assert data, "the router never polled the tiers' load"
    for tier in data:
        router = tier["router"]
        assert router["healthy"] and router["load"]["max_num_seqs"] >= 1 and router["load"]["max_model_len"] > 0
        assert router["load"]["step_ms_base"] > 0


def test_the_output_guards_hold_on_the_first_word_counts_in_predicted_first_tokens(client, http):
    """The output guard holds the first word back until the next token shows it ended (it could
    grow into an e-mail address), so the caller's first text leaves at least one engine step after
    the tier's first token: the router measures that hold and adds it to what it predicts."""
    stream = client.chat.completions.create(
        model="small",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()
    small = {t["name"]: t for t in http.get("/v1/tiers").json()["data"]}["small"]["router"]
    # A decayed mean over this ingress's answers (this one held 1+ steps; others may be held less).
    assert small["hold_steps"] > 0


# ----- apps of tiny tiers beside the shared one ----------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tierserve.actors.checkpoints import prepare_embedded

    tokenizer = prepare_embedded("smollm2-135m-instruct", progress=False)
    root = tmp_path_factory.mktemp("tiny-routing")
    return build_tiny_llama(root / "tiny", tokenizer, hidden=64, layers=1, heads=2, kv_heads=2, seed=0)


def tier(name: str, model, max_model_len: int = 512, max_num_seqs: int = 4, **deployment) -> dict:
    return {
        "name": name,
        "model": str(model),
        "engine": {
            "dtype": "float32",
            "enforce_eager": True,
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
        },
        "deployment": {"num_cpus": 1, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}, **deployment},
    }


def deploy(app, name: str, tiers: list[dict], routing: dict) -> str:

    from tierserve.cluster.app import build_application
    from tierserve.cluster.config import parse_config

    config = parse_config(
        {"name": name, "tiers": tiers, "routing": routing, "ingress": {"deployment": {"num_cpus": 0}}}
    )
    base = run_app(app, build_application(config), name)
    ready = wait_for(
        lambda: all(t["router"]["load"] for t in httpx.get(f"{base}/v1/tiers", timeout=30).json()["data"]), timeout=60
    )
    assert ready, "the router never polled the tiers"
    return base


def test_a_full_tier_sheds_load_at_once_with_429_and_retry_after(app, tiny):
    from ray import serve

    base = deploy(
        app,
        "routing-shed",
        [tier("one", tiny, max_num_seqs=1)],
        {"tiers": {"one": {"max_queue": 0}}, "default_sla_class": None},
    )
    try:
        long = {"model": "auto", "prompt": "Once", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=long, timeout=120) as busy:
            assert busy.status_code == 200
            lines = busy.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # the slot is taken now
            start = time.perf_counter()
            r = httpx.post(
                f"{base}/v1/completions", json={"model": "auto", "prompt": "Hi", "max_tokens": 4}, timeout=30
            )
            elapsed = time.perf_counter() - start
            assert r.status_code == 429, r.text
            # At once: refused while the busy stream holds the slot, not after waiting for it
            # (400 tokens take several seconds). How fast a refusal is under load is measured
            # by bench/overload.py (docs/reliability.md), not by a timed test.
            assert elapsed < 2.0, f"shedding took {elapsed * 1e3:.0f} ms"
            assert next(line for line in lines if line.startswith("data: ")) != "data: [DONE]"  # still busy
            assert int(r.headers["retry-after"]) >= 1
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "overloaded")
            # The handle API raises the typed error.
            handle = serve.get_app_handle("routing-shed")
            with pytest.raises(Exception) as err:
                handle.complete.remote({"model": "auto", "prompt": "Hi", "max_tokens": 4}).result(timeout_s=30)
            assert isinstance(unwrap_error(err.value), Overloaded)
            assert unwrap_error(err.value).retry_after_s >= 1
        # The slot is free again once the long request is gone.
        served = wait_for(
            lambda: (
                httpx.post(
                    f"{base}/v1/completions", json={"model": "one", "prompt": "Hi", "max_tokens": 4}, timeout=30
                ).status_code
                == 200
            ),
            timeout=30,
        )
        assert served
    finally:
        serve.delete("routing-shed")


def test_request_timeout_is_a_504_or_a_final_stream_error(app, tiny):
    from ray import serve

    base = deploy(app, "routing-timeout", [tier("slowish", tiny)], {"request_timeout_s": 0.2})
    try:
        long = {"model": "auto", "prompt": "Once", "max_tokens": 500, "ignore_eos": True}
        r = httpx.post(f"{base}/v1/completions", json=long, timeout=60)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout" and r.json()["error"]["type"] == "timeout_error"
        with httpx.stream("POST", f"{base}/v1/completions", json={**long, "stream": True}, timeout=60) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
    finally:
        serve.delete("routing-timeout")


def engine_core_of(app_name: str, tier_name: str) -> psutil.Process:
    marker = f"{app_name}:tier-{tier_name}"  # the replica's process title: ray::ServeReplica:APP:DEPLOYMENT
    (replica,) = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    (core,) = [c for c in replica.children(recursive=True) if "EngineCore" in " ".join(c.cmdline())]
    return core


def test_fallback_before_the_first_token_and_never_after(app, tiny):
    from ray import serve

    name = "routing-fallback"
    base = deploy(
        app,
        name,
        [
            tier("narrow", tiny, max_model_len=256, health_check_period_s=2, health_check_timeout_s=10),
            tier("wide", tiny, max_model_len=512),
        ],
        {"default_sla_class": None},
    )
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        # A prompt that looks short by its characters (~100 tokens at 4 per token) but is 400:
        # `narrow` (the default tier, 256 tokens of context) refuses it before any token, and
        # `wide` serves it.
        prompt = "7 " * 200
        raw = client.completions.with_raw_response.create(model="auto", prompt=prompt, max_tokens=4)
        assert raw.headers["x-tierserve-tier"] == "wide"
        assert raw.headers["x-tierserve-route-reason"] == "fallback"
        assert raw.headers["x-tierserve-fallback-from"] == "narrow"
        assert raw.parse().model_extra["tierserve"]["fallback_from"] == [
            {"tier": "narrow", "error": "context_length_exceeded"}
        ]
        # Named, it goes to `narrow` only, and fails there.
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="narrow", prompt=prompt, max_tokens=4)

        # After streaming began there is no retry: the stream ends with an error event.
        core = engine_core_of(name, "narrow")
        body = {"model": "auto", "prompt": "Once", "max_tokens": 250, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
            assert r.headers["x-tierserve-tier"] == "narrow"
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        core.send_signal(signal.SIGKILL)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "engine_unavailable"
        texts = [json.loads(e)["model"] for e in events[:-2]]
        assert set(texts) == {"narrow"}, "tokens from two tiers in one stream"

        # Before streaming: the dead tier is skipped (marked unhealthy by the failure or the
        # router's poll) and `wide` answers.
        raw = client.completions.with_raw_response.create(model="auto", prompt="Hello", max_tokens=4)
        assert raw.headers["x-tierserve-tier"] == "wide"
        assert raw.headers["x-tierserve-route-reason"] in ("fallback", "target_unhealthy")

        # Serve replaces the replica; the router sees it healthy again and routes back.
        def back():
            r = client.completions.with_raw_response.create(model="auto", prompt="Hello", max_tokens=4)
            return r.headers["x-tierserve-tier"] == "narrow"

        assert wait_for(back, timeout=300, interval=2), "the router never routed back to the recovered tier"
    finally:
        serve.delete(name)


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_a_priority_scheduled_engine_gives_a_free_slot_to_the_more_urgent_class(app, policy):
    """One slot, taken; a `batch` request queues, then an `interactive` one. When the slot frees,
    a first-come-first-served engine starts the batch request, a priority-scheduled one (SLA
    class priorities: interactive 0, batch 2) the interactive request."""
    from ray import serve

    from tierserve.actors.checkpoints import prepare_embedded

    # SmolLM2 itself, not the tiny model: its 1000 tokens take long enough (tens of ms each on
    # one core) to hold the slot while the two requests queue.
    name = f"routing-{policy}"
    one = tier("one", prepare_embedded("smollm2-135m-instruct", progress=False), max_model_len=1024, max_num_seqs=1)
    one["engine"]["scheduling_policy"] = policy
    # No shedding by predicted lateness: the interactive request must queue behind the long one.
    base = deploy(app, name, [one], {"default_sla_class": None, "shed_over_budget": None})

    def load() -> dict:
        (view,) = httpx.get(f"{base}/v1/tiers", timeout=30).json()["data"]
        return view["router"]["load"]

    first_token: dict[str, float] = {}
    errors: list[str] = []

    def request(sla_class: str) -> None:
        body = {"model": "one", "prompt": "Once", "max_tokens": 8, "stream": True, "sla_class": sla_class}
        try:
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        first_token.setdefault(sla_class, time.perf_counter())
                if r.status_code != 200:
                    errors.append(f"{sla_class}: {r.status_code}")
        except httpx.HTTPError as exc:
            errors.append(f"{sla_class}: {exc!r}")

    threads = {c: threading.Thread(target=request, args=(c,), daemon=True) for c in ("batch", "interactive")}
    try:
        busy = {"model": "one", "prompt": "Once", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=busy, timeout=120) as holder:
            lines = holder.iter_lines()  # kept: dropping the iterator would close the stream
            next(line for line in lines if line.startswith("data: "))  # the slot is taken
            assert load()["priority_scheduling"] is (policy == "priority")
            threads["batch"].start()
            assert wait_for(lambda: load()["waiting"] == 1, timeout=30, interval=0.1), "the batch request never queued"
            threads["interactive"].start()
            assert wait_for(lambda: load()["waiting"] == 2, timeout=30, interval=0.1), (
                "the interactive one never queued"
            )
        # Leaving the stream aborts the holder's request: the slot is free.
        for t in threads.values():
            t.join(timeout=120)
        assert not errors and set(first_token) == {"batch", "interactive"}, (errors, first_token)
        first = min(first_token, key=first_token.get)
        assert first == ("interactive" if policy == "priority" else "batch"), first_token
    finally:
        serve.delete(name)
