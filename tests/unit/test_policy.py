"""The routing policy, without Ray: targets by complexity, budgets, admission, order, cost,
predictions, and the decision's cost in time."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from tierserve.actors.latency import LatencyTracker, StepCostModel
from tierserve.actors.types import TierLoad
from tierserve.router.config import RoutingConfig, TierCost
from tierserve.router.policy import RequestFeatures, Sla, TierView, decide, predict


def load(running=0, waiting=0, slots=8, base=20.0, per_seq=5.0, per_kprompt=40.0, tps=1.0, out=100.0, ctx=2048):
    return TierLoad(running, waiting, slots, ctx, base, per_seq, per_kprompt, tps, out)


def tiers(small_load=None, large_load=None, **kw) -> list[TierView]:
    small = TierView("small", 0.0, TierCost(input_per_million=0.1, output_per_million=0.2), load=small_load or load())
    large = TierView(
        "large", 0.5, TierCost(input_per_million=1.0, output_per_million=2.0), load=large_load or load(base=60.0)
    )
    for key, value in kw.items():
        tier, attr = key.split("__")
        setattr(small if tier == "small" else large, attr, value)
    return [small, large]


NO_BUDGET = Sla()


def test_complexity_picks_the_target_tier():
    easy = decide(RequestFeatures(50, 64, 0.2), NO_BUDGET, tiers())
    hard = decide(RequestFeatures(50, 64, 0.8), NO_BUDGET, tiers())
    assert [c.tier for c in easy.choices] == ["small", "large"]
    assert (easy.reason, easy.target) == ("complexity", "small")
    assert [c.tier for c in hard.choices] == ["large", "small"]
    assert (hard.reason, hard.target) == ("complexity", "large")


def test_threshold_is_inclusive_and_tiers_rank_by_threshold_not_config_order():
    views = list(reversed(tiers()))  # config order: large first
    assert decide(RequestFeatures(50, 64, 0.5), NO_BUDGET, views).target == "large"
    assert decide(RequestFeatures(50, 64, 0.49), NO_BUDGET, views).target == "small"


def test_without_complexity_auto_goes_to_the_default_tier():
    decision = decide(RequestFeatures(50, 64, None), NO_BUDGET, tiers(), default_tier="large")
    assert (decision.first.tier, decision.reason) == ("large", "default")


def test_a_named_tier_is_the_only_choice():
    decision = decide(RequestFeatures(50, 64, None, named_tier="small"), NO_BUDGET, tiers())
    assert [c.tier for c in decision.choices] == ["small"]
    assert decision.reason == "named" and decision.target is None


def test_target_predicted_to_miss_the_budget_gives_way_to_a_tier_that_meets_it():
    # large is busy: 8 slots taken and 4 waiting, so its first token waits for a slot.
    views = tiers(large_load=load(running=8, waiting=4, base=60.0))
    decision = decide(RequestFeatures(50, 64, 0.9), Sla("interactive", ttft_ms=500, tpot_ms=200), views)
    assert decision.target == "large"
    assert [c.tier for c in decision.choices] == ["small", "large"]
    assert decision.reason == "sla"
    assert decision.choices[0].meets_sla and not decision.choices[1].meets_sla


def test_no_tier_meets_the_budget_fastest_first():
    views = tiers(small_load=load(running=8, waiting=2), large_load=load(running=8, waiting=6, base=60.0))
    decision = decide(RequestFeatures(50, 64, 0.9), Sla("tight", ttft_ms=1), views)
    assert decision.reason == "best_effort"
    ttfts = [c.predicted_ttft_ms for c in decision.choices]
    assert ttfts == sorted(ttfts) and decision.first.tier == "small"


def test_best_effort_prefers_a_tier_that_meets_the_requests_own_budget():
    # small streams within the request's 50 ms (35 ms, x 0.8 headroom: 40) but would slow the
    # requests running there past their 40 ms; large starts sooner (short prefill) but streams
    # at 60 ms a token. Neither meets the budget; small keeps the request's own.
    views = tiers(
        small_load=load(running=2, per_kprompt=400.0),
        large_load=load(base=60.0, per_seq=0.0, per_kprompt=10.0),
        small__tightest_tpot_ms=40.0,
    )
    decision = decide(
        RequestFeatures(1000, 64, 0.9), Sla("interactive", 1000, 50), views, headroom=0.8, best_effort="fit"
    )
    assert decision.reason == "best_effort"
    small, large = sorted(decision.choices, key=lambda c: c.tier != "small")
    assert large.predicted_ttft_ms < small.predicted_ttft_ms
    assert [c.tier for c in decision.choices] == ["small", "large"]


def test_best_effort_among_tiers_that_meet_its_own_budget_takes_the_slowest():
    # Both tiers stream a 100 ms-a-token request within its budget, and both would slow their
    # interactive requests (40 ms) past theirs: it goes to large (60 ms), the slower fit,
    # leaving small (45 ms) to the requests that only small can serve.
    views = tiers(
        small_load=load(running=4),
        large_load=load(base=60.0, per_seq=0.0),
        small__tightest_tpot_ms=40.0,
        large__tightest_tpot_ms=40.0,
    )
    decision = decide(RequestFeatures(50, 128, 0.1), Sla("standard", 2000, 100), views, headroom=0.8, best_effort="fit")
    assert decision.reason == "best_effort"
    assert [(c.tier, c.predicted_tpot_ms) for c in decision.choices] == [("large", 60.0), ("small", 45.0)]


def test_best_effort_goes_to_the_tier_closest_to_the_budget_not_the_first_to_start():
    # Both miss 50 ms a token: small by 10% (55 ms), large by 80% (90 ms), though large's first
    # token comes sooner. An interactive request on large would start fast and stream too slowly.
    views = tiers(
        small_load=load(running=6, per_kprompt=400.0),
        large_load=load(base=90.0, per_seq=0.0, per_kprompt=10.0),
    )
    decision = decide(RequestFeatures(1000, 64, 0.1), Sla("interactive", 2000, 50), views, best_effort="fit")
    assert decision.reason == "best_effort"
    assert [(c.tier, c.predicted_tpot_ms) for c in decision.choices] == [("small", 55.0), ("large", 90.0)]
    assert decision.choices[1].predicted_ttft_ms < decision.choices[0].predicted_ttft_ms
    # By default (`first_token`), the tier that starts it soonest comes first.
    default = decide(RequestFeatures(1000, 64, 0.1), Sla("interactive", 2000, 50), views)
    assert [c.tier for c in default.choices] == ["large", "small"]


def test_cheaper_tier_at_least_as_strong_wins_on_cost():
    views = tiers()
    views[1].cost = TierCost()  # large is free: adequate for an easy prompt and cheaper
    decision = decide(RequestFeatures(50, 64, 0.1), NO_BUDGET, views)
    assert (decision.first.tier, decision.reason) == ("large", "cost")
    assert decision.choices[0].estimated_cost == 0.0
    assert decision.choices[1].estimated_cost == pytest.approx((50 * 0.1 + 64 * 0.2) / 1e6)


def test_equal_cost_prefers_the_target_over_a_stronger_tier():
    views = tiers()
    views[0].cost = views[1].cost = TierCost()
    assert decide(RequestFeatures(50, 64, 0.1), NO_BUDGET, views).first.tier == "small"


def test_full_tier_is_refused_and_the_other_serves():
    views = tiers(large_load=load(running=8, waiting=40))  # 33 queued ahead > max_queue 32
    decision = decide(RequestFeatures(50, 64, 0.9), NO_BUDGET, views)
    assert decision.refused == {"large": "full"}
    assert [c.tier for c in decision.choices] == ["small"]
    assert decision.reason == "target_full"


def test_in_flight_counts_even_before_the_tier_reports_it():
    views = tiers(large__in_flight=41)
    assert decide(RequestFeatures(50, 64, 0.9), NO_BUDGET, views).refused == {"large": "full"}


def test_unhealthy_and_too_long_prompts_are_refused():
    views = tiers(small__healthy=False, large__max_model_len=100)
    decision = decide(RequestFeatures(150, 64, 0.1), NO_BUDGET, views)
    assert decision.choices == []
    assert decision.refused == {"small": "unhealthy", "large": "context"}
    assert decision.reason == "overloaded"  # large is up, it just cannot take this prompt


def test_a_long_prompt_goes_to_the_tier_whose_context_fits_it():
    views = tiers(small__max_model_len=2048, large__max_model_len=8192)
    decision = decide(RequestFeatures(3000, 64, 0.1), NO_BUDGET, views)
    assert ([c.tier for c in decision.choices], decision.reason) == (["large"], "target_context")


def test_too_long_for_every_tier_goes_to_the_longest_context_for_its_exact_error():
    views = tiers(small__max_model_len=2048, large__max_model_len=8192)
    decision = decide(RequestFeatures(10_000, 64, 0.1), NO_BUDGET, views)
    assert ([c.tier for c in decision.choices], decision.reason) == (["large"], "context")


def test_everything_full_is_overloaded_with_a_retry_time_and_nothing_up_is_unavailable():
    views = tiers(small_load=load(running=8, waiting=60), large_load=load(running=8, waiting=60))
    full = decide(RequestFeatures(50, 64, 0.5), NO_BUDGET, views)
    assert (full.choices, full.reason) == ([], "overloaded")
    assert full.retry_after_s >= 1
    down = decide(RequestFeatures(50, 64, 0.5), NO_BUDGET, tiers(small__healthy=False, large__healthy=False))
    assert (down.choices, down.reason) == ([], "unavailable")


def test_prediction_from_the_step_cost_model():
    view = TierView("t", load=load(running=3, slots=8, base=20, per_seq=5, per_kprompt=40, tps=2.0))
    p = predict(view, prompt_tokens=500)
    step = 20 + 5 * 4  # four sequences once this one joins
    assert p.tpot_ms == pytest.approx(step / 2.0)  # speculation: 2 tokens per step
    assert p.ttft_ms == pytest.approx(step / 2 + step + 40 * 0.5)
    assert p.queued_ahead == 0


def test_tpot_prediction_counts_the_prompts_prefilled_beside_it():
    # vLLM's chunked prefill puts other requests' prompts into the steps that decode this one:
    # 250 prompt tokens a step at 40 ms per 1,000 add 10 ms to each of its tokens.
    busy = replace(load(running=3, per_kprompt=40.0), prefill_tokens_per_step=250.0)
    assert predict(TierView("t", load=busy), 100, tpot_counts_prefill=True).tpot_ms == pytest.approx(20 + 5 * 4 + 10)
    assert predict(TierView("t", load=busy), 100).tpot_ms == pytest.approx(20 + 5 * 4)  # off by default


def test_prediction_adds_the_wait_for_a_slot():
    idle = predict(TierView("t", load=load(running=0, slots=4)), 100)
    busy = predict(TierView("t", load=load(running=4, waiting=3, slots=4)), 100)
    assert busy.queued_ahead == 4
    full_tpot = 20 + 5 * 4
    assert busy.ttft_ms - idle.ttft_ms >= 4 * 100 * full_tpot / 4 * 0.99


def test_replicas_multiply_the_slots_a_tier_has():
    one = TierView("t", load=load(running=8, waiting=0, slots=8))
    two = TierView("t", load=load(running=8, waiting=0, slots=8), in_flight=16, replicas=2)
    assert predict(one, 100).queued_ahead == 1
    assert predict(two, 100).queued_ahead == 1  # 16 in flight + 1 over 16 slots
    assert predict(TierView("t", load=load(running=2, slots=8), replicas=2), 100).queued_ahead == 0


def test_on_a_priority_scheduled_tier_only_the_more_urgent_queue_goes_first():
    # 8 slots taken, 40 waiting; of this ingress's 48 requests there, 12 are interactive (0).
    busy = load(running=8, waiting=40)
    mix = {0: 12, 1: 12, 2: 24}
    fcfs = TierView("t", load=busy, priorities=mix)
    assert predict(fcfs, 100, priority=0).queued_ahead == 41  # the engine ignores priority
    by_priority = TierView("t", load=replace(busy, priority_scheduling=True), priorities=mix)
    urgent, standard, batch = (predict(by_priority, 100, priority=p) for p in (0, 1, 2))
    assert (urgent.queued_ahead, standard.queued_ahead, batch.queued_ahead) == (11, 21, 41)
    assert urgent.ttft_ms < standard.ttft_ms < batch.ttft_ms
    # Before this ingress has sent anything there it cannot split the queue: all of it counts.
    assert predict(replace(by_priority, priorities={}), 100, priority=0).queued_ahead == 41


def test_a_queue_full_for_batch_still_admits_an_interactive_request():
    views = tiers(small_load=load(running=8, waiting=40, slots=8), large__healthy=False)
    views[0].load.priority_scheduling = True
    views[0].priorities = {0: 4, 2: 44}
    interactive = decide(RequestFeatures(50, 32, 0.1), Sla("interactive", priority=0), views)
    batch = decide(RequestFeatures(50, 32, 0.1), Sla("batch", priority=2), views)
    assert [c.tier for c in interactive.choices] == ["small"]
    assert (batch.choices, batch.refused) == ([], {"small": "full", "large": "unhealthy"})


def test_sla_classes_carry_their_priority():
    from tierserve.router.routing import Router

    router = Router(RoutingConfig(), ["small"], "small")
    assert [router.sla(c, None, None).priority for c in ("interactive", "standard", "batch")] == [0, 1, 2]
    assert router.sla(None, 500.0, None) == Sla("custom", 500.0, 250.0, priority=1)  # the default class's


def test_unknown_load_is_optimistic():
    view = TierView("t")
    assert predict(view, 100).ttft_ms is None
    assert decide(RequestFeatures(10, 8, 0.1), Sla("x", ttft_ms=1), [view]).first.meets_sla


def test_sla_met_by():
    sla = Sla("interactive", ttft_ms=500, tpot_ms=50)
    assert sla.met_by(400, 40) and not sla.met_by(600, 40) and not sla.met_by(400, 60)
    assert Sla().met_by(1e9, 1e9)


def test_decision_cost_p99_under_a_millisecond():
    views = tiers()
    features, sla = RequestFeatures(200, 128, 0.4), Sla("standard", 3000, 250)
    times = []
    for _ in range(2000):
        start = time.perf_counter()
        decide(features, sla, views)
        times.append(time.perf_counter() - start)
    times.sort()
    assert times[int(0.99 * len(times))] < 1e-3


def test_a_request_every_tier_would_stream_far_too_slowly_is_shed_when_configured():
    # small streams at 20 + 5 * 9 = 65 ms a token, large at 60 ms: both over 1.5 x 30 ms.
    views = tiers(small_load=load(running=8, slots=16), large_load=load(base=60.0, per_seq=0.0))
    sla = Sla("interactive", 5000, 30)
    assert decide(RequestFeatures(50, 64, 0.1), sla, views, shed_over_tpot_budget=None).reason == "best_effort"
    shed = decide(RequestFeatures(50, 64, 0.1), sla, views, shed_over_tpot_budget=1.5)
    assert (shed.choices, shed.reason) == ([], "overloaded")
    assert shed.refused == {"small": "over_budget", "large": "over_budget"} and shed.retry_after_s >= 1
    # Within 1.5 x 42 ms (63) on large (60 ms), not on small (65 ms): admitted on large only.
    kept = decide(RequestFeatures(50, 64, 0.1), Sla("interactive", 5000, 42), views, shed_over_tpot_budget=1.5)
    assert [c.tier for c in kept.choices] == ["large"] and kept.refused == {"small": "over_budget"}


def test_routing_config_checks_its_default_class():
    with pytest.raises(ValueError, match="default_sla_class"):
        RoutingConfig(default_sla_class="gold")


def test_step_cost_model_recovers_a_linear_cost():
    model = StepCostModel(prior_ms=100.0)
    for i in range(400):
        running, prefill = 1 + i % 16, (i * 37) % 900
        model.observe(running, prefill, 12.0 + 3.0 * running + 25.0 * prefill / 1000)
    base, per_seq, per_kprompt = model.coefficients
    assert base == pytest.approx(12.0, rel=0.05)
    assert per_seq == pytest.approx(3.0, rel=0.05)
    assert per_kprompt == pytest.approx(25.0, rel=0.05)


def test_step_cost_model_survives_steps_that_cannot_tell_its_terms_apart():
    """One request at a time for a long while: every step runs one sequence, and a few prefill
    a short prompt. Once the prior has faded, base and per-sequence cost cannot be told apart;
    the fit must still give the step's cost (it raised `LinAlgError: Singular matrix` after
    some thousands of such steps, inside vLLM's output handler, which killed the engine)."""
    model = StepCostModel(prior_ms=50.0)
    for i in range(20_000):
        prefill = 30 if i % 64 == 0 else 0
        model.observe(1, prefill, 40.0 + 200.0 * prefill / 1000)
    base, per_seq, per_kprompt = model.coefficients
    assert base + per_seq == pytest.approx(40.0, rel=0.01)
    assert per_seq == pytest.approx(0.0, abs=0.5)  # no evidence of a slope: none assumed
    assert per_kprompt == pytest.approx(200.0, rel=0.05)


