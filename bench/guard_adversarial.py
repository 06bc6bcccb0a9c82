"""Guard time on crafted inputs: does any family of inputs make the guards super-linear?

Every family of tests/unit/test_guard_linear.py (long runs of what a pattern, tokenizer or
splitter keeps looking at: `token=` repeated, digit runs, dots before an `@`, `http://` repeated,
whitespace, punctuation, thousands of addresses, ...) at 6, 12, 24 and 48 KB, and one word of a
million characters, through

* the PII guard of the embedded config (configs/local.yaml: the default entities),
* the injection guard in heuristic mode, and in classifier mode (the embedded config's; it embeds
  at most 24 segments of a text, so its cost past ~8 KB is the heuristic's plus a constant).

Times are CPU time of the checking thread (torch on one thread), the least of two runs, so other
load on the machine does not count. Linear time means a flat ms/KB down a family's rows; the
classifier's time levels off instead.

    .venv/bin/python bench/guard_adversarial.py [--write]

Prints a markdown table; --write also writes it to docs/benchmarks/guard-adversarial.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))

from test_guard_linear import FAMILIES, cpu_seconds  # noqa: E402  (the crafted inputs, defined once with their test)

SIZES_KB = (6, 12, 24, 48)
WORD_CHARS = 1_000_000
"""The one-word row: as long as spaCy takes a text."""


def cpu_ms(check: Callable[[str], object], text: str) -> float:
    return cpu_seconds(check, text, repeats=2) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="also write docs/benchmarks/guard-adversarial.md")
    args = parser.parse_args()

    import torch

    from tierserve.cluster.config import load_config
    from tierserve.safety.config import InjectionGuardConfig, PiiGuardConfig
    from tierserve.safety.injection import InjectionGuard
    from tierserve.safety.pii import PiiGuard

    torch.set_num_threads(1)
    embedded = load_config(check_engine=False).safety.guards
    pii = PiiGuard(next(g for g in embedded if isinstance(g, PiiGuardConfig)))
    injection_config = next(g for g in embedded if isinstance(g, InjectionGuardConfig))
    heuristic = InjectionGuard(injection_config.model_copy(update={"mode": "heuristic"}))
    try:
        classifier = InjectionGuard(injection_config, Path(tempfile.mkdtemp(prefix="tierserve-bench-adversarial-")))
    except (OSError, ValueError) as exc:  # no embedder on this machine: the column stays empty
        print(f"classifier mode unavailable: {exc}", file=sys.stderr)
        classifier = None

    cases = [(family, build(kb * 1000)) for family, build in FAMILIES.items() for kb in SIZES_KB]
    cases.append(("one word", FAMILIES["one word"](WORD_CHARS)))
    lines = [
        "| family | size (KB) | PII (ms) | injection, heuristic (ms) | injection, classifier (ms) "
        "| PII + heuristic, ms per KB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for family, text in cases:
        kb = len(text) / 1000
        pii_ms = cpu_ms(lambda t: pii.detect(t, "input"), text)
        heuristic_ms = cpu_ms(lambda t: heuristic.detect(t, "input"), text)
        classifier_ms = None if classifier is None else cpu_ms(lambda t: classifier.detect(t, "input"), text)
        per_kb = (pii_ms + heuristic_ms) / kb
        shown = "-" if classifier_ms is None else f"{classifier_ms:.1f}"
        lines.append(f"| `{family}` | {kb:g} | {pii_ms:.1f} | {heuristic_ms:.1f} | {shown} | {per_kb:.2f} |")
        print(lines[-1], flush=True)
    body = "\n".join(lines)
    if not args.write:
        return 0
    header = f"""# Guards on crafted inputs

Written by `bench/guard_adversarial.py` (`.venv/bin/python bench/guard_adversarial.py --write`); one
run on {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}
(one thread). CPU time of the checking thread, the least of two runs; the families are defined in
tests/unit/test_guard_linear.py, which fails when 8 times the text takes over 20 times the time.
A flat ms/KB down a family's rows is linear time; the classifier embeds at most 24 segments of a
text, so its time levels off. The costliest families are digit-dense text (phone-like, dotted or
spaced digits, addresses), where libphonenumber's matcher tries every candidate in each of seven
regions.

"""
    (REPO / "docs" / "benchmarks" / "guard-adversarial.md").write_text(header + body + "\n")
    print("written to docs/benchmarks/guard-adversarial.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
