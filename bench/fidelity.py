"""Fidelity and cost per dtype: which dtype may the embedded default serve in?

For each dtype, starts the `small` tier's engine of configs/local.yaml with that dtype (in this
process, as its deployment would: `tierserve.actors.fidelity.tier_engine`), checks it against
the checkpoint in transformers float32 on the fixed prompt set (greedy agreement, identical
answers, first divergences, largest top-k logprob difference), then times decoding: one stream
and `--batch` streams at once, `--tokens` tokens each (ignore_eos), per token and per request.

    .venv/bin/python bench/fidelity.py [--dtype D ...] [--batch 8] [--tokens 64] [--no-write]
                                       [--no-storage | --storage-only]

Then, for the checkpoint's storage: the GGUF model (dequantised, float32) against the same
weights rounded to each storage dtype and computed in float32 (transformers, in memory), with
the same check (`--no-storage` skips it).

Prints the tables and writes them to docs/benchmarks/fidelity.md (sections `fidelity`, `storage`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import replace_section  # noqa: E402

DTYPES = ["float32", "bfloat16", "float16"]


async def decode_ms(engine, prompt_ids: list[int], streams: int, tokens: int) -> tuple[float, float]:
    """Wall time of `streams` requests of `tokens` tokens at once: (ms per token of one stream,
    ms per request)."""
    from tierserve.actors.types import GenerateRequest, SamplingOptions

    async def one(i: int) -> int:
        sampling = SamplingOptions(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        request = GenerateRequest(f"decode-{streams}-{i}-{time.monotonic_ns()}", sampling, prompt_token_ids=prompt_ids)
        return sum([len(c.token_ids) async for c in engine.generate(request)])

    await one(-1)  # warm this batch shape
    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    wall = 1e3 * (time.perf_counter() - started)
    assert all(n == tokens for n in counts), counts
    return wall / tokens, wall


async def measure(tier, ref, dtype: str, batch: int, tokens: int) -> dict:
    from tierserve.actors import fidelity

    row: dict = {"dtype": dtype}
    try:
        started = time.perf_counter()
        async with fidelity.tier_engine(tier, dtype) as engine:
            row["start_s"] = time.perf_counter() - started
            generations = await fidelity.engine_greedy(engine, ref.prompts_ids)
            report = fidelity.check(dtype, ref.prompts, ref.generations, generations, ref.tokenizer)
            row["one_ms_per_token"], row["one_ms"] = await decode_ms(engine, ref.prompts_ids[0], 1, tokens)
            row["batch_ms_per_token"], row["batch_ms"] = await decode_ms(engine, ref.prompts_ids[0], batch, tokens)
    except Exception as exc:  # a dtype the engine cannot run is a result, not a crash
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return row
    capital = report.results[fidelity.PROMPTS.index("What is the capital of France?")]
    row.update(
        passed=report.passed,
        agreement=report.agreement,
        identical=report.identical,
        prompts=len(report.results),
        max_logprob_diff=report.max_logprob_diff,
        failures=report.failures(),
        capital=capital.candidate_text,
    )
    return row


def table(rows: list[dict], batch: int) -> str:
    base = next((r for r in rows if r["dtype"] == "float32" and "error" not in r), None)
    lines = [
        "| dtype | check | greedy agreement | identical answers | max top-5 logprob diff | "
        "'What is the capital of France?' | engine start s | 1 stream: ms/token | "
        f"{batch} streams: ms/token (ms/request) | vs float32 at {batch} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['dtype']} | cannot run: {r['error']} | | | | | | | | |")
            continue
        ratio = f"{r['batch_ms_per_token'] / base['batch_ms_per_token']:.2f}x" if base else "-"
        capital = r["capital"].replace("\n", " ").replace("|", "\\|")
        lines.append(
            f"| {r['dtype']} | {'pass' if r['passed'] else 'FAIL'} | {r['agreement']:.3f} | "
            f"{r['identical']}/{r['prompts']} | {r['max_logprob_diff']:.3f} | {capital[:60]} | {r['start_s']:.0f} | "
            f"{r['one_ms_per_token']:.1f} | {r['batch_ms_per_token']:.1f} ({r['batch_ms']:.0f}) | {ratio} |"
        )
    failures = [f"- {r['dtype']}: " + "; ".join(r["failures"]) for r in rows if r.get("failures")]
    if failures:
        lines += ["", "First divergences that fail the check:", "", *failures]
    return "\n".join(lines)


def storage(dtypes: list[str]) -> str:
    """The GGUF model against its weights rounded to each dtype (computed in float32)."""
    import copy

    import torch

    from tierserve.actors import fidelity
    from tierserve.actors.checkpoints import EMBEDDED_MODELS, gguf_path, load_gguf

    source, tokenizer = load_gguf(gguf_path(EMBEDDED_MODELS["smollm2-135m-instruct"]))
    ids = fidelity.prompt_token_ids(tokenizer)
    expected = fidelity.transformers_greedy(source, ids)
    lines = [
        "| weights stored as | check | identical answers | max top-5 logprob diff | answers that differ |",
        "|---|---|---|---|---|",
    ]
    for dtype in dtypes:
        rounded = copy.deepcopy(source).to(getattr(torch, dtype)).to(torch.float32)
        report = fidelity.check(
            dtype, fidelity.PROMPTS, expected, fidelity.transformers_greedy(rounded, ids), tokenizer
        )
        differ = "; ".join(
            f"{r.prompt!r}: {r.reference_text!r} -> {r.candidate_text!r}".replace("\n", " ").replace("|", "\\|")
            for r in report.results
            if r.reference_text != r.candidate_text
        )
        lines.append(
            f"| {dtype} | {'pass' if report.passed else 'FAIL'} | {report.identical}/{len(report.results)} | "
            f"{report.max_logprob_diff:.3f} | {differ or '-'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", action="append", help=f"dtypes to try (default: {', '.join(DTYPES)})")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-storage", action="store_true", help="skip the storage-dtype table")
    parser.add_argument("--storage-only", action="store_true", help="only the storage-dtype table")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from tierserve.actors import fidelity
    from tierserve.actors.checkpoints import resolve_model
    from tierserve.cluster.config import load_config

    if args.storage_only:
        return write_storage(args.no_write)
    config = load_config(REPO / "configs" / "local.yaml")
    tier = next(t for t in config.tiers if t.name == "small")
    ref = fidelity.reference(resolve_model(tier.model))
    rows = []
    for dtype in args.dtype or DTYPES:
        rows.append(asyncio.run(measure(tier, ref, dtype, args.batch, args.tokens)))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows, args.batch)
    print(text)
    if not args.no_write:
        dtypes = "".join(f" --dtype {d}" for d in args.dtype or [])
        head = (
            f"`.venv/bin/python bench/fidelity.py{dtypes} --batch {args.batch} --tokens {args.tokens}` "
            f"({time.strftime('%Y-%m-%d')}, {platform.machine()}, {psutil.cpu_count()} cores; the `small` tier's "
            f"engine against the checkpoint in transformers float32, {len(ref.prompts)} prompts, "
            f"{fidelity.MAX_TOKENS} tokens greedy):\n\n"
        )
        replace_section(REPO / "docs" / "benchmarks" / "fidelity.md", "fidelity", head + text)
    return 0 if args.no_storage else write_storage(args.no_write)


def write_storage(no_write: bool) -> int:
    text = storage(["float32", "bfloat16"])
    print(text)
    if not no_write:
        head = (
            f"`.venv/bin/python bench/fidelity.py --storage-only` ({time.strftime('%Y-%m-%d')}; the GGUF model, "
            "dequantised in float32, against its weights rounded to each dtype, both computed in float32 in "
            "transformers):\n\n"
        )
        replace_section(REPO / "docs" / "benchmarks" / "fidelity.md", "storage", head + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