def test_latency_tracker_reports_a_load():
    tracker = LatencyTracker(max_num_seqs=16)
    for _ in range(50):
        tracker.observe_step(running=4, prefill_tokens=0, generated=8, step_s=0.03)
    tracker.observe_request(0.1, 0.03, 40)
    reported = tracker.load(running=4, waiting=1, max_model_len=2048)
    assert (reported.running, reported.waiting, reported.max_num_seqs) == (4, 1, 16)
    assert reported.tokens_per_step == pytest.approx(2.0, rel=0.01)
    assert reported.step_ms(4) == pytest.approx(30.0, rel=0.05)
    assert reported.ttft_ms == pytest.approx(100.0) and reported.mean_output_tokens == 40
    assert reported.prefill_tokens_per_step == pytest.approx(0.0)
    for _ in range(200):  # one step in four prefills 400 prompt tokens
        for prefill in (400, 0, 0, 0):
            tracker.observe_step(running=4, prefill_tokens=prefill, generated=4, step_s=0.03)
    assert tracker.load(4, 0, 2048).prefill_tokens_per_step == pytest.approx(100.0, rel=0.3)


def test_headroom_keeps_predictions_off_the_edge_of_the_budget():
    views = tiers(large_load=load(base=60.0, per_seq=0.0))  # large: TPOT 60 ms whatever the batch
    sla = Sla("interactive", tpot_ms=70)
    assert decide(RequestFeatures(50, 64, 0.9), sla, views, headroom=1.0).reason == "complexity"
    squeezed = decide(RequestFeatures(50, 64, 0.9), sla, views, headroom=0.8)  # 60 > 0.8 * 70
    assert (squeezed.first.tier, squeezed.reason) == ("small", "sla")


