"""How the injection guard holds on attacks and ordinary prompts tierserve did not write.

bench/safety.py judges the guard on the held-out split of configs/safety/injection.jsonl, written
by the same hand as its training split. This judges it on public collections shipped in PyPI
packages (bench/public_sets.py), held out by source. Each fold pairs one attack collection with
one source of ordinary prompts, and three scorers are compared on it:

- `heuristic`: the weighted patterns alone;
- `shipped`: the classifier as the embedded default trains it, on configs/safety/injection.jsonl
  only (every public text is unseen);
- `mixed`: the same classifier (same features, feature dropout, C) trained on
  configs/safety/injection.jsonl plus the segments of every public text outside the fold.

A text's score is its highest segment's, as in `InjectionGuard.score` (at most `MAX_EMBEDDED`
segments embedded, the patterns choosing which). Per fold: TPR where the threshold lets 1% and
5% of the fold's ordinary prompts through as false positives, and TPR and FPR at the embedded
default's threshold.

    .venv/bin/python bench/injection_generalization.py [--per-source 150] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from public_sets import add_arguments, fetch, injection_sources, routing_sources, sample  # noqa: E402

FOLDS = [
    ("inthewild", ("alpaca_eval",)),
    ("deepset", ("freshqa",)),
    ("spikee", ("agentdojo_user", "spikee_benign")),
    ("pyrit_templates", ("writingbench",)),
]
FPRS = (0.01, 0.05)
GERMAN = re.compile(r"\b(der|die|das|und|ist|nicht|ich|sie|du|vergiss|alle|mir|wie|was|ein|eine)\b", re.IGNORECASE)
"""German function words: a text with two or more is counted as German."""


def tpr_at_fpr(attack: np.ndarray, benign: np.ndarray, fpr: float) -> tuple[float, float]:
    """TPR at the lowest threshold that flags at most `fpr` of `benign`, and that threshold."""
    ordered = np.sort(benign)[::-1]
    allowed = int(np.floor(fpr * len(benign)))
    threshold = float(ordered[allowed]) + 1e-9 if allowed < len(ordered) else 0.0
    return float((attack >= threshold).mean()), threshold


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args()

    from tierserve.cluster.config import load_config
    from tierserve.core.classifier import EmbeddingClassifier
    from tierserve.core.embedder import Embedder
    from tierserve.safety.injection import (
        CLASSIFIER_C,
        EMBED_DTYPE,
        EMBED_TOKENS,
        embedded_segments,
        fit_classifier,
        load_examples,
        segments,
    )
    from tierserve.safety.injection_patterns import FEATURES, FEATURES_VERSION, features, fold

    started = time.perf_counter()
    load = os.getloadavg()[0]
    config = load_config(REPO / "configs" / "local.yaml", check_engine=False)
    [shipped_threshold] = [g.threshold for g in config.safety.guards if g.type == "injection"]
    embedder = Embedder(max_seq_length=EMBED_TOKENS, dtype=EMBED_DTYPE)
    archives = fetch(args.cache_dir)
    sets = injection_sources(archives)
    sets["alpaca_eval"] = routing_sources(archives)["alpaca_eval"]

    texts = {name: sample(prompts, args.per_source, args.seed) for name, prompts in sets.items()}

    # Every text's segments as the guard sees them: (embedding, features) of the embedded ones,
    # and the best heuristic score among those it leaves out.
    class Scored:
        def __init__(self, text: str) -> None:
            spans = segments(text)
            rows = [features(text[s:e]) for s, e in spans]
            chosen = embedded_segments(rows)
            self.vectors = embedder.encode([fold(text[spans[i][0] : spans[i][1]]) for i in chosen])
            self.rows = [rows[i] for i in chosen]
            self.rest = max((rows[i]["heuristic"] for i in range(len(spans)) if i not in chosen), default=0.0)
            self.heuristic = max((r["heuristic"] for r in rows), default=0.0)

        def score(self, classifier: EmbeddingClassifier) -> float:
            if not self.rows:
                return 0.0
            return max(float(classifier.predict(self.vectors, self.rows).max()), self.rest)

    scored = {name: [Scored(q.text) for q in prompts] for name, prompts in texts.items()}
    embedded_s = time.perf_counter() - started

    own = load_examples(split="train")
    shipped = fit_classifier(own, embedder, "bench")
    own_vectors = embedder.encode([fold(e.text) for e in own])
    own_rows = [features(e.text) for e in own]
    no_evidence = features("")

    def fit_mixed(exclude: set[str]) -> EmbeddingClassifier:
        vectors, rows, labels = [own_vectors], list(own_rows), [e.label for e in own]
        for name, items in scored.items():
            if name in exclude:
                continue
            attack = bool(texts[name][0].label)
            for item in items:
                vectors.append(item.vectors)
                rows += item.rows
                labels += [attack] * len(item.rows)
        x = np.vstack(vectors)
        return EmbeddingClassifier.fit_rows(
            np.vstack([x, x]),
            rows + [no_evidence] * len(rows),
            labels + labels,
            embedder=embedder,
            feature_names=FEATURES,
            features_version=FEATURES_VERSION,
            dataset_sha256="bench",
            C=CLASSIFIER_C,
        )

    results = []
    for attack_source, benign_sources in FOLDS:
        mixed = fit_mixed({attack_source, *benign_sources})
        attack_items = scored[attack_source]
        benign_items = [item for name in benign_sources for item in scored[name]]
        row = {"attacks": attack_source, "ordinary": " + ".join(benign_sources)}
        row["n_attack"], row["n_benign"] = len(attack_items), len(benign_items)
        for scorer, score in (
            ("heuristic", lambda item: item.heuristic),
            ("shipped", lambda item: item.score(shipped)),
            ("mixed", lambda item, m=mixed: item.score(m)),
        ):
            a = np.array([score(i) for i in attack_items])
            b = np.array([score(i) for i in benign_items])
            for fpr in FPRS:
                row[f"{scorer}@{fpr}"] = tpr_at_fpr(a, b, fpr)[0]
            if scorer == "shipped":  # caught at FPR 5%, German texts and the rest apart
                threshold = tpr_at_fpr(a, b, 0.05)[1]
                is_german = np.array([len(GERMAN.findall(q.text)) >= 2 for q in texts[attack_source]])
                for name, subset in (("german", is_german), ("other", ~is_german)):
                    row[f"{name}_n"] = int(subset.sum())
                    row[f"{name}_caught"] = int((a[subset] >= threshold).sum())
            if scorer != "heuristic":
                row[f"{scorer}_tpr"] = float((a >= shipped_threshold).mean())
                row[f"{scorer}_fpr"] = float((b >= shipped_threshold).mean())
        results.append(row)

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in results]))

    head = ["| held-out attacks | held-out ordinary prompts | attacks | ordinary |"]
    for fpr in FPRS:
        head.append(f" TPR @ FPR {fpr:.0%}: heuristic / shipped / mixed |")
    head.append(f" at {shipped_threshold}: shipped TPR / FPR | mixed TPR / FPR |")
    lines = ["".join(head), "|---|---|---:|---:|" + "---:|" * (len(FPRS) + 2)]
    for r in results + [None]:
        if r is None:
            cells = ["| mean | | | |"]
            get = mean
        else:
            cells = [f"| {r['attacks']} | {r['ordinary']} | {r['n_attack']} | {r['n_benign']} |"]

            def get(key: str, r=r) -> float:
                return r[key]

        for fpr in FPRS:
            cells.append(f" {get(f'heuristic@{fpr}'):.2f} / {get(f'shipped@{fpr}'):.2f} / {get(f'mixed@{fpr}'):.2f} |")
        cells.append(
            f" {get('shipped_tpr'):.2f} / {get('shipped_fpr'):.3f} | {get('mixed_tpr'):.2f} / {get('mixed_fpr'):.3f} |"
        )
        lines.append("".join(cells))
    table = "\n".join(lines)
    by = {r["attacks"]: r for r in results}
    german = sum(len(GERMAN.findall(q.text)) >= 2 for q in sets["deepset"])
    ds = by["deepset"]
    elapsed = time.perf_counter() - started
    print(table)
    print(f"{elapsed:.0f} s (embedding {embedded_s:.0f} s)")
    if args.no_write:
        return 0
    command = " ".join([".venv/bin/python", "bench/injection_generalization.py", *sys.argv[1:]])
    sizes = ", ".join(f"{name} {len(q)}" for name, q in texts.items())
    doc = REPO / "docs" / "benchmarks" / "injection-generalization.md"
    doc.write_text(
        f"""# The injection guard on texts tierserve did not write

