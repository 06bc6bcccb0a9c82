"""Fixes to the installed vLLM, applied in every vLLM process through its plugin hook.

`vllm_plugin.register` (tierserve's `vllm.general_plugins` entry point) applies them in the
engine-core and worker processes before any model runs, so a fix here reaches code that
tierserve never imports itself. Each fix names the failure it prevents and is a no-op where
vLLM no longer has the problem. `log_handlers_kept` is the one fix for the process that builds
the engine (a tier replica): `VLLMEngine.start` wraps the engine's construction in it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import logging.handlers
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def _empty_top_k_batch() -> None:
    """vLLM 0.32 CPU: a speculating engine dies on a step with no drafted tokens when a request
    in it sets top_k. The rejection sampler then applies top-k to an empty batch, and the
    CPU-only `apply_top_k_only` calls `k.max()` on an empty tensor (RuntimeError in the model
    worker, engine dead). An empty batch has nothing to mask, so return it as it is."""
    from vllm.v1.sample.ops import topk_topp_sampler

    original = topk_topp_sampler.apply_top_k_only
    if getattr(original, "tierserve_fix", False):
        return

    @functools.wraps(original)
    def apply_top_k_only(logits, k):
        if k.numel() == 0:
            return logits
        return original(logits, k)

    apply_top_k_only.tierserve_fix = True  # type: ignore[attr-defined]
    topk_topp_sampler.apply_top_k_only = apply_top_k_only


def expand_per_token(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None) -> None:
    """vLLM's `expand_kernel`: write request i's value (`replace_from` swapped for `replace_to`)
    into output[cu[i-1]:cu[i]], in place, for any dtype.

    vLLM 0.32's CPU stand-in for this Triton kernel converts `output` to int64 and lets the C++
    kernel fill the converted copy, so the caller's tensor keeps uninitialised memory; it also
    truncates float inputs. The rejection sampler expands per-request temperature and top-k with
    it, so random sampling with speculation read garbage temperatures and top-k values (wrong
    samples, or a dead engine on "selected index k out of range")."""
    import torch

    cu = cu_num_tokens.to(torch.long)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = torch.where(input_val == replace_from, torch.tensor(replace_to, dtype=input_val.dtype), input_val)
    expanded = torch.repeat_interleave(values, counts)
    output[: expanded.numel()].copy_(expanded)


def _cpu_expand_kernel() -> None:
    """Swap vLLM's CPU `expand_kernel` stand-in for `expand_per_token`. vLLM registers its CPU
    kernels right after loading plugins, reading them from this module, so it picks ours up."""
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:  # not a CPU build
        return
    cpu_triton_utils._expand_kernel_impl = expand_per_token


def _no_finalize(vllm_config) -> None:
    """Nothing to finalize: the loaded function builds what it needs on its first call."""


def _aot_compile_cache_load() -> None:
    """vLLM 0.32 on CPU compiles the model again at every engine start (about 45 s of a tier's
    restart here), although it saved the compiled function the first time: loading it fails
    with "'function' object has no attribute 'finalize_loading'". vLLM calls that method to
    initialise its backend eagerly, but on CPU the loaded artefact's function is a plain one,
    which initialises itself lazily on its first call (the engine's warm-up). Give it a no-op
    `finalize_loading`, so the saved function is used."""
    import torch

    original = torch.compiler.load_compiled_function
    if getattr(original, "tierserve_fix", False):
        return

    @functools.wraps(original)
    def load_compiled_function(*args, **kwargs):
        loaded = original(*args, **kwargs)
        compiled = getattr(getattr(loaded, "_artifacts", None), "compiled_fn", None)
        if compiled is not None and not hasattr(compiled, "finalize_loading"):
            try:
                compiled.finalize_loading = _no_finalize
            except AttributeError:  # an object that takes no attributes: leave vLLM's fallback
                pass
        return loaded

    load_compiled_function.tierserve_fix = True  # type: ignore[attr-defined]
    torch.compiler.load_compiled_function = load_compiled_function


def _memory_handlers() -> list[logging.handlers.MemoryHandler]:
    """Every buffering handler attached to a logger of this process (the root one included)."""
    loggers = [logging.getLogger()] + [
        lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)
    ]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.handlers.MemoryHandler)]


@contextlib.contextmanager
def log_handlers_kept() -> Iterator[None]:
    """vLLM 0.32 applies its logging configuration with `logging.config.dictConfig` in the process
    that builds an engine, and dictConfig closes every handler the process already had. In a
    Serve replica one of them is Serve's own: a `MemoryHandler` in front of the replica's log
    file, which closing leaves without a target. Nothing the replica logged afterwards reached
    its log file (Serve's access lines, the tier's engine-restart warnings, vLLM's frontend
    errors, anything printed: Serve sends stdout and stderr there too), and the records piled up
    in the handler, which never empties a buffer it cannot hand on. Give the handlers attached
    before back their targets (a closed file handler reopens itself on the next record)."""
    targets = [(handler, handler.target) for handler in _memory_handlers()]
    try:
        yield
    finally:
        for handler, target in targets:
            if handler.target is None and target is not None:
                handler.setTarget(target)
                handler.flush()


def apply_all() -> None:
    """Apply every fix; safe to call more than once per process."""
    _cpu_expand_kernel()
    _empty_top_k_batch()
    _aot_compile_cache_load()
