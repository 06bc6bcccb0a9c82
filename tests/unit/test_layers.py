"""The import contracts in pyproject.toml ([tool.importlinter]) hold, and cover every package.

`make lint` runs the same check (`lint-imports`); this test makes every test run, CI's included,
refuse an import that points up a layer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_import_contracts_are_kept():
    # In a process of its own: the linter's command line reconfigures logging process-wide.
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    contracts = len(_pyproject()["tool"]["importlinter"]["contracts"])
    assert f"{contracts} kept, 0 broken" in run.stdout, run.stdout


def test_every_code_package_is_in_a_layer():
    pyproject = _pyproject()
    code = {p for p in pyproject["tool"]["setuptools"]["packages"] if p != "tierserve.configs"}
    linter = pyproject["tool"]["importlinter"]
    assert set(linter["root_packages"]) == code
    layers = next(c["layers"] for c in linter["contracts"] if c["type"] == "layers")
    layered = {name.strip() for layer in layers for name in layer.split("|")}
    assert layered == code


def test_no_module_over_500_lines():
    """A module past 500 lines is usually two ideas (bench/ and tests/ aside)."""
    packages = _pyproject()["tool"]["importlinter"]["root_packages"]
    long = {
        str(path.relative_to(ROOT)): n
        for package in packages
        for path in (ROOT / package.removeprefix("tierserve.")).glob("*.py")
        if (n := len(path.read_text().splitlines())) > 500
    }
    assert not long, long
