"""How well the complexity score tells hard prompts from easy ones, and what scoring costs.

It trains the classifier on the train split of configs/complexity/prompts.jsonl (what
`load_scorer("classifier", ...)` does on a cold cache), scores the held-out split with the fixed
heuristic and with the classifier, and prints, for thresholds 0.1 to 0.9 between a weak and a
strong tier: the share of prompts sent to the strong tier, the share of hard prompts that reach
it (recall), and the share of easy prompts sent there for nothing; then the ROC-AUC of each
score, and the cost of scoring one prompt at a time on one thread, as the ingress does:
p50 and p99 over the held-out prompts, heuristic only and with the embedding. The same is
written to docs/benchmarks/routing-quality.md.

    .venv/bin/python bench/routing_quality.py [--repeats 3] [--no-write]
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
THRESHOLDS = [round(0.1 * i, 1) for i in range(1, 10)]


def curve_table(heuristic: list, classifier: list) -> str:
    lines = [
        "| threshold | heuristic: to strong | hard recall | easy wasted | classifier: to strong | hard recall | "
        "easy wasted |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for h, c in zip(heuristic, classifier):
        lines.append(
            f"| {h.threshold:.1f} | {h.share_strong:.0%} | {h.hard_recall:.0%} | {h.easy_to_strong:.0%} | "
            f"{c.share_strong:.0%} | {c.hard_recall:.0%} | {c.easy_to_strong:.0%} |"
        )
    return "\n".join(lines)


def two_tiers() -> list:
    """A weak and a strong tier with polled loads, as the router sees the embedded default."""
    from tierserve.actors.types import TierLoad
    from tierserve.router.config import TierCost
    from tierserve.router.policy import TierView

    def load(running: int) -> TierLoad:
        return TierLoad(running, 0, 32, 2048, 20.0, 2.0, 40.0, 1.0, 100.0)

    return [
        TierView("small", 0.0, TierCost(input_per_million=0.02, output_per_million=0.06), load=load(4)),
        TierView("quality", 0.5, TierCost(input_per_million=0.1, output_per_million=0.3), load=load(2)),
    ]


def decision_ms(scorer, prompts: list, repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """Wall time per prompt, one at a time after a warm-up pass: of `score` alone, and of the
    whole decision the ingress makes (score, then `policy.decide` over two loaded tiers)."""
    from tierserve.router.policy import RequestFeatures, Sla, decide

    views, sla = two_tiers(), Sla("standard", 3000, 250)
    for p in prompts[:10]:
        scorer.score(p.text, p.turns)
    scoring, deciding = [], []
    for _ in range(repeats):
        for p in prompts:
            start = time.perf_counter()
            score = scorer.score(p.text, p.turns)
            decide(RequestFeatures(len(p.text) // 4, 128, score.value), sla, views)
            deciding.append(1e3 * (time.perf_counter() - start))
            scoring.append(score.ms)
    return np.array(scoring), np.array(deciding)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="passes over the held-out prompts for the latency")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    from sklearn.metrics import roc_auc_score

    from tierserve.core.embedder import Embedder
    from tierserve.router.calibration import routing_curve
    from tierserve.router.complexity import ComplexityClassifier, ComplexityScorer, load_prompts
    from tierserve.router.config import ComplexityConfig

    load = os.getloadavg()[0]
    config = ComplexityConfig()  # the router's defaults: embed_tokens, embed_dtype
    train, heldout = load_prompts(split="train"), load_prompts(split="heldout")

    def classifier_for(tokens: int, dtype: str) -> tuple[ComplexityScorer, float]:
        # The ingress scores on one thread; the embedder's torch would otherwise take every core.
        embedder = Embedder(num_threads=1, max_seq_length=tokens, dtype=dtype)
        started = time.perf_counter()
        classifier = ComplexityClassifier.fit(train, embedder, max_chars=4 * tokens)
        return ComplexityScorer(classifier, embedder, max_chars=4 * tokens), time.perf_counter() - started

    classifier_scorer, trained_s = classifier_for(config.embed_tokens, config.embed_dtype)
    full_scorer, _ = classifier_for(256, "float32")
    heuristic_scorer = ComplexityScorer()

    scores = classifier_scorer.score_many([p.text for p in heldout], [p.turns for p in heldout])
    hard = [p.hard for p in heldout]
    heuristic = [s.heuristic for s in scores]
    learned = [s.classifier for s in scores]
    table = curve_table(routing_curve(heuristic, hard, THRESHOLDS), routing_curve(learned, hard, THRESHOLDS))
    heuristic_ms, heuristic_decision = decision_ms(heuristic_scorer, heldout, args.repeats)
    classifier_ms, classifier_decision = decision_ms(classifier_scorer, heldout, args.repeats)
    full_ms, full_decision = decision_ms(full_scorer, heldout, args.repeats)
    full = [s.classifier for s in full_scorer.score_many([p.text for p in heldout], [p.turns for p in heldout])]

    def pct(values: np.ndarray, q: int) -> str:
        return f"{np.percentile(values, q):.3f}"

    summary = "\n".join(
        [
            "| scorer | held-out ROC-AUC | score p50 ms | score p99 ms | decision p50 ms | decision p99 ms "
            "| goal (p99) |",
            "|---|---:|---:|---:|---:|---:|---:|",
            f"| heuristic (cheap features only) | {roc_auc_score(hard, heuristic):.3f} | "
            f"{pct(heuristic_ms, 50)} | {pct(heuristic_ms, 99)} | {pct(heuristic_decision, 50)} | "
            f"{pct(heuristic_decision, 99)} | 1 ms |",
            f"| classifier (MiniLM embedding + cheap features), as configured: {config.embed_tokens} tokens, "
            f"{config.embed_dtype} | {roc_auc_score(hard, learned):.3f} | "
            f"{pct(classifier_ms, 50)} | {pct(classifier_ms, 99)} | {pct(classifier_decision, 50)} | "
            f"{pct(classifier_decision, 99)} | 10 ms |",
            f"| classifier, MiniLM's own 256 tokens, float32 | {roc_auc_score(hard, full):.3f} | "
            f"{pct(full_ms, 50)} | {pct(full_ms, 99)} | {pct(full_decision, 50)} | {pct(full_decision, 99)} | 10 ms |",
        ]
    )
    sizes = (
        f"{len(train)} train prompts ({sum(p.hard for p in train)} hard), {len(heldout)} held-out "
        f"({sum(hard)} hard); classifier trained in {trained_s:.1f} s"
    )
    print(sizes)
    print(table)
    print()
    print(summary)
    if args.no_write:
        return
    command = " ".join([".venv/bin/python", "bench/routing_quality.py", *sys.argv[1:]])
    busy = (
        ": other processes shared the CPU, which inflates the latencies and the training time, not the quality figures"
        if load > 1.0
        else ""
    )
    doc = REPO / "docs" / "benchmarks" / "routing-quality.md"
    doc.write_text(
        f"""# Routing quality of the complexity score