Measured by `{command}` on {time.strftime("%Y-%m-%d")}, {platform.machine()}, {os.cpu_count()} cores,
no GPU ({elapsed:.0f} s; load average {load:.1f} when it started). The collections, their packages
and licences are in bench/public_sets.py. Texts sampled per source (seed {args.seed}): {sizes}.

Each fold holds out one attack collection and one source of ordinary prompts whole. `shipped`
is the classifier the embedded default trains (configs/safety/injection.jsonl only, so every
public text is unseen); `mixed` adds the segments of every public text outside the fold to its
training set, labelled by their text's label; `heuristic` is the weighted patterns alone. "TPR @
FPR 1%": the share of attacks flagged at the threshold that flags 1% of the fold's ordinary
prompts (with about 150 ordinary prompts a fold, 1% is one or two texts: a coarse figure). The
last columns are the embedded default's threshold, {shipped_threshold}.

{table}

The goal is TPR >= 0.90 at FPR <= 0.05 on an unseen source. It is met on one fold of
{len(results)}: at FPR 5% the shipped classifier catches {by["inthewild"]["shipped@0.05"]:.2f} of the
in-the-wild jailbreaks (long role-play set-ups, close to what the project's own set covers), but
{by["deepset"]["shipped@0.05"]:.2f} of the deepset-style injections, {by["spikee"]["shipped@0.05"]:.2f} of spikee's and
{by["pyrit_templates"]["shipped@0.05"]:.2f} of PyRIT's templates; {mean("shipped@0.05"):.2f} on average.
At the embedded default's threshold it flags {mean("shipped_fpr"):.1%} of ordinary prompts and catches
{mean("shipped_tpr"):.2f} of attacks.

The deepset-style set is short texts, often a bare "forget the above and ..." appended to a
question; {german} of its {len(sets["deepset"])} texts are German (two or more German function words), which
the English MiniLM embedder and the English patterns do not read (at FPR 5% the shipped classifier
catches {ds["german_caught"]} of the {ds["german_n"]} German texts in the sample, and {ds["other_caught"]} of the
other {ds["other_n"]}); and it counts role-play requests
("I want you to act as an English translator", "Be a DJ") as injections, which the project's own
set, and most deployments, treat as ordinary requests.

Training on the other public collections does not close the gap ({mean("mixed@0.05"):.2f} on average
at FPR 5%): each segment takes its whole text's label, and a jailbreak template's segments include
plain role-play set-up that reads like a writing brief, so the mixed classifier learns to flag writing
too (at {shipped_threshold} it flags {by["pyrit_templates"]["mixed_fpr"]:.0%} of WritingBench). Segment-level
labels, or a small fine-tuned model in place of the logistic regression on MiniLM, are the next steps.
"""
    )
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
