"""tierserve's vLLM plugin: the `vllm.general_plugins` entry point (see pyproject.toml).

vLLM calls `register` in each of its processes (the engine client, the engine core, workers)
before any model runs. It applies `vllm_fixes` and gives the engine core one utility call that
vLLM 0.32 lacks: reading and replacing the dynamic speculative-decoding schedule of a running
engine, which adaptive speculation (`adaptive.py`) needs.

The client reaches the utility through vLLM's own utility RPC, the path its `reset_prefix_cache`
and `sleep` calls take: `AsyncLLM.engine_core.call_utility_async(SCHEDULE_UTILITY, lookup)`. The
engine core runs utility calls between steps, so a new schedule applies from the next step.
"""

from __future__ import annotations

from tierserve.actors.vllm_fixes import apply_all

SCHEDULE_UTILITY = "tierserve_speculation_schedule"


def speculation_schedule(engine_core, lookup=None):
    """The scheduler's batch size → speculative tokens lookup (index 0 unused); with `lookup`,
    replace it first. Values are clamped to the engine's k. Raises ValueError on an engine
    started without a schedule (`num_speculative_tokens_per_batch_size`) or a lookup whose
    length is not max_num_seqs + 1."""
    scheduler = engine_core.scheduler
    current = getattr(scheduler, "dynamic_sd_lookup", None)
    if current is None:
        raise ValueError("this engine was started without a speculative-decoding schedule")
    if lookup is not None:
        if len(lookup) != len(current):
            raise ValueError(f"the schedule needs {len(current)} entries (max_num_seqs + 1), got {len(lookup)}")
        cap = scheduler.num_spec_tokens
        scheduler.dynamic_sd_lookup = [min(max(int(k), 0), cap) for k in lookup]
    return list(scheduler.dynamic_sd_lookup)


def _install_schedule_utility() -> None:
    from vllm.v1.engine.core import EngineCore

    if not hasattr(EngineCore, SCHEDULE_UTILITY):
        setattr(EngineCore, SCHEDULE_UTILITY, speculation_schedule)


def register() -> None:
    """The entry point; vLLM may call it more than once per process."""
    apply_all()
    _install_schedule_utility()
