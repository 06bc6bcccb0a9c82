"""Complexity scoring for `model: "auto"`: cheap features as tables of prompt → cue, the bundled
labelled prompts, the classifier trained on them (held-out ROC-AUC), its cache, and the
threshold calibration. The embedder is the real MiniLM, loaded once for the module."""

import dataclasses
import math
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tierserve.core.embedder import DEFAULT_EMBEDDER, Embedder, resolve_embedder_path
from tierserve.router.calibration import calibrate_thresholds, routing_curve
from tierserve.router.complexity import (
    EMBED_CHARS,
    ComplexityClassifier,
    ComplexityScorer,
    classifier_cache_path,
    load_prompts,
    load_scorer,
)
from tierserve.router.features import FEATURES, cheap_features, heuristic_score


@pytest.fixture(scope="module")
def embedder():
    return Embedder(num_threads=1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("complexity-cache")


@pytest.fixture(scope="module")
def scorer(embedder, cache_dir):
    """Trains on the bundled train split once; later tests reuse the cached file."""
    return load_scorer("classifier", cache_dir, embedder=embedder)


@pytest.fixture(scope="module")
def heldout():
    return load_prompts(split="heldout")


# Cheap features: text → whether the cue fires.

CODE = [
    ("```python\nprint(sum(range(10)))\n```\nWhat does this print?", True),
    ("def add(a, b): return a + b  # why does add('1', 2) fail?", True),
    ("for (int i = 0; i < n; i++) { total += a[i]; }", True),
    ("My JavaScript async function throws a TypeError when the API returns null.", True),
    ("What is the capital of France?", False),
    ("Tell me a joke about dogs.", False),
    ("Summarise this email in one line: the meeting moved to Friday.", False),
]

MATHS = [
    ("Compute the integral of x^2 from 0 to 3.", True),
    ("Prove that 7 divides 8^n - 1 for every n.", True),
    ("What is the probability of two heads in three coin flips?", True),
    ("Solve 3x + 5 = 20.", True),
    ("Good morning!", False),
    ("Translate 'cat' into Spanish.", False),
    ("Write a haiku about autumn leaves.", False),
]

MULTI_STEP = [
    ("Explain step by step how to change a tyre.", True),
    ("First boil the water, then add the pasta.", True),
    ("Do this:\n1. open the file\n2. sort the lines\n3. save it", True),
    ("Plan a 3-day itinerary for Lisbon.", True),
    ("hi", False),
    ("What colour is the sky?", False),
]


@pytest.mark.parametrize("text, fires", CODE)
def test_code_cue(text, fires):
    code = cheap_features(text)["code"]
    assert code >= 0.5 if fires else code < 0.2


@pytest.mark.parametrize("text, fires", MATHS)
def test_maths_cue(text, fires):
    maths = cheap_features(text)["maths"]
    assert maths >= 0.3 if fires else maths < 0.15


@pytest.mark.parametrize("text, fires", MULTI_STEP)
def test_multi_step_cue(text, fires):
    multi_step = cheap_features(text)["multi_step"]
    assert multi_step >= 0.3 if fires else multi_step == 0


@pytest.mark.parametrize(
    "text, expected",
    [("Tell me.", 0.0), ("What is it?", 1 / 3), ("Why? How? When?", 1.0), ("? ? ? ? ?", 1.0)],
)
def test_questions_count_and_saturate(text, expected):
    assert cheap_features(text)["questions"] == pytest.approx(expected)


@pytest.mark.parametrize("turns, expected", [(0, 0.0), (1, 0.0), (3, 0.5), (5, 1.0), (12, 1.0)])
def test_conversation_depth(turns, expected):
    assert cheap_features("And then?", turns)["turns"] == pytest.approx(expected)


def test_length_grows_with_the_prompt_and_caps():
    lengths = [cheap_features("word " * n)["length"] for n in (1, 10, 100, 1000, 10000)]
    assert lengths == sorted(lengths) and lengths[0] > 0 and lengths[-1] == 1.0


def test_every_feature_is_in_unit_range_on_the_dataset():
    for p in load_prompts():
        features = cheap_features(p.text, p.turns)
        assert tuple(features) == FEATURES
        assert all(0.0 <= v <= 1.0 for v in features.values()), (p.text, features)


def test_cheap_features_cost_about_a_tenth_of_a_millisecond_per_kilobyte():
    text = ("Explain step by step why this fails: def f(x): return x[0] + 1; what must I change? " * 13)[:1024]
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(100):
            heuristic_score(cheap_features(text))
        runs.append((time.perf_counter() - started) / 100)
    # The budget is 0.2 ms; the bound leaves room for slow or shared CI machines.
    assert min(runs) < 0.5e-3


def test_heuristic_orders_clearly_easy_below_clearly_hard():
    easy = [
        "hi",
        "What's the capital of Peru?",
        "Translate 'good night' into French.",
        "Fix the typos: " + "Teh weather was lovly and we walkd to the beech every day. " * 12,
    ]
    hard = [
        "Prove that there are infinitely many primes p such that p + 2 is not prime, and justify each step.",
        "Debug this:\n```python\ndef mean(xs):\n    return sum(xs) / len(xs) - 1\n```\nWhy is the result wrong?",
        "Design a distributed rate limiter for 1 million requests per second across regions; compare the "
        "trade-offs of token buckets and sliding windows, and explain the failure modes.",
    ]
    assert max(heuristic_score(cheap_features(t)) for t in easy) < 0.3
    assert min(heuristic_score(cheap_features(t)) for t in hard) > 0.7


# The labelled prompts.


def test_dataset_splits_are_large_balanced_and_disjoint():
    train, held = load_prompts(split="train"), load_prompts(split="heldout")
    assert len(train) >= 400 and len(held) >= 150
    for split in (train, held):
        assert 0.4 <= sum(p.hard for p in split) / len(split) <= 0.6
    assert not {p.text for p in train} & {p.text for p in held}
    assert len({p.text for p in train}) == len(train) and len({p.text for p in held}) == len(held)
    assert len(load_prompts()) == len(train) + len(held)


def test_dataset_covers_the_categories_and_the_tricky_cases():
    prompts = load_prompts()
    categories = {(p.category, p.hard) for p in prompts}
    for category in ("chit-chat", "simple-fact", "rewrite", "summarise", "classify-extract", "long-easy"):
        assert (category, False) in categories
    for category in ("maths", "proof", "code", "system-design", "planning", "comparison", "explanation"):
        assert (category, True) in categories
    assert any(p.turns > 1 and p.text.count("\n") >= 2 for p in prompts)
    by_text = {p.text: p for p in prompts}
    assert by_text["Prove there are infinitely many primes."].hard
    assert all(len(p.text) > 250 for p in prompts if p.category == "long-easy")


def test_load_prompts_rejects_a_bad_split_and_names_a_bad_line(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_prompts(split="test")
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(
        '{"text": "hi", "turns": 1, "hard": false, "split": "train", "category": "chit-chat"}\n{"text": 1}\n'
    )
    with pytest.raises(ValueError, match=r"prompts.jsonl:2"):
        load_prompts(bad)


# The classifier.


def test_classifier_separates_heldout_prompts(scorer, heldout):
    scores = scorer.score_many([p.text for p in heldout], [p.turns for p in heldout])
    hard = [p.hard for p in heldout]
    classifier_auc = roc_auc_score(hard, [s.classifier for s in scores])
    heuristic_auc = roc_auc_score(hard, [s.heuristic for s in scores])
    assert classifier_auc >= 0.85, classifier_auc
    assert heuristic_auc >= 0.75, heuristic_auc
    assert all(s.value == s.classifier for s in scores)


def test_save_and_load_give_identical_predictions(scorer, embedder, heldout, tmp_path):
    texts = [p.text for p in heldout[:20]]
    embeddings = embedder.encode(texts)
    features = [cheap_features(t) for t in texts]
    path = tmp_path / "classifier.npz"
    scorer.classifier.save(path)
    loaded = ComplexityClassifier.load(path)
    assert np.array_equal(loaded.predict(embeddings, features), scorer.classifier.predict(embeddings, features))
    fields = ("intercept", "embedder", "dimension", "dataset_sha256", "feature_names", "features_version")
    assert [getattr(loaded, f) for f in fields] == [getattr(scorer.classifier, f) for f in fields]
    assert len(loaded.dataset_sha256) == 64 and loaded.embedder == f"{DEFAULT_EMBEDDER}|float32|256"


def test_load_scorer_reuses_the_cached_classifier(scorer, embedder, cache_dir, monkeypatch):
    path = classifier_cache_path(cache_dir, None, f"{embedder.signature}|{EMBED_CHARS}")
    assert [f.name for f in cache_dir.iterdir()] == [path.name]
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("load_scorer retrained although the cache held a classifier")

    monkeypatch.setattr(ComplexityClassifier, "fit", no_training)
    again = load_scorer("classifier", cache_dir, embedder=embedder)
    assert path.stat().st_mtime_ns == mtime
    assert np.array_equal(again.classifier.coef, scorer.classifier.coef)


def test_scorer_embeds_the_start_and_end_of_a_long_prompt(scorer, embedder):
    short = ComplexityScorer(scorer.classifier, embedder, max_chars=60)
    text = "Some background about the project. " * 20 + "Now prove that the square root of 5 is irrational."
    got = short.score(text)
    window = f"{text[:30]} ... {text[-30:]}"
    expected = scorer.classifier.predict(embedder.encode([window]), [cheap_features(text)])[0]
    assert got.classifier == pytest.approx(expected, abs=1e-6)
    assert got.value == got.classifier and got.ms > 0


def test_score_many_matches_score(scorer):
    texts = ["hello there", "Implement a red-black tree in C with deletion.", "Who wrote Hamlet?"]
    batched = scorer.score_many(texts)
    for text, b in zip(texts, batched):
        one = scorer.score(text)
        assert one.classifier == pytest.approx(b.classifier, abs=1e-5)
        assert one.heuristic == b.heuristic and one.features == b.features


def test_scorer_refuses_a_mismatched_classifier(scorer, embedder):
    with pytest.raises(ValueError, match="embedder"):
        ComplexityScorer(scorer.classifier)
    with pytest.raises(ValueError, match="other cheap features"):
        ComplexityScorer(dataclasses.replace(scorer.classifier, features_version=0), embedder)
    with pytest.raises(ValueError, match="trained on embedder"):
        ComplexityScorer(dataclasses.replace(scorer.classifier, embedder="/models/other"), embedder)


def test_heuristic_mode_needs_no_model_and_writes_nothing(tmp_path):
    scorer = load_scorer("heuristic", tmp_path)
    score = scorer.score("Compare B-trees and LSM-trees for write-heavy workloads.")
    assert scorer.mode == "heuristic" and score.classifier is None and score.value == score.heuristic
    assert 0.0 <= score.value <= 1.0 and score.ms > 0
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="complexity mode"):
        load_scorer("bert", tmp_path)


def test_embedder_vectors_are_unit_float32(embedder):
    vectors = embedder.encode(["one", "two words", "a slightly longer third sentence"])
    assert vectors.shape == (3, embedder.dimension) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, embedder.dimension)
    with pytest.raises(ValueError, match="local directory"):
        resolve_embedder_path("/nonexistent/model")


