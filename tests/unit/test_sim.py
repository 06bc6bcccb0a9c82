"""The routing simulator on tiny hand-built scenarios whose answers can be worked out by hand."""

import asyncio
import random

import pytest

from tierserve.router.config import RoutingConfig
from tierserve.router.sim import Arrival, Event, Outcome, poisson_arrivals, simulate, summarize
from tierserve.router.simengine import (
    FrontEnd,
    SimulationStalled,
    TierProfile,
    TierSpec,
    VirtualClockLoop,
    load_profiles,
    save_profiles,
)

# 10 ms a step whatever the batch, 20 ms more per 1,000 prompt tokens prefilled; no noise.
STEADY = TierProfile(10.0, 0.0, 20.0, max_num_seqs=4, max_model_len=4096, step_noise=0.0)
ROUTING = RoutingConfig.model_validate(
    {
        "tiers": {
            "fast": {"min_complexity": 0.0, "cost": {"input_per_million": 1, "output_per_million": 2}},
            "strong": {"min_complexity": 0.5, "cost": {"input_per_million": 10, "output_per_million": 20}},
        },
        "sla_classes": {"interactive": {"ttft_ms": 100, "tpot_ms": 20, "priority": 0}, "batch": {"priority": 2}},
        "default_sla_class": "interactive",
    }
)
TWO = [TierSpec("fast", STEADY), TierSpec("strong", STEADY)]


def test_the_clock_is_virtual_and_exact():
    loop = VirtualClockLoop()

    async def an_hour() -> float:
        await asyncio.sleep(3600)
        await asyncio.wait_for(asyncio.sleep(0.25), timeout=10)
        return loop.time()

    try:
        assert loop.run_until_complete(an_hour()) == pytest.approx(3600.25)
    finally:
        loop.close()


def test_a_simulation_that_waits_for_nothing_says_so():
    loop = VirtualClockLoop()
    try:
        with pytest.raises(SimulationStalled):
            loop.run_until_complete(asyncio.Event().wait())
    finally:
        loop.close()


def test_one_request_on_an_idle_engine():
    # Prefill step: 10 + 20 * 0.5 = 20 ms to the first token, then 4 decode steps of 10 ms.
    [out] = simulate([Arrival(1.0, 500, 5, tier="fast")], TWO, ROUTING).outcomes
    assert (out.status, out.tier, out.reason) == (200, "fast", "named")
    assert out.ttft_s == pytest.approx(0.020)
    assert out.tpot_s == pytest.approx(0.010)
    assert out.met  # within 100 ms to the first token and 20 ms a token
    assert out.cost == pytest.approx((500 * 1 + 5 * 2) / 1e6)


def test_the_ingress_time_counts_in_the_first_token():
    [out] = simulate([Arrival(0.0, 500, 5, tier="fast")], TWO, ROUTING, front=FrontEnd(request_ms=15)).outcomes
    assert out.ttft_s == pytest.approx(0.035)


def test_requests_queue_for_a_busy_front_end():
    arrivals = [Arrival(0.0, 500, 5, tier="fast"), Arrival(0.0, 500, 5, tier="strong")]
    first, second = simulate(arrivals, TWO, ROUTING, front=FrontEnd(request_ms=15)).outcomes
    assert first.ttft_s == pytest.approx(0.035)
    assert second.ttft_s == pytest.approx(0.050)  # its 15 ms start when the first's end
    # With two cores' worth the front end does each in half the time, one after the other.
    first, second = simulate(arrivals, TWO, ROUTING, front=FrontEnd(request_ms=15, cores=2)).outcomes
    assert (first.ttft_s, second.ttft_s) == (pytest.approx(0.0275), pytest.approx(0.035))


def test_tokens_reach_the_client_once_the_front_end_relays_them():
    # 5 ms a token, less than a 10 ms step: each token is relayed before the next is made.
    [out] = simulate([Arrival(0.0, 500, 5, tier="fast")], TWO, ROUTING, front=FrontEnd(token_ms=5)).outcomes
    assert (out.ttft_s, out.tpot_s) == (pytest.approx(0.025), pytest.approx(0.010))
    # 15 ms a token, more than a step: the front end is the bottleneck. Tokens made at 20, 30,
    # 40, 50 and 60 ms are relayed at 35, 50, 65, 80 and 95 ms.
    busy = FrontEnd(token_ms=15)
    [out] = simulate([Arrival(0.0, 500, 5, tier="fast")], TWO, ROUTING, front=busy).outcomes
    assert (out.ttft_s, out.tpot_s) == (pytest.approx(0.035), pytest.approx(0.015))
    # The same front end in the next run starts idle, as the run's clock starts at 0.
    [again] = simulate([Arrival(0.0, 500, 5, tier="fast")], TWO, ROUTING, front=busy).outcomes
    assert again.ttft_s == out.ttft_s


