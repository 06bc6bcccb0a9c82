"""The HTTP API fuzz test (tests/integration/test_fuzz.py) at length: more generated requests per
route and mode, and a random seed per run unless one is given, against the embedded default.

    .venv/bin/python bench/fuzz.py [--examples 1000] [--seed N] [--no-write]

Prints the status codes answered and writes them to docs/reliability.md (section `fuzz`). CI
runs the same test seeded (Hypothesis' derandomized seed) with 60 examples per route and mode.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import replace_section  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    env = {**os.environ, "TIERSERVE_FUZZ_EXAMPLES": str(args.examples), "TIERSERVE_FUZZ_SEED": str(seed)}
    started = time.monotonic()
    run = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
            f"--hypothesis-seed={seed}", "tests/integration/test_fuzz.py",
        ],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    minutes = (time.monotonic() - started) / 60
    statuses = re.search(r"fuzz statuses: (\{.*\})", run.stdout)
    summary = re.findall(r"^(\d+ (?:passed|failed).*)$", run.stdout, re.MULTILINE)
    result = summary[-1] if summary else f"pytest exited {run.returncode}"
    text = (
        f"`.venv/bin/python bench/fuzz.py --examples {args.examples} --seed {seed}` ({time.strftime('%Y-%m-%d')}, "
        f"{minutes:.0f} min): status codes answered {statuses.group(1) if statuses else 'n/a'}; {result}."
    )
    print(text)
    if run.returncode != 0:
        print(run.stdout[-20000:], run.stderr[-5000:], sep="\n")
    if not args.no_write:
        replace_section(REPO / "docs" / "reliability.md", "fuzz", text)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