def test_a_request_without_budget_does_not_push_running_ones_past_theirs():
    # small already runs interactive requests (TPOT budget 50 ms); one more puts its step at
    # 20 + 5 * 5 = 45 ms, past 0.8 * 50: the batch request goes to large, where nothing is tight.
    views = tiers(small_load=load(running=4), small__tightest_tpot_ms=50.0)
    decision = decide(RequestFeatures(50, 128, 0.1), Sla("batch"), views, headroom=0.8)
    assert (decision.first.tier, decision.reason) == ("large", "sla")
    relaxed = tiers(small_load=load(running=4), small__tightest_tpot_ms=100.0)
    assert decide(RequestFeatures(50, 128, 0.1), Sla("batch"), relaxed, headroom=0.8).first.tier == "small"


def test_in_flight_budgets_are_tracked_per_tier():
    from tierserve.router.state import TierStates

    states = TierStates(["small", "large"], RoutingConfig())
    states.started("small", Sla("standard", tpot_ms=100.0, priority=1))
    states.started("small", Sla("interactive", tpot_ms=50.0))
    states.started("large", None)
    assert {v.name: v.tightest_tpot_ms for v in states.snapshot()} == {"small": 50.0, "large": None}
    assert states.snapshot()[0].priorities == {0: 1, 1: 1}
    states.finished("small", Sla("interactive", tpot_ms=50.0))
    small = states.snapshot()[0]
    assert (small.tightest_tpot_ms, small.in_flight, small.priorities) == (100.0, 1, {1: 1})