def test_a_full_engine_makes_the_next_request_wait_for_a_slot():
    one_slot = TierProfile(10.0, 0.0, 0.0, max_num_seqs=1, max_model_len=4096, step_noise=0.0)
    arrivals = [Arrival(0.0, 10, 3, tier="fast"), Arrival(0.0, 10, 3, tier="fast")]
    first, second = simulate(arrivals, [TierSpec("fast", one_slot)], RoutingConfig()).outcomes
    assert first.ttft_s == pytest.approx(0.010)
    # The first holds the slot for 3 steps; the second prefills in the 4th.
    assert second.ttft_s == pytest.approx(0.040)


def test_a_priority_scheduled_engine_gives_the_free_slot_to_the_urgent_request():
    one_slot = TierProfile(10.0, 0.0, 0.0, max_num_seqs=1, max_model_len=4096, step_noise=0.0)
    arrivals = [
        Arrival(0.0, 10, 5, "batch", tier="fast"),  # takes the slot
        Arrival(0.001, 10, 5, "batch", tier="fast"),
        Arrival(0.002, 10, 5, "interactive", tier="fast"),
    ]
    # Not shed: the router, with no step measured yet, would predict the urgent one late.
    routing = ROUTING.model_copy(update={"shed_over_budget": None})
    fcfs = simulate(arrivals, [TierSpec("fast", one_slot)], routing).outcomes
    assert [round(o.ttft_s * 1e3) for o in fcfs] == [10, 59, 108]
    priority = TierProfile(10.0, 0.0, 0.0, 1, 4096, priority_scheduling=True, step_noise=0.0)
    urgent = simulate(arrivals, [TierSpec("fast", priority)], routing).outcomes
    assert [round(o.ttft_s * 1e3) for o in urgent] == [10, 109, 58]


def test_serve_queues_for_the_tier_and_refuses_beyond_its_queue():
    one_slot = TierProfile(10.0, 0.0, 0.0, max_num_seqs=1, max_model_len=4096, step_noise=0.0)
    spec = TierSpec("fast", one_slot, replicas=2, max_ongoing_requests=1, max_queued_requests=1)
    # At 0 s, before the router's first load poll, so it admits all four.
    arrivals = [Arrival(0.0, 10, 3, tier="fast") for _ in range(4)]
    outcomes = simulate(arrivals, [spec], RoutingConfig()).outcomes
    assert [o.status for o in outcomes] == [200, 200, 200, 429]
    # Two run at once on the two replicas; the queued one takes the first place freed.
    assert [round(o.ttft_s * 1e3) for o in outcomes[:3]] == [10, 10, 40]


def test_the_router_sheds_what_no_queue_can_take():
    one_slot = TierProfile(10.0, 0.0, 0.0, max_num_seqs=1, max_model_len=4096, step_noise=0.0)
    routing = RoutingConfig.model_validate({"tiers": {"fast": {"max_queue": 0}}})
    # After the first load poll (before it the router knows no slots), two at once: the first
    # one's place is reserved when it is decided, so the second sees a full tier at once.
    arrivals = [Arrival(0.1, 10, 50, complexity=0.1), Arrival(0.1, 10, 50, complexity=0.1)]
    ok, shed = simulate(arrivals, [TierSpec("fast", one_slot)], routing).outcomes
    assert (ok.status, shed.status, shed.code) == (200, 429, "overloaded")
    assert shed.ttft_s is None


def test_with_shed_over_tpot_budget_a_tier_too_slow_for_the_budget_refuses_at_once():
    # 40 ms a step: twice an interactive request's 20 ms a token. A batch request first lets
    # the replica fit its step cost; then the interactive one is predicted at 40 ms a token.
    slow = TierProfile(40.0, 0.0, 0.0, max_num_seqs=4, max_model_len=4096, step_noise=0.0)
    budgets = {"interactive": {"ttft_ms": 1000, "tpot_ms": 20}, "batch": {"priority": 2}}
    arrivals = [Arrival(0.0, 10, 100, "batch"), Arrival(6.0, 10, 5, "interactive")]
    for shed, (status, met) in ((None, (200, False)), (1.5, (429, False))):
        routing = RoutingConfig(sla_classes=budgets, default_sla_class="batch", shed_over_tpot_budget=shed)
        warm, late = simulate(arrivals, [TierSpec("only", slow)], routing).outcomes
        assert warm.status == 200 and warm.met
        assert (late.status, late.met) == (status, met)
    assert late.code == "overloaded"


