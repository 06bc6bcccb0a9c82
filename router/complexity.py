"""How hard a prompt is, as a score in [0, 1], so that `model: "auto"` can pick a tier.

The router follows RouteLLM: one score per request and per-tier thresholds on it, a higher score
needing a stronger tier. The thresholds are calibrated on a sample of traffic so that each tier
gets the share of requests it was sized for, and a routing curve shows what a threshold buys
(both in `tierserve.router.calibration`).

Two scorers, both cheap enough to run in the ingress on every request:

- `heuristic_score` (`tierserve.router.features`): a fixed weighted sum of `cheap_features`
  (word lookups and character counts, about 0.1 ms per kilobyte). No model, no training; the
  fallback when no classifier is configured.
- `ComplexityClassifier`: logistic regression on a MiniLM sentence embedding of the prompt
  concatenated with the same cheap features (a `tierserve.core.classifier.EmbeddingClassifier`,
  the model the injection guard trains too). The embedding knows what a prompt is about (a proof
  or a greeting); the features know what the embedding cannot see well, such as length, code
  syntax and conversation depth. It is trained in seconds on the labelled prompts the project
  ships in `configs/complexity/prompts.jsonl` ("hard": a 135M-parameter chat model would likely
  fail it) and cached in a directory the caller names, keyed by the dataset and embedder. It
  costs one embedding per request (~15 ms for a short prompt on one CPU thread), and it separates
  held-out prompts better: docs/benchmarks/routing-quality.md.

Plain code with no Ray: the router holds a `ComplexityScorer`; tests and `bench/routing_quality.py`
use the same one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tierserve.core.classifier import EmbeddingClassifier, cache_path, cached_classifier, dataset_bytes, embed_window
from tierserve.core.embedder import DEFAULT_EMBEDDER, Embedder
from tierserve.router.config import ComplexityConfig
from tierserve.router.features import FEATURES, FEATURES_VERSION, cheap_features, heuristic_score

SPLITS = ("train", "heldout")


@dataclass(frozen=True, slots=True)
class LabelledPrompt:
    text: str
    turns: int
    """User messages in the conversation; for turns > 1, `text` holds the earlier turns then the last
    user message, joined with newlines."""
    hard: bool
    """A 135M-parameter chat model would likely fail it; a strong model is needed."""
    split: str
    """`train` or `heldout`; no prompt (nor a paraphrase of one) is in both."""
    category: str


def load_prompts(path: Path | None = None, split: str | None = None) -> list[LabelledPrompt]:
    """The labelled prompts in `path` (default: the bundled `configs/complexity/prompts.jsonl`),
    all of them or one split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    where = path or "configs/complexity/prompts.jsonl"
    prompts = []
    for number, line in enumerate(dataset_bytes(path).decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = LabelledPrompt(
                text=str(row["text"]),
                turns=int(row["turns"]),
                hard=bool(row["hard"]),
                split=str(row["split"]),
                category=str(row["category"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{where}:{number}: not a labelled prompt: {exc}") from exc
        if prompt.split not in SPLITS:
            raise ValueError(f"{where}:{number}: split must be one of {SPLITS}, got {prompt.split!r}")
        if split is None or prompt.split == split:
            prompts.append(prompt)
    return prompts


EMBED_CHARS = 192
"""Characters of a prompt the embedder sees by default: about the 48 tokens the router's
embedder reads (`ComplexityConfig.embed_tokens`), which keeps a decision near 10 ms on one CPU
thread (docs/benchmarks/routing-quality.md)."""


class ComplexityClassifier(EmbeddingClassifier):
    """P(hard) from a prompt's embedding and its `cheap_features`."""

    __slots__ = ()

    @classmethod
    def fit(
        cls,
        examples: list[LabelledPrompt],
        embedder: Embedder,
        dataset_sha256: str | None = None,
        C: float = 1.0,
        max_chars: int = EMBED_CHARS,
    ) -> ComplexityClassifier:
        """Logistic regression (balanced classes, L2 with strength 1/C) on `examples`.
        `dataset_sha256` defaults to a hash of the examples themselves."""
        if dataset_sha256 is None:
            rows = "\n".join(json.dumps([e.text, e.turns, e.hard]) for e in examples)
            dataset_sha256 = hashlib.sha256(rows.encode()).hexdigest()
        return cls.fit_rows(
            embedder.encode([embed_window(e.text, max_chars) for e in examples]),
            [cheap_features(e.text, e.turns) for e in examples],
            [e.hard for e in examples],
            embedder=embedder,
            feature_names=FEATURES,
            features_version=FEATURES_VERSION,
            dataset_sha256=dataset_sha256,
            C=C,
        )

    def matches_features(self) -> bool:
        """Whether it was trained on the `cheap_features` this code computes."""
        return self.has_features(FEATURES, FEATURES_VERSION)


@dataclass(frozen=True, slots=True)
class ComplexityScore:
    value: float
    """What routing uses: the classifier's P(hard) when there is one, else the heuristic."""
    heuristic: float
    classifier: float | None
    features: dict[str, float]
    ms: float
    """Wall time of scoring, in milliseconds (for `score_many`, the batch's time per prompt)."""


class ComplexityScorer:
    """Scores prompts with the classifier when given one (and its embedder), else with the heuristic."""

    def __init__(
        self,
        classifier: ComplexityClassifier | None = None,
        embedder: Embedder | None = None,
        max_chars: int = EMBED_CHARS,
    ):
        if max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, got {max_chars}")
        if classifier is not None:
            if embedder is None:
                raise ValueError("a complexity classifier needs the embedder it was trained with")
            if not classifier.matches_features():
                raise ValueError("the complexity classifier was trained on other cheap features; retrain it")
            classifier.check_embedder(embedder, "complexity")
        self.classifier = classifier
        self.embedder = embedder
        self.max_chars = max_chars

    @property
    def mode(self) -> Literal["classifier", "heuristic"]:
        return "heuristic" if self.classifier is None else "classifier"

    def score(self, text: str, turns: int = 1) -> ComplexityScore:
        """Score one prompt; `turns` is the number of user messages in the conversation."""
        return self._score([text], [turns])[0]

    def score_many(self, texts: list[str], turns: list[int] | None = None) -> list[ComplexityScore]:
        """Score a batch (one embedding call); each score's `ms` is the batch time divided evenly."""
        turns = [1] * len(texts) if turns is None else list(turns)
        if len(turns) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(turns)} turn counts")
        return self._score(list(texts), turns) if texts else []

    def _score(self, texts: list[str], turns: list[int]) -> list[ComplexityScore]:
        started = time.perf_counter()
        features = [cheap_features(t, n) for t, n in zip(texts, turns)]
        heuristics = [heuristic_score(f) for f in features]
        if self.classifier is None:
            classified: list[float | None] = [None] * len(texts)
        else:
            embeddings = self.embedder.encode([embed_window(t, self.max_chars) for t in texts])
            classified = [float(p) for p in self.classifier.predict(embeddings, features)]
        ms = (time.perf_counter() - started) * 1e3 / len(texts)
        return [
            ComplexityScore(value=h if c is None else c, heuristic=h, classifier=c, features=f, ms=ms)
            for f, h, c in zip(features, heuristics, classified)
        ]


def classifier_cache_path(cache_dir: Path, dataset: Path | None = None, embedder: str | None = None) -> Path:
    """Where `load_scorer` keeps the classifier trained on `dataset` with `embedder`."""
    return cache_path(cache_dir, "complexity", dataset_bytes(dataset), embedder or DEFAULT_EMBEDDER)


def load_scorer(
    mode: Literal["heuristic", "classifier"],
    cache_dir: Path,
    dataset: Path | None = None,
    embedder: str | Embedder | None = None,
    max_chars: int = EMBED_CHARS,
) -> ComplexityScorer:
    """A ready scorer. `classifier` loads the cached classifier for this dataset, embedder and
    window, or trains one on the dataset's train split (seconds on a CPU) and caches it.
    `embedder` is a name for `Embedder`, or an already loaded one to share."""
    if mode == "heuristic":
        return ComplexityScorer()
    if mode != "classifier":
        raise ValueError(f"complexity mode must be 'heuristic' or 'classifier', got {mode!r}")
    if not isinstance(embedder, Embedder):
        embedder = Embedder(embedder)

    def fit() -> ComplexityClassifier:
        digest = hashlib.sha256(dataset_bytes(dataset)).hexdigest()
        train = load_prompts(dataset, "train")
        return ComplexityClassifier.fit(train, embedder, dataset_sha256=digest, max_chars=max_chars)

    path = classifier_cache_path(cache_dir, dataset, f"{embedder.signature}|{max_chars}")
    classifier = cached_classifier(path, fit, FEATURES, FEATURES_VERSION, ComplexityClassifier)
    return ComplexityScorer(classifier, embedder, max_chars=max_chars)


def scorer_for(config: ComplexityConfig, cache_dir: Path) -> ComplexityScorer:
    """The scorer a `routing.complexity` config block describes (the ingress's, the CLI's)."""
    embedder = None
    if config.mode == "classifier":
        embedder = Embedder(config.embedder, max_seq_length=config.embed_tokens, dtype=config.embed_dtype)
    return load_scorer(
        config.mode,
        cache_dir,
        Path(config.dataset) if config.dataset else None,
        embedder,
        max_chars=4 * config.embed_tokens,
    )