def test_a_request_every_tier_would_answer_far_too_late_is_shed():
    """With `shed_over_budget`, a tier predicted to take more than that many times the TTFT
    budget is no choice: shed with a Retry-After of about the excess wait, not served late."""
    busy = load(running=8, waiting=20, base=60.0)
    views = tiers(small_load=busy, large_load=busy)
    interactive = Sla("interactive", ttft_ms=1000, tpot_ms=200)
    late = decide(RequestFeatures(50, 64, 0.2), interactive, views)
    assert late.choices and all(c.predicted_ttft_ms > 3000 for c in late.choices)  # best effort, late
    shed = decide(RequestFeatures(50, 64, 0.2), interactive, views, shed_over_budget=3.0)
    assert (shed.choices, shed.reason) == ([], "overloaded")
    assert set(shed.refused.values()) == {"over_budget"} and shed.retry_after_s >= 1
    # Work with no TTFT budget waits its turn; a tier within the factor is still a choice.
    assert decide(RequestFeatures(50, 64, 0.2), Sla("batch"), views, shed_over_budget=3.0).choices
    assert decide(RequestFeatures(50, 64, 0.2), interactive, tiers(), shed_over_budget=3.0).choices


def test_a_request_no_tier_can_answer_within_budget_even_idle_is_served_when_there_is_room():
    """A long prompt (or retrieved passages counted at their most) whose own prefill takes
    longer than its TTFT budget on an idle tier: shedding it against the budget would refuse it
    on every try. It is served while the tier has a free engine slot, and shed when it would
    wait for one."""
    idle = load(base=60.0, per_kprompt=2000.0)
    light = load(running=1, base=60.0, per_kprompt=2000.0)
    busy = load(running=8, waiting=20, base=60.0, per_kprompt=2000.0)
    standard = Sla("standard", ttft_ms=3000, tpot_ms=250)
    long_prompt = RequestFeatures(1600, 64, 0.2, "small")  # prefill alone: 60 + 3,200 ms
    alone = predict(TierView("small", load=idle), 1600, 64)
    assert alone.ttft_ms > 3000 and alone.idle_ttft_ms == pytest.approx(alone.ttft_ms)
    for room in (idle, light):
        served = decide(long_prompt, standard, tiers(small_load=room), shed_over_budget=1.0)
        assert [c.tier for c in served.choices] == ["small"] and not served.first.meets_sla
    shed = decide(long_prompt, standard, tiers(small_load=busy), shed_over_budget=1.0)
    assert shed.refused == {"small": "over_budget"} and shed.retry_after_s >= 1
    # A prompt the idle tier answers within budget is still measured against the budget.
    short = predict(TierView("small", load=busy), 50, 64)
    assert short.idle_ttft_ms < 3000 < short.ttft_ms
    assert decide(RequestFeatures(50, 64, 0.2, "small"), standard, tiers(small_load=busy), shed_over_budget=1.0).refused


