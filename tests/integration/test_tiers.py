"""The embedded default's two tiers: each named by `model`, each with its own serving profile."""

import openai
import pytest

from .conftest import TIERS

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "Name three colours."}]
# An answer that repeats its prompt, so n-gram lookup finds drafts too.
ECHO = [{"role": "user", "content": "Repeat exactly: the quick brown fox jumps over the lazy dog."}]


def test_tiers_endpoint_describes_each_profile(http):
    data = {t["name"]: t for t in http.get("/v1/tiers").json()["data"]}
    assert list(data) == TIERS
    small, quality = data["small"], data["quality"]
    assert (small["max_model_len"], small["max_completion_tokens"]) == (2048, 512)
    assert (quality["max_model_len"], quality["max_completion_tokens"]) == (8192, 4096)
    assert small["speculation"] is None
    # The distilled draft when `tierserve models distill` has run, n-gram lookup until then.
    assert quality["speculation"] == "ngram" or quality["speculation"].startswith("draft_model ")
    for tier in data.values():
        assert tier["tensor_parallel_size"] == 1 and tier["stats"]["failed"] == 0


def test_speculating_tier_reports_acceptance_per_request_and_per_tier(client, http):
    reply = client.chat.completions.create(model="quality", messages=ECHO, max_tokens=24, temperature=0)
    assert reply.model == "quality" and reply.choices[0].message.content
    spec = reply.usage.model_extra["speculation"]
    # Adaptive speculation may have switched drafting off for one stream (when the distilled
    # draft does not pay); the counts stay consistent either way.
    assert 0 <= spec["accepted_tokens"] <= spec["draft_tokens"] <= 3 * spec["steps"]
    if spec["steps"]:
        assert spec["mean_accepted_length"] == pytest.approx(1 + spec["accepted_tokens"] / spec["steps"], abs=1e-3)
    stats = {t["name"]: t["stats"] for t in http.get("/v1/tiers").json()["data"]}
    assert stats["quality"]["generation_tokens"] >= reply.usage.completion_tokens
    assert stats["quality"]["speculation"]["draft_tokens"] >= spec["draft_tokens"]
    assert stats["small"]["speculation"] is None and stats["small"]["speculation_control"] is None
    # configs/local.yaml: adaptive, starting from disable_above_batch_size: 4 (max_num_seqs 16).
    buckets = stats["quality"]["speculation_control"]
    assert [(b["first_batch_size"], b["last_batch_size"]) for b in buckets] == [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16)]
    assert buckets[0]["speculating_steps"] + buckets[0]["plain_steps"] > 0  # one stream: measured
    assert all(b["num_speculative_tokens"] in (0, 3) for b in buckets)


def test_speculating_tier_gives_the_same_greedy_answer_and_survives_top_k(client):
    plain = client.chat.completions.create(model="small", messages=ECHO, max_tokens=24, temperature=0)
    spec = client.chat.completions.create(model="quality", messages=ECHO, max_tokens=24, temperature=0)
    assert spec.choices[0].message.content == plain.choices[0].message.content
    assert "speculation" not in (plain.usage.model_extra or {})
    # A top_k request in a step without drafts once killed vLLM's CPU engine (actors/vllm_fixes.py).
    for _ in range(2):
        top1 = client.chat.completions.create(
            model="quality", messages=ECHO, max_tokens=24, temperature=1.5, seed=3, extra_body={"top_k": 1}
        )
        assert top1.choices[0].message.content == plain.choices[0].message.content


def test_completion_limit_is_per_tier(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="small", messages=QUESTION, max_tokens=600)
    assert err.value.body["param"] == "max_tokens" and "at most 512 tokens" in err.value.body["message"]
    reply = client.chat.completions.create(model="quality", messages=QUESTION, max_tokens=600, temperature=0)
    assert reply.usage.completion_tokens <= 600


def test_min_p_is_refused_where_speculation_would_ignore_it(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="quality", messages=QUESTION, max_tokens=4, extra_body={"min_p": 0.1})
    assert err.value.body["param"] == "min_p"
    plain = client.chat.completions.create(model="small", messages=QUESTION, max_tokens=4, extra_body={"min_p": 0.1})
    assert plain.choices[0].message.content


def test_router_profile_records_each_tiers_fitted_step_costs_for_the_simulator(app, client, tmp_path):
    """`tierserve router profile` against the running service, and the simulator loads what it wrote."""
    import subprocess
    import sys

    from tierserve.router.simengine import load_profiles

    client.chat.completions.create(model="small", messages=QUESTION, max_tokens=8)  # steps to fit
    out = tmp_path / "profile.json"
    command = [sys.executable, "-m", "tierserve.cluster.cli", "router", "profile", "--url", app.http, "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    profiles = load_profiles(out)
    assert set(profiles) == set(TIERS)
    assert (profiles["small"].max_num_seqs, profiles["small"].max_model_len) == (32, 2048)
    assert profiles["small"].priority_scheduling and profiles["small"].step_ms_base > 0
    assert f"small: step = {profiles['small'].step_ms_base:.2f}" in run.stdout