# Thresholds and the routing curve, on hand-built scores.


@pytest.mark.parametrize("shares", [[0.5, 0.3, 0.2], [0.7, 0.3], [0.25, 0.25, 0.25, 0.25], [1.0]])
def test_calibrate_thresholds_hits_the_target_shares(shares):
    scores = np.random.default_rng(0).beta(2, 5, size=2000)
    thresholds = calibrate_thresholds(list(scores), shares)
    assert thresholds[0] == 0.0 and thresholds == sorted(thresholds)
    tier = np.searchsorted(thresholds, scores, side="right") - 1
    realised = np.bincount(tier, minlength=len(shares)) / len(scores)
    assert np.allclose(realised, shares, atol=1 / len(scores))


def test_calibrate_thresholds_on_a_uniform_grid():
    scores = [i / 100 for i in range(100)]
    assert calibrate_thresholds(scores, [0.5, 0.3, 0.2]) == pytest.approx([0.0, 0.495, 0.795])
    assert calibrate_thresholds(scores, [0.0, 1.0]) == [0.0, 0.0]
    assert calibrate_thresholds(scores, [0.5, 0.5, 0.0]) == [0.0, pytest.approx(0.495), math.inf]


@pytest.mark.parametrize(
    "scores, shares, message",
    [
        ([0.1, 0.2], [], "at least one tier"),
        ([0.1, 0.2], [0.5, 0.6], "sum to 1"),
        ([0.1, 0.2], [-0.1, 1.1], "non-negative"),
        ([0.1, 0.2], [math.nan, 1.0], "finite"),
        ([], [0.5, 0.5], "empty"),
        ([0.1, math.inf], [0.5, 0.5], "finite"),
    ],
)
def test_calibrate_thresholds_rejects_bad_input(scores, shares, message):
    with pytest.raises(ValueError, match=message):
        calibrate_thresholds(scores, shares)


