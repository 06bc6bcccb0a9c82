"""The docs point at files that exist: every relative link in README.md and docs/, and every
Markdown file under docs/ that a source file, config or doc names."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

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


def test_the_readme_layout_table_names_every_module():
    """Each package's row in the README's layout table names every module of the package, as
    `module`, and no module the package does not have."""
    readme = (ROOT / "README.md").read_text()
    for package in ("core", "actors", "router", "rag", "safety", "cluster"):
        (row,) = re.findall(rf"^\| `{package}/` \| `tierserve\.{package}` \|(.*)\|$", readme, re.M)
        named = set(re.findall(r"`(\w+)`", row))
        modules = {p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
        assert modules <= named, f"{package}: the layout table does not name {sorted(modules - named)}"
        assert named <= modules, f"{package}: the layout table names {sorted(named - modules)}, not modules"


CONFIG_KEY = re.compile(r"`((?:server|ray|ingress|routing|telemetry|rag|safety|cluster|deployment|engine)(?:\.\w+)+)`")
HEADER = re.compile(r"`(x-[a-z-]+)`")
COMMAND = re.compile(r"`tierserve ((?!is )[a-z]+(?: [a-z]+)?)")
ENDPOINT = re.compile(r"`(?:GET |POST )?(/v1/[a-z/]+|/health)`")


def _key_exists(key: str) -> bool:
    """Whether `key` (`routing.complexity.mode`; `deployment.*` and `engine.*` as in a tier)
    is a field path of the config schema; a mapping's keys (`routing.tiers.quality`) are the
    user's, and a Python module's name (`ray.util.metrics`) is not a key."""
    import importlib.util
    import typing

    from pydantic import BaseModel

    from tierserve.actors.config import TierConfig
    from tierserve.cluster.config import AppConfig

    try:
        if importlib.util.find_spec(key) is not None:
            return True
    except ModuleNotFoundError:
        pass
    parts = key.split(".")
    model: Any = TierConfig if parts[0] in ("deployment", "engine") else AppConfig
    i = 0
    while i < len(parts):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return True  # a free-form value (`engine`, `env`): its keys are the user's
        field = model.model_fields.get(parts[i])
        if field is None:
            return False
        annotation = field.annotation
        if typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
            i += 1  # the mapping's key
        args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), args[0])
        i += 1
    return True


def test_the_handbook_and_docs_name_config_headers_commands_and_endpoints_that_exist():
    """What people read (README, docs/ and the handbook corpus the retriever serves) names only
    config keys of the schema, headers the code sends or reads, CLI commands the parser has, and
    endpoints the ingress serves: the handbook is checked against the same code as docs/."""
    from tierserve.cluster.cli import parser

    source = "\n".join(p.read_text() for p in _tracked(".py") if p.parts[len(ROOT.parts)] not in ("tests", "bench"))
    commands = {" ".join(c.split()[:2]) for c in _commands(parser())}
    wrong = []
    for doc in _prose():
        text = doc.read_text()
        where = doc.relative_to(ROOT)
        wrong += [f"{where}: config key {k}" for k in set(CONFIG_KEY.findall(text)) if not _key_exists(k)]
        wrong += [f"{where}: header {h}" for h in set(HEADER.findall(text)) if f'"{h}"' not in source]
        for command in set(COMMAND.findall(text)):
            if command not in commands and command.split()[0] not in commands:
                wrong.append(f"{where}: command tierserve {command}")
        wrong += [f"{where}: endpoint {e}" for e in set(ENDPOINT.findall(text)) if f'"{e}"' not in source]
    assert not wrong, sorted(wrong)


def _commands(p: Any, prefix: str = "") -> list[str]:
    """Every command path of an argparse parser: `serve`, `models prepare`, ..."""
    import argparse

    out = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append(f"{prefix}{name}")
                out += _commands(sub, f"{prefix}{name} ")
    return out


FIGURE = re.compile(r"(?<![\w.\-/+])(\d+(?:\.\d+)?)(?![.\d])(?=\s?(?:ms\b|s\b|%|x\b|chunks/s|tokens/s|MB/s))")
"""A measured figure with its unit: `11.1 ms`, `30 s`, `76%`, `1.65x`, `32.1 chunks/s`."""
GOAL = re.compile(r"\b(?:goal|aim|budget)", re.I)
"""A figure shortly after these words is a target, not a measurement."""
GENERATED = re.compile(r"<!-- begin: ([\w-]+) -->.*?<!-- end: \1 -->", re.S)
"""A block a benchmark writes into a doc: the figures' own source."""


def _reported(figure: str, numbers: list[str]) -> bool:
    """Whether a report states `figure`, to its precision (`39.6` for 39.55; `1.6%` for 0.016)."""
    digits = len(figure.partition(".")[2])
    value, tolerance = float(figure), 0.5 * 10**-digits + 1e-9
    return any(
        abs(float(n) - value) <= tolerance or (float(n) <= 1 and abs(100 * float(n) - value) <= tolerance)
        for n in numbers
    )


def test_figures_next_to_a_benchmark_report_are_the_reports():
    """A paragraph of the README or docs/ that links a benchmark report (else its `##` section,
    if that does) states only measured figures that a report it links states: a report rerun,
    the prose cannot keep the old ones."""

    def linked(text: str) -> set[str]:
        return {name.removeprefix("docs/") for name in re.findall(r"(?:docs/)?benchmarks/[\w-]+\.md", text)}

    stale = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = GENERATED.sub("", re.sub(r"```.*?```", "", doc.read_text(), flags=re.S))
        for section in re.split(r"\n(?=## )", text):
            for paragraph in re.split(r"\n\s*\n", section):
                reports = linked(paragraph) or linked(section)
                if not reports:
                    continue
                reported = "".join((ROOT / "docs" / r).read_text() for r in sorted(reports))
                numbers = re.findall(r"\d+(?:\.\d+)?", reported)
                where = f"{doc.name} {section.splitlines()[0]!r}"
                for m in FIGURE.finditer(paragraph):
                    if not GOAL.search(paragraph[max(0, m.start() - 30) : m.start()]) and not _reported(m[1], numbers):
                        stale.append(f"{where}: {m[1]}")
    assert not stale, sorted(stale)
