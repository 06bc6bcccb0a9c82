"""A tier's speculative decoding: config to vLLM's speculative config, and the bookkeeping.

vLLM does the drafting and verification; tierserve picks the draft (falling back to n-gram
lookup when a distilled draft is missing), turns `disable_above_batch_size` into vLLM's
per-batch-size schedule, and counts acceptance per tier and per request.

Load-aware speculation is vLLM's own `num_speculative_tokens_per_batch_size`: the scheduler
looks up k for each step's batch size, and k = 0 proposes nothing. A tier sets that schedule from
its load rule when the engine starts; with `adaptive` on, `adaptive.AdaptiveSpeculation` then
rewrites it on the running engine from the payoff it measures (vLLM 0.32 has no public call for
this: `vllm_plugin` adds one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierserve.actors.config import SpeculationConfig
from tierserve.actors.types import SpeculationStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ResolvedSpeculation:
    """What the engine runs: the method and, for draft_model, the draft's path."""

    method: str
    model: str | None
    num_speculative_tokens: int

    def describe(self) -> str:
        return f"{self.method} {self.model}" if self.model else self.method


def resolve_speculation(spec: SpeculationConfig, cache_dir: Path | None = None) -> ResolvedSpeculation | None:
    """The method and draft to run; a missing distilled draft falls back as configured (logged)."""
    from tierserve.actors.checkpoints import draft_checkpoint_dir, is_prepared, resolve_model

    k = spec.num_speculative_tokens
    if spec.method == "ngram":
        return ResolvedSpeculation("ngram", None, k)
    target = spec.distilled_target
    if target is None:
        return ResolvedSpeculation("draft_model", resolve_model(spec.model or "", cache_dir, progress=False), k)

    target_dir = Path(resolve_model(f"embedded:{target}", cache_dir, progress=False))
    draft = draft_checkpoint_dir(target_dir)
    if is_prepared(draft):
        return ResolvedSpeculation("draft_model", str(draft), k)
    if spec.fallback == "ngram":
        logger.warning(
            "no distilled draft for %s at %s (run `tierserve models distill %s`): speculating with n-gram lookup",
            target,
            draft,
            target,
        )
        return ResolvedSpeculation("ngram", None, k)
    logger.warning("no distilled draft for %s at %s: serving without speculation", target, draft)
    return None


def batch_size_schedule(spec: SpeculationConfig) -> list[tuple[int, int, int]] | None:
    """vLLM's `(first, last, k)` schedule: the configured one, or k up to
    `disable_above_batch_size` and 0 above it; None speculates at every batch size (an adaptive
    tier gets k at every batch size spelled out as a schedule).
    (vLLM carries the last range's k on up to its max_num_seqs.)"""
    if spec.tokens_per_batch_size is not None:
        return [tuple(entry) for entry in spec.tokens_per_batch_size]
    limit = spec.disable_above_batch_size
    if limit is None:
        # Adaptive speculation rewrites the engine's schedule, so the engine must start with one.
        return [(1, 1, spec.num_speculative_tokens)] if spec.adaptive.enabled else None
    return [(1, limit, spec.num_speculative_tokens), (limit + 1, limit + 1, 0)]


def vllm_speculative_config(spec: SpeculationConfig, resolved: ResolvedSpeculation) -> dict[str, Any]:
    """The `speculative_config` engine argument."""
    config: dict[str, Any] = {"method": resolved.method, "num_speculative_tokens": resolved.num_speculative_tokens}
    if resolved.method == "ngram":
        config["prompt_lookup_min"] = spec.prompt_lookup_min
        config["prompt_lookup_max"] = spec.prompt_lookup_max
    else:
        config["model"] = resolved.model
        if spec.draft_tensor_parallel_size is not None:
            config["draft_tensor_parallel_size"] = spec.draft_tensor_parallel_size
    schedule = batch_size_schedule(spec)
    if schedule is not None:
        config["num_speculative_tokens_per_batch_size"] = schedule
    config.update(spec.options)
    return config


def request_speculation(
    metrics: Iterable[dict[str, Any] | None], resolved: ResolvedSpeculation
) -> SpeculationStats | None:
    """One request's counts from vLLM's per-sequence metrics (one per choice, None when absent)."""
    stats = SpeculationStats(resolved.method, resolved.num_speculative_tokens)
    seen = False
    for m in metrics:
        if m is None:
            continue
        seen = True
        stats.add(m["num_spec_steps"], m["num_draft_tokens"], m["num_accepted_draft_tokens"])
    return stats if seen else None


class StepRecorder:
    """Per-tier engine-step counters, fed by vLLM's stat-logger hook once per engine step.

    Step cost is the time between consecutive steps that produced tokens, counted only while
    the engine stays busy (gaps longer than `idle_gap_s` are idle time, not step time)."""

    def __init__(self, resolved: ResolvedSpeculation | None, idle_gap_s: float = 0.5):
        self.steps = 0
        self.generation_tokens = 0
        self.batch_size_sum = 0
        self.step_time_s = 0.0
        self.timed_steps = 0
        self.idle_gap_s = idle_gap_s
        self._last_step_at: float | None = None
        self.speculation = (
            SpeculationStats(resolved.method, resolved.num_speculative_tokens) if resolved is not None else None
        )

    def record(
        self, running: int, generation_tokens: int, drafts: int, draft_tokens: int, accepted: int, at: float
    ) -> float | None:
        """Count one step; returns its duration when it followed another step without an idle gap."""
        duration = None
        if generation_tokens:
            self.steps += 1
            self.generation_tokens += generation_tokens
            self.batch_size_sum += running
            if self._last_step_at is not None and at - self._last_step_at < self.idle_gap_s:
                duration = at - self._last_step_at
                self.step_time_s += duration
                self.timed_steps += 1
            self._last_step_at = at
        if self.speculation is not None and drafts:
            self.speculation.add(drafts, draft_tokens, accepted)
        return duration

    @property
    def mean_batch_size(self) -> float:
        return self.batch_size_sum / self.steps if self.steps else 0.0

    @property
    def mean_step_ms(self) -> float:
        return 1e3 * self.step_time_s / self.timed_steps if self.timed_steps else 0.0