def test_routing_curve_on_hand_built_scores():
    scores, hard = [0.1, 0.4, 0.6, 0.9], [False, True, False, True]
    (low, mid, high) = routing_curve(scores, hard, [0.0, 0.5, 0.95])
    assert (low.share_strong, low.hard_recall, low.easy_to_strong) == (1.0, 1.0, 1.0)
    assert (mid.share_strong, mid.hard_recall, mid.easy_to_strong) == (0.5, 0.5, 0.5)
    assert (high.share_strong, high.hard_recall, high.easy_to_strong) == (0.0, 0.0, 0.0)


def test_routing_curve_is_monotone():
    rng = np.random.default_rng(1)
    hard = rng.random(500) < 0.5
    scores = np.clip(rng.normal(0.35 + 0.3 * hard, 0.15), 0, 1)
    curve = routing_curve(list(scores), list(hard), [i / 20 for i in range(21)])
    for field in ("share_strong", "hard_recall", "easy_to_strong"):
        values = [getattr(p, field) for p in curve]
        assert values == sorted(values, reverse=True)
    with pytest.raises(ValueError, match="labels"):
        routing_curve([0.1, 0.2], [True], [0.5])
    with pytest.raises(ValueError, match="one hard and one easy"):
        routing_curve([0.1, 0.2], [True, True], [0.5])


def test_the_routers_scorer_reads_48_tokens_in_bfloat16_and_keeps_its_quality(cache_dir, heldout):
    """bfloat16 where the CPU computes it (AVX512-BF16, AMX); float32 where torch would emulate it."""
    from sklearn.metrics import roc_auc_score

    from tierserve.core.embedder import native_bfloat16
    from tierserve.router.complexity import scorer_for
    from tierserve.router.config import ComplexityConfig

    scorer = scorer_for(ComplexityConfig(mode="classifier"), cache_dir)
    dtype = "bfloat16" if native_bfloat16("cpu") else "float32"
    assert scorer.embedder.signature == f"{DEFAULT_EMBEDDER}|{dtype}|48" and scorer.max_chars == 192
    scores = scorer.score_many([p.text for p in heldout], [p.turns for p in heldout])
    assert roc_auc_score([p.hard for p in heldout], [s.value for s in scores]) >= 0.85
    assert scorer_for(ComplexityConfig(mode="heuristic"), cache_dir).embedder is None
