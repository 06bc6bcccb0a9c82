"""The fixes tierserve applies to vLLM, on hand-built tensors (no model)."""

import pytest
import torch

from tierserve.actors.vllm_fixes import apply_all, expand_per_token


@pytest.mark.parametrize(
    "values, cu, replace, expected",
    [
        # per-request temperature to per-draft-token; greedy's -1 becomes 1 (vLLM's GREEDY_TEMPERATURE)
        (torch.tensor([0.7, -1.0, 1.5]), [2, 5, 6], (-1.0, 1.0), [0.7, 0.7, 1.0, 1.0, 1.0, 1.5]),
        # per-request top-k (int32, as vLLM keeps it); a request with no drafts takes no slots
        (torch.tensor([5, 1, 49152], dtype=torch.int32), [3, 3, 4], (0, 0), [5, 5, 5, 49152]),
        (torch.tensor([5], dtype=torch.int32), [0], (0, 0), []),
    ],
)
def test_expand_per_token_writes_in_place_for_any_dtype(values, cu, replace, expected):
    out = torch.full((len(expected),), 12345, dtype=values.dtype)
    expand_per_token(out, values, torch.tensor(cu, dtype=torch.int32), *replace)
    assert out.tolist() == pytest.approx(expected)


def test_register_patches_vllm_and_is_idempotent():
    from vllm.utils import cpu_triton_utils
    from vllm.v1.sample.ops import topk_topp_sampler

    apply_all()
    apply_all()
    assert cpu_triton_utils._expand_kernel_impl is expand_per_token
    fixed = topk_topp_sampler.apply_top_k_only
    assert fixed.tierserve_fix and not getattr(fixed.__wrapped__, "tierserve_fix", False)
    empty = torch.empty((0, 8))
    assert fixed(empty, torch.empty((0,), dtype=torch.int32)) is empty
    logits = torch.tensor([[0.1, 0.9, 0.5]])
    masked = fixed(logits.clone(), torch.tensor([1]))
    assert masked[0, 1] == pytest.approx(0.9) and torch.isinf(masked[0, [0, 2]]).all()


def test_aot_compiled_functions_load_without_vllms_eager_finalize():
    """The saved compilation is loaded through a wrapper that gives a plain loaded function the
    no-op `finalize_loading` vLLM calls. bench/engine_start.py measures the effect on a real
    engine (cold and warm compile cache, same greedy tokens): docs/reliability.md."""
    from tierserve.actors.vllm_fixes import _no_finalize

    apply_all()
    apply_all()
    loader = torch.compiler.load_compiled_function
    assert loader.tierserve_fix and not getattr(loader.__wrapped__, "tierserve_fix", False)
    assert _no_finalize(object()) is None


def test_log_handlers_kept_survive_a_dictconfig_like_vllms(tmp_path):
    """vLLM's engine construction runs `logging.config.dictConfig`, which closes the handlers a
    Serve replica had (its MemoryHandler then has no target: the replica's log file gets nothing
    more). Uses the real dictConfig with vLLM's own default config."""
    import logging
    import logging.config
    import logging.handlers

    from vllm.logger import DEFAULT_LOGGING_CONFIG

    from tierserve.actors.vllm_fixes import log_handlers_kept

    path = tmp_path / "replica.log"
    file_handler = logging.FileHandler(path)
    memory = logging.handlers.MemoryHandler(1, target=file_handler)
    replica = logging.getLogger("tierserve-test.replica")
    replica.propagate = False
    replica.addHandler(memory)
    try:
        replica.warning("before")
        with log_handlers_kept():
            logging.config.dictConfig(DEFAULT_LOGGING_CONFIG)
            assert memory.target is None  # what vLLM's configuration does to it
        replica.warning("after")
        assert path.read_text().splitlines() == ["before", "after"]
        assert memory.buffer == []
    finally:
        replica.removeHandler(memory)
        memory.close()
        file_handler.close()


def test_engine_step_bookkeeping_that_fails_does_not_reach_vllm(caplog):
    """vLLM calls its stat loggers from the output handler, where an exception kills the
    engine; tierserve's step logger logs a failing step callback instead of raising."""
    from tierserve.actors.engine import _step_logger_factory

    calls = []

    def on_step(scheduler_stats, iteration_stats):
        calls.append(1)
        raise ValueError("bookkeeping bug")

    step_logger = _step_logger_factory(on_step)(vllm_config=None)
    with caplog.at_level("ERROR", logger="tierserve.actors.engine"):
        for _ in range(3):
            step_logger.record(None, None)
    assert len(calls) == 3 and step_logger.failures == 3
    assert [r.getMessage() for r in caplog.records] == ["engine step bookkeeping failed (1 times so far)"]