def test_complexity_picks_the_tier_and_round_robin_ignores_it():
    # `batch` has no latency budget: the choice is complexity's alone.
    arrivals = [Arrival(0.1 * i, 100, 4, "batch", c) for i, c in enumerate([0.1, 0.9, 0.2, 0.8])]
    routed = simulate(arrivals, TWO, ROUTING).outcomes
    assert [o.tier for o in routed] == ["fast", "strong", "fast", "strong"]
    assert {o.reason for o in routed} == {"complexity"}
    turns = simulate(arrivals, TWO, ROUTING, policy="round_robin").outcomes
    assert [o.tier for o in turns] == ["fast", "strong", "fast", "strong"]
    reversed_ = [Arrival(a.at_s, 100, 4, "batch", 1 - a.complexity) for a in arrivals]
    assert [o.tier for o in simulate(reversed_, TWO, ROUTING, policy="round_robin").outcomes] == [o.tier for o in turns]
    with pytest.raises(ValueError, match="policy"):
        simulate(arrivals, TWO, ROUTING, policy="best")


def test_a_lost_replica_falls_back_then_is_skipped_then_serves_again():
    arrivals = [
        Arrival(0.52, 100, 4, "batch", 0.1),  # before any poll has seen the death: fallback
        Arrival(5.0, 100, 4, "batch", 0.1),  # the router knows: straight to strong
        Arrival(20.0, 100, 4, "batch", 0.1),  # the replica is back
    ]
    kill = Event(0.51, "kill", "fast", detect_s=2.0, restart_s=10.0)
    before, during, after = simulate(arrivals, TWO, ROUTING, events=[kill]).outcomes
    assert (before.status, before.tier, before.reason) == (200, "strong", "fallback")
    assert (during.tier, during.reason) == ("strong", "target_unhealthy")
    assert (after.tier, after.reason) == ("fast", "complexity")


def test_a_replica_lost_mid_stream_ends_that_stream_with_an_error():
    arrivals = [Arrival(0.0, 100, 1000, tier="fast")]
    [out] = simulate(arrivals, TWO, ROUTING, events=[Event(1.0, "kill", "fast", restart_s=None)]).outcomes
    assert (out.status, out.code) == (503, "engine_unavailable") and out.ttft_s is not None
    assert summarize([out]).failed == 1.0 and summarize([out]).shed == 0.0


def test_a_slower_tier_doubles_its_steps():
    arrivals = [Arrival(0.0, 10, 11, tier="fast"), Arrival(10.0, 10, 11, tier="fast")]
    before, after = simulate(arrivals, TWO, ROUTING, events=[Event(5.0, "slow", "fast", factor=2.0)]).outcomes
    assert before.tpot_s == pytest.approx(0.010) and after.tpot_s == pytest.approx(0.020)


def test_a_replicas_fitted_model_is_its_profile():
    """What the router reads from a simulated replica is fitted from its steps, as on a real tier."""
    profile = TierProfile(12.0, 0.5, 30.0, max_num_seqs=8, max_model_len=4096, step_noise=0.0)
    rng = random.Random(0)
    arrivals = poisson_arrivals(40, 60, rng, lambda at, r: Arrival(at, r.randint(50, 800), r.randint(5, 60), tier="t"))
    [load] = simulate(arrivals, [TierSpec("t", profile)], RoutingConfig()).loads["t"]
    assert load.step_samples > 1000
    fitted = TierProfile.from_load(load, step_noise=0.0)
    assert fitted.step_ms_base == pytest.approx(12.0, rel=0.05)
    assert fitted.step_ms_per_seq == pytest.approx(0.5, rel=0.1)
    assert fitted.step_ms_per_kprompt == pytest.approx(30.0, rel=0.05)


def test_profiles_round_trip_through_their_file(tmp_path):
    path = tmp_path / "profile.json"
    profiles = {"fast": STEADY, "strong": TierProfile(25, 0.4, 60, 32, 8192, 1.7, True, 8192, 0.2, "published")}
    save_profiles(path, profiles)
    assert load_profiles(path) == profiles


