"""`tierserve models prepare`: idempotent, checksummed, and atomic under a killed conversion."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tierserve.actors.checkpoints import MANIFEST, is_prepared, prepare_embedded, verify_checkpoint

pytestmark = pytest.mark.integration


def test_prepare_is_idempotent_and_verifiable(app):
    # The session fixture prepared the model already: a second call reuses it untouched.
    path = prepare_embedded("smollm2-135m-instruct", progress=False)
    stamp = (path / MANIFEST).stat().st_mtime_ns
    again = prepare_embedded("smollm2-135m-instruct", progress=False)
    assert again == path and (path / MANIFEST).stat().st_mtime_ns == stamp
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    assert "chat_template" in (path / "tokenizer_config.json").read_text() or (path / "chat_template.jinja").exists()
    assert verify_checkpoint(path) == []


def test_verify_detects_a_corrupted_file(tmp_path):
    source = prepare_embedded("smollm2-135m-instruct", progress=False)
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for name in ("config.json", "tokenizer_config.json", MANIFEST):
        (copy / name).write_bytes((source / name).read_bytes())
    (copy / "config.json").write_text("{}")
    bad = verify_checkpoint(copy)
    assert "config.json" in bad and "tokenizer_config.json" not in bad
    assert "model.safetensors" in bad  # missing counts as bad


def test_killed_conversion_never_leaves_a_usable_checkpoint(tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tierserve.cluster.cli", "models", "prepare", "--cache-dir", str(cache)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    models = cache / "models"
    deadline = time.monotonic() + 180
    # Kill it while the conversion is writing its temporary directory.
    while time.monotonic() < deadline and not any(
        p.name.startswith(".") and ".partial-" in p.name for p in _entries(models)
    ):
        assert proc.poll() is None, "conversion finished before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finals = [p for p in _entries(models) if p.is_dir() and not p.name.startswith(".")]
    assert finals == [] and not any(is_prepared(p) for p in _entries(models))


def _entries(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


def test_a_conversion_that_changes_what_the_model_generates_is_never_published(tmp_path):
    from transformers import AutoModelForCausalLM

    from tierserve.actors import fidelity
    from tierserve.actors.checkpoints import check_conversion

    source = prepare_embedded("smollm2-135m-instruct", progress=False)
    model, tokenizer = fidelity.load_reference(str(source))
    check_conversion(model, source)  # the published checkpoint generates what it was made from
    # A conversion that got one tensor wrong (the final norm halved: every logit scaled).
    broken = AutoModelForCausalLM.from_pretrained(source)
    broken.model.norm.weight.data *= 0.5
    broken.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="does not generate what its source does"):
        check_conversion(model, tmp_path)
