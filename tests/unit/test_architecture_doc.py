"""docs/architecture.md's picture stays in step with the code: one box per module on disk, each
package in the band of its layer in the import contract, every arrow between boxes that exist."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("cluster", "router", "actors", "rag", "safety", "core")


def _mermaid() -> str:
    (block,) = re.findall(r"```mermaid\n(.*?)```", DOC.read_text(), re.S)
    return block


def _subgraphs(block: str) -> dict[str, list[str]]:
    """Each subgraph's id and the ids declared directly or in nested subgraphs inside it."""
    members: dict[str, list[str]] = {}
    stack: list[str] = []
    for line in block.splitlines():
        line = line.strip()
        if m := re.match(r"subgraph (\w+)", line):
            stack.append(m.group(1))
            members[m.group(1)] = []
        elif line == "end":
            stack.pop()
        elif m := re.match(r"(\w+)\[", line):
            for name in stack:
                members[name].append(m.group(1))
        if stack and (m := re.match(r"subgraph (\w+)", line)) and len(stack) > 1:
            members[stack[-2]].append(m.group(1))
    return members


def test_one_box_per_module():
    members = _subgraphs(_mermaid())
    for package in PACKAGES:
        on_disk = {f"{package}_{p.stem}" for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
        boxes = {m for m in members[package] if m.startswith(f"{package}_")}
        assert boxes == on_disk, f"{package}: missing {sorted(on_disk - boxes)}, stale {sorted(boxes - on_disk)}"


def test_packages_sit_in_their_layer():
    layers = next(
        c["layers"]
        for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
        if c["type"] == "layers"
    )
    members = _subgraphs(_mermaid())
    bands = [name for name in members if name.startswith("layer_")]
    assert len(bands) == len(layers)
    for band, layer in zip(bands, layers):  # top to bottom, in both
        packages = {name.strip().removeprefix("tierserve.") for name in layer.split("|")}
        assert {m for m in members[band] if m in PACKAGES} == packages, band


def test_arrows_join_existing_boxes():
    block = _mermaid()
    declared = set(re.findall(r"^\s*(\w+)[\[(]", block, re.M))
    arrows = re.findall(r"^\s*(\w+) -[.-]*.*?[->]+\|?.*?\|?\s*(\w+)\s*$", block, re.M)
    assert len(arrows) >= 16
    for source, target in arrows:
        assert source in declared and target in declared, (source, target)
    steps = [int(n) for n in re.findall(r'\|"(\d+) ', block)] + [int(n) for n in re.findall(r'\|"(\d+)"\|', block)]
    assert sorted(steps) == list(range(1, max(steps) + 1)), "the request path's steps are numbered 1..n once each"


def test_the_request_path_points_down_and_its_module_counts_are_stated():
    """Solid numbered arrows carry the request on (the modules a reader follows it through, at
    most 12); dotted ones are questions a step asks and gets answered. The doc states both
    counts."""
    block = _mermaid()
    members = _subgraphs(block)
    bands = [name for name in members if name.startswith("layer_")]
    band_of = {box: i for i, band in enumerate(bands) for box in members[band]}
    carried = re.findall(r'^\s*(\w+) -->\|"\d+[^|]*\|\s*(\w+)\s*$', block, re.M)
    asked = re.findall(r'^\s*(\w+) -\.->\|"\d+[^|]*\|\s*(\w+)\s*$', block, re.M)
    for source, target in carried + asked:
        if source in band_of and target in band_of:
            assert band_of[target] >= band_of[source], f"{source} -> {target} points up a layer"
    followed = {box for arrow in carried for box in arrow if box in band_of}
    consulted = {box for arrow in asked for box in arrow if box in band_of} - followed
    text = " ".join(DOC.read_text().split())
    assert len(followed) <= 12
    assert f"follows the request through {len(followed)} modules" in text
    assert f"{len(consulted)} more modules" in text