Measured by `{command}` on {time.strftime("%Y-%m-%d")}, {platform.machine()}, {os.cpu_count()} cores,
no GPU, torch on one thread. Load average {load:.1f} when it started{busy}.

The labelled prompts are configs/complexity/prompts.jsonl: {sizes}.
"Hard" means a 135M-parameter chat model would likely fail the prompt. Both scores are computed
on the held-out prompts only; the heuristic's weights and cue words were set on the train split.
The held-out prompts are different prompts from the same categories, written by the same hand,
so expect lower figures on real traffic.

With one threshold between a weak and a strong tier, a prompt goes to the strong tier when its
score is at least the threshold. `to strong`: share of all held-out prompts sent there; `hard
recall`: share of hard prompts that got there; `easy wasted`: share of easy prompts sent there
although the weak tier would have done.

{table}

{summary}

The curve is the classifier as configured (`routing.complexity.embed_tokens`, `embed_dtype`:
the embedder reads the start and end of a prompt, at most {config.embed_tokens} tokens, with
{config.embed_dtype} weights); the last row is the same classifier reading up to MiniLM's 256
tokens in float32, which costs about three times as much for the same quality here.

`score` is the wall time of `ComplexityScorer.score` for one prompt at a time ({args.repeats} passes
over the held-out prompts), as the ingress calls it; `decision` adds what the router does with
the score (`policy.decide` over two tiers with polled loads), i.e. the whole routing decision.
The two scores are not on the same scale,
so a threshold tuned for one does not suit the other: calibrate them on traffic with
`calibrate_thresholds` (router/complexity.py).
"""
    )
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