def test_summary_counts_goodput_shedding_and_failures():
    from tierserve.router.policy import Sla

    sla = Sla("interactive", 100, 20)
    outcomes = [
        Outcome(Arrival(0, 10, 3), 200, tier="fast", ttft_s=0.05, tpot_s=0.01, tokens=3, cost=1.0, sla=sla),
        Outcome(Arrival(0, 10, 3), 200, tier="strong", ttft_s=0.5, tpot_s=0.01, tokens=3, cost=2.0, sla=sla),
        Outcome(Arrival(0, 10, 3), 429, "overloaded", sla=sla),
        Outcome(Arrival(0, 10, 3), 504, "first_token_timeout", sla=sla),
    ]
    s = summarize(outcomes)
    assert (s.requests, s.goodput, s.shed, s.failed) == (4, 0.25, 0.25, 0.25)
    assert s.tier_shares == {"fast": 0.5, "strong": 0.5}
    assert s.cost_per_1k_tokens == pytest.approx(1e3 * 3.0 / 26)
    assert s.ttft_p50_ms == pytest.approx(275.0)


def test_poisson_arrivals_keep_their_rate_also_when_it_varies():
    make = lambda at, rng: Arrival(at, 10, 10)  # noqa: E731
    steady = poisson_arrivals(100, 20, random.Random(1), make)
    assert 1800 < len(steady) < 2200 and all(0 <= a.at_s < 20 for a in steady)
    ramp = poisson_arrivals(lambda t: 10 * t, 20, random.Random(1), make, peak_rate=200)
    assert 1800 < len(ramp) < 2200  # the integral of 10 t over 20 s
    assert sum(a.at_s < 10 for a in ramp) < sum(a.at_s >= 10 for a in ramp) / 2
    with pytest.raises(ValueError, match="peak_rate"):
        poisson_arrivals(lambda t: 1.0, 1, random.Random(1), make)


def test_the_profile_command_reads_the_fitted_models_that_v1_tiers_reports():
    from tierserve.cluster.router_commands import tier_profiles

    load = {
        "running": 3,
        "waiting": 0,
        "max_num_seqs": 32,
        "max_model_len": 2048,
        "step_ms_base": 21.5,
        "step_ms_per_seq": 1.25,
        "step_ms_per_kprompt": 40.0,
        "tokens_per_step": 1.0,
        "step_samples": 5000,
        "priority_scheduling": True,
        "a_field_of_a_newer_version": 1,
    }
    listed = [
        {"name": "small", "router": {"load": load}},
        {"name": "quality", "router": {"load": {**load, "step_samples": 12}}},
        {"name": "down", "router": {"load": None}, "error": "no answer within 5s"},
    ]
    profiles, warnings = tier_profiles(listed, "test")
    assert set(profiles) == {"small", "quality"}
    assert profiles["small"] == TierProfile(21.5, 1.25, 40.0, 32, 2048, 1.0, True, source="test")
    assert any("quality" in w and "12 steps" in w for w in warnings)
    assert any("down" in w and "no answer" in w for w in warnings)


def test_router_simulate_runs_the_configs_router_on_profiled_tiers(tmp_path, capsys):
    from tierserve.cluster.cli import main

    path = tmp_path / "profile.json"
    save_profiles(path, {"small": STEADY, "quality": TierProfile(20.0, 0.5, 30.0, 16, 8192, step_noise=0.0)})
    argv = ["router", "simulate", "--profile", str(path), "--rate", "4", "--duration-s", "10"]
    assert main([*argv, "--replicas", "small=2", "--policy", "router", "--policy", "least_loaded"]) == 0
    out = capsys.readouterr().out
    assert "small x2, quality x1" in out
    assert "| router |" in out and "| least_loaded |" in out and "| random |" not in out
    assert main([*argv, "--replicas", "small=none"]) == 2
    (tmp_path / "partial.json").write_text(path.read_text().replace('"quality"', '"other"'))
    assert main(["router", "simulate", "--profile", str(tmp_path / "partial.json")]) == 2
    assert "no profile for tier 'quality'" in capsys.readouterr().err


def test_a_request_past_its_timeout_leaves_the_engine_and_the_next_one_is_served():
    routing = RoutingConfig.model_validate({"request_timeout_s": 0.5})
    arrivals = [Arrival(0.0, 10, 1000, tier="fast"), Arrival(2.0, 10, 5, tier="fast")]
    late, next_one = simulate(arrivals, [TierSpec("fast", STEADY)], routing).outcomes
    assert (late.status, late.code) == (504, "timeout") and late.ttft_s is not None
    assert next_one.status == 200 and next_one.ttft_s == pytest.approx(0.0102)  # 10 ms + 10 prompt tokens