def test_shedding_below_1x_the_budget_keeps_a_margin_under_load_only():
    """`shed_over_budget` below 1 refuses, under load, a request predicted just within its
    budget (such a prediction is as likely to be late as early); a tier with room still serves a
    prompt whose own prefill takes most of the budget."""
    busy = load(running=8, waiting=8, slots=8)
    p = predict(TierView("small", load=busy), 100, 64)
    sla = Sla(ttft_ms=p.ttft_ms / 0.9)  # predicted at 0.9x the budget
    assert decide(RequestFeatures(100, 64), sla, [TierView("small", load=busy)], shed_over_budget=1.0).choices
    shed = decide(RequestFeatures(100, 64), sla, [TierView("small", load=busy)], shed_over_budget=0.8)
    assert not shed.choices and shed.refused == {"small": "over_budget"}
    idle = load(base=60.0, per_kprompt=2000.0)
    alone = predict(TierView("small", load=idle), 1000, 64)  # prefill alone: most of the budget
    tight = Sla(ttft_ms=alone.ttft_ms / 0.9)
    assert decide(RequestFeatures(1000, 64), tight, [TierView("small", load=idle)], shed_over_budget=0.8).choices


def test_a_ttft_correction_scales_the_modelled_prediction_and_is_what_sheds():
    """The tier's first tokens have come 2x the model: the prediction says so, the model's own
    figure stays beside it, and a request the model would admit is shed."""
    from tierserve.router.policy import TtftCorrection

    busy = load(running=8, waiting=8, slots=8)  # 9 queued ahead: a wait of about 1 s
    plain = predict(TierView("small", load=busy), 100, 64)
    corrected = predict(TierView("small", load=busy, ttft_correction=TtftCorrection(2.0)), 100, 64)
    assert corrected.modelled_ttft_ms == plain.ttft_ms == plain.modelled_ttft_ms
    assert corrected.ttft_ms == pytest.approx(2.0 * plain.ttft_ms)
    sla = Sla(ttft_ms=plain.ttft_ms / 2.5)  # the model: within 3x; corrected: past it
    assert decide(RequestFeatures(100, 64), sla, [TierView("small", load=busy)], shed_over_budget=3.0).choices
    slow = TierView("small", load=busy, ttft_correction=TtftCorrection(2.0))
    shed = decide(RequestFeatures(100, 64), sla, [slow], shed_over_budget=3.0)
    assert not shed.choices and shed.refused == {"small": "over_budget"}


