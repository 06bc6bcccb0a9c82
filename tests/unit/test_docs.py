"""The docs point at files that exist: every relative link in README.md and docs/, and every
Markdown file under docs/ that a source file, config or doc names."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
NAMED = re.compile(r"\bdocs/[\w./-]+\.md\b")


def _tracked(*suffixes: str) -> list[Path]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in files if f.endswith(suffixes) and (ROOT / f).exists()]


def test_relative_links_resolve():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in LINK.findall(doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_named_docs_exist():
    missing = sorted(
        {
            f"{path.relative_to(ROOT)}: {name}"
            for path in _tracked(".py", ".md", ".yaml", ".yml", ".toml")
            for name in NAMED.findall(path.read_text(errors="replace"))
            if not (ROOT / name).exists()
        }
    )
    assert not missing, missing


DOCS = ("README.md", "docs/", "configs/rag/corpus/")
"""What people read: the README, docs/ and the handbook corpus the retriever serves."""


def _prose() -> list[Path]:
    return [p for p in _tracked(".md") if str(p.relative_to(ROOT)).startswith(DOCS)]


def test_named_metrics_are_ones_the_code_defines():
    defined = {
        name
        for package in ("actors", "router", "rag", "safety", "core")
        for path in (ROOT / package).glob("*.py")
        for name in re.findall(r'"(tierserve_[a-z_]+)"', path.read_text())
    }
    unknown = sorted(
        {
            f"{doc.relative_to(ROOT)}: {name}"
            for doc in _prose()
            for name in re.findall(r"\b(?:ray_)?(tierserve_[a-z_]+)", doc.read_text())
            if re.sub(r"_(total|bucket|count|sum)$", "", name) not in defined
        }
    )
    assert not unknown, unknown


PACKAGE_PATH = re.compile(r"\btierserve\.(?:core|actors|router|rag|safety|cluster|configs)(?:\.[A-Za-z_]\w*)*")
"""A dotted name inside one of tierserve's packages (span names and attributes such as
`tierserve.token.index` are not)."""


def test_named_modules_and_objects_exist():
    import importlib

    missing = []
    for doc in _prose():
        for dotted in set(re.findall(PACKAGE_PATH, doc.read_text())):
            parts = dotted.split(".")
            for cut in range(len(parts), 1, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                try:
                    for attr in parts[cut:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    missing.append(f"{doc.relative_to(ROOT)}: {dotted}")
                break
            else:
                missing.append(f"{doc.relative_to(ROOT)}: {dotted}")
    assert not missing, sorted(missing)
