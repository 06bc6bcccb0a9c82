"""Speculation config to vLLM's, the distilled-draft fallback, and acceptance bookkeeping."""

import logging
import os

import pytest

from tierserve.actors.checkpoints import prepare_embedded
from tierserve.actors.config import SpeculationConfig
from tierserve.actors.speculation import (
    ResolvedSpeculation,
    StepRecorder,
    batch_size_schedule,
    request_speculation,
    resolve_speculation,
    vllm_speculative_config,
)
from tierserve.actors.types import SpeculationStats


def test_draft_model_maps_onto_vllms_speculative_config():
    spec = SpeculationConfig(method="draft_model", model="/d", num_speculative_tokens=4, draft_tensor_parallel_size=1)
    resolved = ResolvedSpeculation("draft_model", "/d", 4)
    assert vllm_speculative_config(spec, resolved) == {
        "method": "draft_model",
        "model": "/d",
        "num_speculative_tokens": 4,
        "draft_tensor_parallel_size": 1,
    }


def test_ngram_maps_onto_prompt_lookup_and_passes_extra_options():
    spec = SpeculationConfig(method="ngram", prompt_lookup_min=2, prompt_lookup_max=5, options={"enforce_eager": True})
    assert vllm_speculative_config(spec, ResolvedSpeculation("ngram", None, 3)) == {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_min": 2,
        "prompt_lookup_max": 5,
        "enforce_eager": True,
    }


@pytest.mark.parametrize(
    "fields, schedule",
    [
        ({}, None),
        ({"disable_above_batch_size": 8}, [(1, 8, 3), (9, 9, 0)]),  # vLLM carries k=0 on to max_num_seqs
        ({"tokens_per_batch_size": [(1, 4, 3), (5, 16, 1), (17, 64, 0)]}, [(1, 4, 3), (5, 16, 1), (17, 64, 0)]),
    ],
)
def test_load_aware_schedule(fields, schedule):
    spec = SpeculationConfig(method="ngram", num_speculative_tokens=3, **fields)
    assert batch_size_schedule(spec) == schedule
    config = vllm_speculative_config(spec, ResolvedSpeculation("ngram", None, 3))
    assert config.get("num_speculative_tokens_per_batch_size") == schedule


def test_schedule_matches_vllms_expansion():
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    spec = SpeculationConfig(method="ngram", num_speculative_tokens=3, disable_above_batch_size=2)
    schedule = batch_size_schedule(spec)
    lookup = build_dynamic_sd_schedule_lookup(schedule, vllm_max_batch_size=6, vllm_num_speculative_tokens=3)
    assert lookup[1:] == [3, 3, 0, 0, 0, 0]


@pytest.fixture
def cache_with_target(tmp_path):
    """A model cache holding the prepared embedded target (linked, not copied)."""
    target = prepare_embedded("smollm2-135m-instruct", progress=False)
    (tmp_path / "models").mkdir()
    os.symlink(target, tmp_path / "models" / target.name)
    return tmp_path, target


def test_missing_distilled_draft_falls_back_to_ngram_with_a_log_line(cache_with_target, caplog):
    cache, _ = cache_with_target
    spec = SpeculationConfig(method="draft_model", model="distilled:smollm2-135m-instruct", num_speculative_tokens=4)
    with caplog.at_level(logging.WARNING):
        resolved = resolve_speculation(spec, cache)
    assert resolved == ResolvedSpeculation("ngram", None, 4)
    assert "tierserve models distill smollm2-135m-instruct" in caplog.text
    off = spec.model_copy(update={"fallback": "none"})
    assert resolve_speculation(off, cache) is None


def test_present_distilled_draft_is_used(cache_with_target):
    from tierserve.actors.checkpoints import MANIFEST, draft_checkpoint_dir

    cache, target = cache_with_target
    draft = draft_checkpoint_dir(cache / "models" / target.name)
    draft.mkdir()
    (draft / MANIFEST).write_text("{}")
    spec = SpeculationConfig(method="draft_model", model="distilled:smollm2-135m-instruct")
    assert resolve_speculation(spec, cache) == ResolvedSpeculation("draft_model", str(draft), 3)


def test_request_speculation_sums_choices_from_vllms_per_sequence_metrics():
    resolved = ResolvedSpeculation("draft_model", "/d", 3)
    m = {"num_spec_steps": 10, "num_draft_tokens": 30, "num_accepted_draft_tokens": 18}
    stats = request_speculation([m, None, m], resolved)
    assert (stats.steps, stats.draft_tokens, stats.accepted_tokens) == (20, 60, 36)
    assert stats.acceptance_rate == pytest.approx(0.6)
    assert stats.mean_accepted_length == pytest.approx(2.8)
    assert request_speculation([None], resolved) is None


def test_step_recorder_counts_steps_batches_and_acceptance():
    recorder = StepRecorder(ResolvedSpeculation("ngram", None, 2), idle_gap_s=0.5)
    recorder.record(running=4, generation_tokens=6, drafts=4, draft_tokens=8, accepted=2, at=10.00)
    recorder.record(running=2, generation_tokens=2, drafts=0, draft_tokens=0, accepted=0, at=10.02)
    recorder.record(running=0, generation_tokens=0, drafts=0, draft_tokens=0, accepted=0, at=10.03)  # no tokens
    recorder.record(running=1, generation_tokens=1, drafts=0, draft_tokens=0, accepted=0, at=15.00)  # after idle
    recorder.record(running=1, generation_tokens=1, drafts=0, draft_tokens=0, accepted=0, at=15.04)
    assert (recorder.steps, recorder.generation_tokens, recorder.mean_batch_size) == (4, 10, 2.0)
    assert recorder.mean_step_ms == pytest.approx(30.0)  # (20 ms + 40 ms) / 2; the idle gap is not a step
    spec = recorder.speculation
    assert spec.as_dict() == {
        "method": "ngram",
        "num_speculative_tokens": 2,
        "steps": 4,
        "draft_tokens": 8,
        "accepted_tokens": 2,
        "acceptance_rate": 0.25,
        "mean_accepted_length": 1.5,
    }
    assert StepRecorder(None).speculation is None


def test_empty_stats_have_neutral_rates():
    stats = SpeculationStats("ngram", 3)
    assert stats.acceptance_rate == 0.0 and stats.mean_accepted_length == 1.0