def test_ttft_fit_learns_how_first_tokens_come_against_the_model():
    import random

    from tierserve.router.state import TtftFit

    fit, rng = TtftFit(), random.Random(0)
    assert fit.correction(0.0)(800.0) == 800.0  # no observation: the model as it is
    for i in range(200):  # five a second
        modelled = rng.uniform(50, 2000)
        fit.observe(modelled, 1.7 * modelled * rng.uniform(0.8, 1.25), i / 5)
    assert fit.correction(40.0).scale == pytest.approx(1.7, rel=0.1)
    # Faster than the model: scaled down, never under half the model; slower: at most 5x.
    fast, slow = TtftFit(), TtftFit()
    for i in range(100):
        fast.observe(1500.0, 300.0, i / 5)
        slow.observe(1500.0, 30000.0, i / 5)
    assert 0.5 <= fast.correction(20.0).scale < 0.6
    assert 4.0 < slow.correction(20.0).scale <= 5.0
    # The tier got slower, and the fit follows within a couple of half-lives.
    for i in range(100):
        fast.observe(1500.0, 3000.0, 20 + i / 5)
    assert fast.correction(40.0).scale > 1.4


def test_what_a_burst_taught_fades_once_it_is_over():
    """After a burst a near-idle tier's short predictions stay short (at most 5x), so requests
    are still admitted there, and the lesson fades within about a minute."""
    from tierserve.router.state import TtftFit

    fit = TtftFit(half_life_s=10.0)
    for i in range(100):
        fit.observe(1500.0, 15000.0, i / 10)
    assert 400.0 < fit.correction(10.0)(100.0) <= 500.0
    assert fit.correction(80.0).scale < 1.3


def test_tier_states_correct_predictions_only_with_ttft_feedback():
    from tierserve.router.state import TierStates

    on = TierStates(["small"], RoutingConfig(ttft_feedback=True))
    off = TierStates(["small"], RoutingConfig())
    for states in (on, off):
        states.polled("small", load())
        for _ in range(50):
            states.first_token("small", 1000.0, 3000.0)
    assert on.snapshot()[0].ttft_correction(200.0) == pytest.approx(600.0, rel=0.1)
    assert off.snapshot()[0].ttft_correction(200.0) == 200.0
