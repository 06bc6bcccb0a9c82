"""Guard evaluation: PII precision/recall/F2 per entity, injection true/false positive rates,
guard cost per 1 KB, and what output redaction adds to time to first token.

1. PII: the PII guard with the default entities on the generated set of bench/pii_corpus.py
   (templates apart from the tuning examples). A prediction is a true positive when it has the
   entity type of a true span it overlaps; "redaction recall" counts a true span as caught when
   any finding covers it, whatever the type (what matters for redaction).
2. Injection: the held-out split of configs/safety/injection.jsonl (phrasings apart from the
   training split), both modes, at the configured threshold; rates per kind.
3. Cost: `GuardChain.check` on 1 KB texts of prose with a few entities, one thread, per guard
   and for the embedded default's chain (PII + injection).
4. Time to first token: real answers' token streams (SmolLM2's tokenizer, decoded token by token
   as the engine's detokenizer does) replayed through the streaming output guard. Without the
   guard the first token is sent at once; with it, the first text goes out after the tokens it
   holds back (an unfinished word) plus the guard's compute. Added TTFT in ms = held tokens x
   TPOT + compute, for the TPOT given (default 17.2 ms: tierserve's TPOT at concurrency 1 in
   docs/benchmarks/serving.md; pass yours with --tpot-ms).

    .venv/bin/python bench/safety.py [--tpot-ms 17.2] [--no-write]

Prints the tables and writes them to docs/benchmarks/safety-benchmark.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pii_corpus import generate  # noqa: E402


def f_beta(p: float, r: float, beta: float = 2.0) -> float:
    return 0.0 if p + r == 0 else (1 + beta**2) * p * r / (beta**2 * p + r)


def pii_eval(guard) -> list[dict]:
    samples = generate()
    stats: dict[str, dict[str, int]] = {}
    for sample in samples:
        found = guard.detect(sample.text, "input")
        for entity, start, end in sample.spans:
            s = stats.setdefault(entity, {"tp": 0, "fp": 0, "fn": 0, "covered": 0, "true": 0})
            s["true"] += 1
            s["covered"] += any(f.start <= start and f.end >= end for f in found)
        for f in found:
            match = [e for e, a, b in sample.spans if e == f.entity and f.start < b and a < f.end]
            s = stats.setdefault(f.entity, {"tp": 0, "fp": 0, "fn": 0, "covered": 0, "true": 0})
            s["tp" if match else "fp"] += 1
        for entity, start, end in sample.spans:
            if not any(f.entity == entity and f.start < end and start < f.end for f in found):
                stats[entity]["fn"] += 1
    rows = []
    for entity, s in sorted(stats.items()):
        p = s["tp"] / (s["tp"] + s["fp"]) if s["tp"] + s["fp"] else 1.0
        r = s["tp"] / (s["tp"] + s["fn"]) if s["tp"] + s["fn"] else 1.0
        rows.append(
            {
                "entity": entity,
                "true": s["true"],
                "precision": p,
                "recall": r,
                "f2": f_beta(p, r),
                "redaction_recall": s["covered"] / s["true"] if s["true"] else None,
            }
        )
    return rows


def injection_eval(cache_dir: Path, thresholds: tuple[float, ...] = (0.5, 0.6)) -> list[dict]:
    """Rates on the held-out split per mode, kind and threshold, plus the share of the router's
    570 ordinary prompts (configs/complexity/prompts.jsonl, all benign) that would be flagged."""
    from tierserve.router.complexity import load_prompts
    from tierserve.safety.config import InjectionGuardConfig
    from tierserve.safety.injection import InjectionGuard, load_examples

    held = load_examples(split="heldout")
    ordinary = [p.text for p in load_prompts()]
    rows = []
    for mode in ("heuristic", "classifier"):
        guard = InjectionGuard(InjectionGuardConfig(mode=mode), cache_dir)
        scores = [guard.score(x.text) for x in held]
        ordinary_scores = [guard.score(t) for t in ordinary]
        for threshold in thresholds:
            flagged = [s >= threshold for s in scores]
            for kind in ("direct", "indirect", "benign", "all"):
                pos = [f for f, x in zip(flagged, held) if x.label and kind in (x.kind, "all")]
                neg = [f for f, x in zip(flagged, held) if not x.label and kind in (x.kind, "all")]
                rows.append(
                    {
                        "mode": mode,
                        "threshold": threshold,
                        "kind": kind,
                        "positives": len(pos),
                        "negatives": len(neg),
                        "tpr": np.mean(pos) if pos else None,
                        "fpr": np.mean(neg) if neg else None,
                    }
                )
            rows.append(
                {
                    "mode": mode,
                    "threshold": threshold,
                    "kind": "ordinary prompts",
                    "positives": 0,
                    "negatives": len(ordinary),
                    "tpr": None,
                    "fpr": float(np.mean([s >= threshold for s in ordinary_scores])),
                }
            )
    return rows


KB_TEXT = (
    "Thanks for getting back to me about the renewal. I checked the contract again this morning and the "
    "terms look fine, although the payment schedule in section four still mentions the old quarterly plan. "
    "Could you send the updated version to maria.santos@mailbox.org so legal can sign it this week? If anything "
    "is unclear, my direct line is (415) 555-0147 and I am usually at my desk before noon. For the wire transfer, "
    "finance asked me to confirm the account DE89 3704 0044 0532 0130 00, which matches what we used last year. "
    "The dashboard still shows the old numbers, probably because the sync job from 10.20.30.40 failed overnight; "
    "I opened a ticket with the platform team. Once the documents are signed, we can schedule the kickoff call "
    "and share the onboarding checklist with everyone involved. Let me know if Thursday works for you."
)


def cost(chains: dict, repeats: int = 200) -> list[dict]:
    text = (KB_TEXT * 2)[:1024]
    rows = []
    for name, chain in chains.items():
        chain.check(text, "input")  # warm
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            chain.check(text, "input")
            times.append(1e3 * (time.perf_counter() - started))
        rows.append(
            {"chain": name, "p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}
        )
    return rows


ANSWERS = [
    "Sure! The small tier is the fast profile: it has a 2k context, no speculation, and short answers.",
    "You can send a latency budget with the x-slo-ttft-ms and x-slo-tpot-ms headers, or name an SLA class.",
    "Paris is the capital of France. It has been the capital since the tenth century.",
    "To reach support, write to help.desk@corp.example.com or call +1 415 555 0199 during office hours.",
    "Your order 55231 ships tomorrow; the tracking page is https://track.example.com/p/55231 once it leaves.",
    "Here is a short Python function:\n\ndef add(a, b):\n    return a + b\n",
]


def ttft(chain, tokenizer, tpot_ms: float, answers: list[str] = ANSWERS) -> list[dict]:
    from tierserve.safety.chain import StreamGuard

    rows = []
    for answer in answers:
        ids = tokenizer.encode(answer, add_special_tokens=False)
        deltas, previous = [], ""
        for i in range(1, len(ids) + 1):
            text = tokenizer.decode(ids[:i])
            deltas.append(text[len(previous) :])
            previous = text
        guard = StreamGuard(chain)
        held, compute = None, 0.0
        for n, delta in enumerate(deltas, 1):
            started = time.perf_counter()
            out = guard.feed(delta)
            compute += time.perf_counter() - started
            if out:
                held = n - 1
                break
        if held is None:  # the whole answer was one unfinished word
            held = len(deltas)
        rows.append(
            {
                "answer": answer[:48].replace("\n", " ") + "...",
                "tokens": len(deltas),
                "held_tokens": held,
                "compute_ms": 1e3 * compute,
                "added_ttft_ms": held * tpot_ms + 1e3 * compute,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tpot-ms", type=float, default=17.2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import tempfile

    import torch
    from transformers import AutoTokenizer

    from tierserve.actors.checkpoints import prepare_embedded
    from tierserve.safety.chain import GuardChain
    from tierserve.safety.config import InjectionGuardConfig, PiiGuardConfig
    from tierserve.safety.injection import InjectionGuard
    from tierserve.safety.pii import PiiGuard

    torch.set_num_threads(1)
    cache = Path(tempfile.mkdtemp(prefix="tierserve-bench-safety-"))
    started = time.perf_counter()
    pii = PiiGuard(PiiGuardConfig())
    pii_build_s = time.perf_counter() - started
    started = time.perf_counter()
    injection = InjectionGuard(InjectionGuardConfig(), cache)
    injection_build_s = time.perf_counter() - started

    print("PII ...", flush=True)
    pii_rows = pii_eval(pii)
    print("injection ...", flush=True)
    injection_rows = injection_eval(cache)
    print("cost ...", flush=True)
    chains = {
        "pii": GuardChain([(pii, {"input": "redact"})]),
        "injection": GuardChain([(injection, {"input": "block"})]),
        "pii + injection (embedded default)": GuardChain([(pii, {"input": "redact"}), (injection, {"input": "block"})]),
    }
    cost_rows = cost(chains)
    print("ttft ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(prepare_embedded("smollm2-135m-instruct", progress=False))
    ttft_rows = ttft(GuardChain([(pii, {"output": "redact"})]), tokenizer, args.tpot_ms)

    lines = [
        "## PII detection (generated set, bench/pii_corpus.py)",
        "",
        "| entity | true spans | precision | recall | F2 | redaction recall (any type) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in pii_rows:
        rr = "-" if r["redaction_recall"] is None else f"{r['redaction_recall']:.2f}"
        lines.append(
            f"| {r['entity']} | {r['true']} | {r['precision']:.2f} | {r['recall']:.2f} | {r['f2']:.2f} | {rr} |"
        )
    lines += [
        "",
        "## Prompt injection (held-out split of configs/safety/injection.jsonl)",
        "",
        "| mode | threshold | kind | injections | benign | true positive rate | false positive rate |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in injection_rows:
        tpr = "-" if r["tpr"] is None else f"{r['tpr']:.2f}"
        fpr = "-" if r["fpr"] is None else f"{r['fpr']:.3f}"
        lines.append(
            f"| {r['mode']} | {r['threshold']:g} | {r['kind']} | {r['positives']} | {r['negatives']} | {tpr} | {fpr} |"
        )
    lines += [
        "",
        "## Guard cost per 1 KB of input (one thread; goal p50 <= 5 ms)",
        "",
        f"Building the guards once: PII {pii_build_s:.1f} s, injection {injection_build_s:.1f} s (training "
        "the classifier on a cold cache included).",
        "",
        "| chain | p50 (ms) | p99 (ms) |",
        "|---|---:|---:|",
    ]
    for r in cost_rows:
        lines.append(f"| {r['chain']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    lines += [
        "",
        f"## Time to first token with output redaction (replayed token streams; TPOT {args.tpot_ms:g} ms)",
        "",
        "| answer | tokens | tokens held before the first text | guard compute (ms) | TTFT added (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in ttft_rows:
        lines.append(
            f"| {r['answer']} | {r['tokens']} | {r['held_tokens']} | {r['compute_ms']:.2f} | {r['added_ttft_ms']:.1f} |"
        )
    body = "\n".join(lines)
    print(body)
    if args.no_write:
        return 0
    header = f"""# Safety benchmark

Written by `bench/safety.py` (`.venv/bin/python bench/safety.py --tpot-ms {args.tpot_ms:g}`); one run on
{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}
(one thread). How each part is measured is in the script's docstring.

"""
    (REPO / "docs" / "benchmarks" / "safety-benchmark.md").write_text(header + body + "\n")
    print("written to docs/benchmarks/safety-benchmark.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
