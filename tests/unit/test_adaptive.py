"""Adaptive speculation's controller, driven by a simulated engine: per batch size, a step with k
drafted tokens yields `accepted + 1` tokens per stream and costs more than a plain step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tierserve.actors.adaptive import SETTLE_STEPS, AdaptiveSpeculation, bucket_bounds
from tierserve.actors.config import AdaptiveSpeculationConfig, SpeculationConfig
from tierserve.actors.speculation import batch_size_schedule
from tierserve.actors.vllm_plugin import speculation_schedule

K = 3
CONFIG = AdaptiveSpeculationConfig(enabled=True, probe_every_s=10.0, probe_steps=8, min_steps=8, margin=0.05)


class SimulatedEngine:
    """Step cost and tokens per stream, per batch size, with and without speculation."""

    def __init__(self, tokens_per_step: float, plain_ms, speculating_ms):
        self.tokens_per_step = tokens_per_step  # mean accepted length while speculating
        self.plain_ms = plain_ms
        self.speculating_ms = speculating_ms
        self.now = 0.0

    def step(self, control: AdaptiveSpeculation, batch_size: int) -> bool:
        k = control.lookup()[batch_size]
        ms = self.speculating_ms(batch_size) if k else self.plain_ms(batch_size)
        tokens = round(batch_size * (self.tokens_per_step if k else 1.0))
        self.now += ms / 1e3
        return control.observe(batch_size, tokens, ms / 1e3, self.now)


def memory_bound(batch_size: int) -> float:
    return 20.0 + 1.0 * batch_size


def verify_cost(batch_size: int) -> float:
    # Verifying 1 + k tokens per stream: nearly free for one stream, compute-bound for many.
    return 24.0 + 6.0 * batch_size


def test_buckets_double_up_to_the_engines_batch_limit():
    assert bucket_bounds(1) == [(1, 1)]
    assert bucket_bounds(16) == [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16)]
    assert bucket_bounds(20) == [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 20)]


def test_speculation_stays_on_where_it_pays_and_goes_off_where_it_costs():
    engine = SimulatedEngine(2.0, memory_bound, verify_cost)
    control = AdaptiveSpeculation(CONFIG, K, [0] + [K] * 16)
    for _ in range(200):
        engine.step(control, 1)
        engine.step(control, 8)
    for _ in range(2 * CONFIG.probe_steps):  # let a re-measurement under way finish
        if not any(b.reason.startswith("probing") for b in control.snapshot()):
            break
        engine.step(control, 1)
        engine.step(control, 8)
    assert control.snapshot()[0].probes >= 2  # ~20 simulated seconds: re-measured every 10 s
    lookup = control.lookup()
    assert lookup[1] == K  # 2 tokens / 30 ms beats 1 token / 21 ms
    assert lookup[5:9] == [0] * 4  # 16 tokens / 72 ms loses to 8 tokens / 28 ms
    assert lookup[2] == K and lookup[9:] == [K] * 8  # buckets without traffic keep their start
    one, eight = control.snapshot()[0], control.snapshot()[3]
    assert one.reason.startswith("speculation pays") and one.payoff == pytest.approx(2 * 21 / 30, rel=1e-6)
    assert eight.reason.startswith("speculation costs") and eight.payoff == pytest.approx(2 * 28 / 72, rel=1e-6)
    assert eight.switches == 1 and eight.num_speculative_tokens == 0
    assert one.speculating_steps > 0 and one.plain_steps > 0 and one.probes >= 1


def test_a_bucket_turns_speculation_back_on_when_it_pays_again():
    engine = SimulatedEngine(1.1, memory_bound, verify_cost)  # drafts mostly rejected: costs
    control = AdaptiveSpeculation(CONFIG, K, [0] + [K] * 4)
    for _ in range(40):
        engine.step(control, 1)
    assert control.lookup()[1] == 0
    engine.tokens_per_step = 3.0  # traffic now copies its context (RAG): drafts accepted
    changed = [engine.step(control, 1) for _ in range(600)]  # 12.6 s: past probe_every_s
    assert control.lookup()[1] == K
    assert any(changed)
    assert control.snapshot()[0].reason.startswith("speculation pays")


def test_a_bucket_starting_without_speculation_probes_the_tiers_k():
    engine = SimulatedEngine(2.5, memory_bound, verify_cost)
    control = AdaptiveSpeculation(CONFIG, K, [0, K, K, 0, 0])  # e.g. disable_above_batch_size: 2
    for _ in range(CONFIG.min_steps - 1):
        assert not engine.step(control, 3)
    assert engine.step(control, 3)  # min_steps measured: the probe starts, the lookup changed
    assert control.lookup()[3:5] == [K, K]
    assert control.snapshot()[2].reason == f"probing k={K}"


def test_settle_steps_after_a_switch_are_not_measured():
    engine = SimulatedEngine(2.0, memory_bound, verify_cost)
    control = AdaptiveSpeculation(CONFIG, K, [0, K])
    for _ in range(CONFIG.min_steps):
        engine.step(control, 1)
    before = control.snapshot()[0].plain_steps
    for _ in range(SETTLE_STEPS):
        engine.step(control, 1)
    assert control.snapshot()[0].plain_steps == before == 0
    engine.step(control, 1)
    assert control.snapshot()[0].plain_steps == 1


def test_a_tie_within_the_margin_keeps_the_setting_before_the_probe():
    same = SimulatedEngine(1.0, memory_bound, memory_bound)  # speculation neither pays nor costs
    control = AdaptiveSpeculation(CONFIG, K, [0, K])
    for _ in range(60):
        same.step(control, 1)
    bucket = control.snapshot()[0]
    assert control.lookup()[1] == K and bucket.switches == 0 and bucket.probes == 1
    assert bucket.reason.startswith(("within margin", "speculation pays"))


def test_steps_without_tokens_or_time_are_ignored():
    control = AdaptiveSpeculation(CONFIG, K, [0, K])
    assert not control.observe(1, 0, 0.02, 1.0)
    assert not control.observe(1, 2, 0.0, 1.0)
    assert not control.observe(0, 2, 0.02, 1.0)
    assert control.snapshot()[0].speculating_steps == 0


def test_adaptive_accepts_a_flag_and_gives_the_engine_a_schedule_to_rewrite():
    spec = SpeculationConfig(method="ngram", adaptive=True)
    assert spec.adaptive.enabled and spec.adaptive.probe_steps == 24
    assert batch_size_schedule(spec) == [(1, 1, 3)]  # vLLM carries k on to max_num_seqs
    assert batch_size_schedule(SpeculationConfig(method="ngram")) is None
    ruled = SpeculationConfig(method="ngram", adaptive={"enabled": True, "margin": 0.1}, disable_above_batch_size=4)
    assert batch_size_schedule(ruled) == [(1, 4, 3), (5, 5, 0)]
    with pytest.raises(ValueError):
        SpeculationConfig(method="ngram", adaptive={"enabled": True, "probe_steps": 1})


def test_the_engine_core_utility_reads_and_replaces_the_schedule_within_limits():
    # A plain stand-in for vLLM's engine core and scheduler, to reach the refusal paths; the real
    # engine runs this utility in tests/integration/test_tier_shapes.py.
    core = SimpleNamespace(scheduler=SimpleNamespace(dynamic_sd_lookup=[0, 3, 3, 3], num_spec_tokens=3))
    assert speculation_schedule(core) == [0, 3, 3, 3]
    assert speculation_schedule(core, [0, 3, 9, -1]) == [0, 3, 3, 0]
    assert core.scheduler.dynamic_sd_lookup == [0, 3, 3, 0]
    with pytest.raises(ValueError, match="needs 4 entries"):
        speculation_schedule(core, [0, 3])
    static = SimpleNamespace(scheduler=SimpleNamespace(dynamic_sd_lookup=None, num_spec_tokens=3))
    with pytest.raises(ValueError, match="without a speculative-decoding schedule"):
        speculation_schedule(static, [0, 3])


def test_a_probe_interrupted_by_a_lull_goes_back_to_where_it_started():
    engine = SimulatedEngine(2.0, memory_bound, verify_cost)
    control = AdaptiveSpeculation(CONFIG, K, [0, K])
    for _ in range(CONFIG.min_steps + SETTLE_STEPS + 2):  # the probe (k=0) is under way
        engine.step(control, 1)
    assert control.lookup()[1] == 0 and control.snapshot()[0].reason == "probing without speculation"
    engine.now += CONFIG.probe_every_s + 1  # no traffic at batch size 1 for a while
    assert engine.step(control, 1)
    assert control.lookup()[1] == K and control.snapshot()[0].reason == "probe abandoned after a lull"
