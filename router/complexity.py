"""How hard a prompt is, as a score in [0, 1], so that `model: "auto"` can pick a tier.

The router follows RouteLLM: one score per request and per-tier thresholds on it, a higher score
needing a stronger tier. The thresholds are calibrated on a sample of traffic so that each tier
gets the share of requests it was sized for (`calibrate_thresholds`), and `routing_curve` shows
what a threshold buys: how many hard prompts reach the strong tier against how many easy ones
are sent there for nothing.

Two scorers, both cheap enough to run in the ingress on every request:

- `heuristic_score`: a fixed weighted sum of `cheap_features` (word lookups and character counts,
  about 0.1 ms per kilobyte). No model, no training; the fallback when no classifier is configured.
- `ComplexityClassifier`: logistic regression on a MiniLM sentence embedding of the prompt
  concatenated with the same cheap features. The embedding knows what a prompt is about (a proof
  or a greeting); the features know what the embedding cannot see well, such as length, code
  syntax and conversation depth. It is trained in seconds on the labelled prompts the project
  ships in `configs/complexity/prompts.jsonl` ("hard": a 135M-parameter chat model would likely
  fail it) and cached in a directory the caller names, keyed by the dataset and embedder. It
  costs one embedding per request (~15 ms for a short prompt on one CPU thread), and it separates
  held-out prompts better: docs/routing-quality.md.

Plain code with no Ray: the router holds a `ComplexityScorer`; tests and `bench/routing_quality.py`
use the same one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

from tierserve.rag.embedder import DEFAULT_EMBEDDER, Embedder
from tierserve.router.config import ComplexityConfig

FEATURES = (
    "length",
    "code",
    "maths",
    "multi_step",
    "reasoning",
    "questions",
    "turns",
    "constraints",
    "simple_task",
    "chit_chat",
)
"""Names and order of `cheap_features`, and of the feature columns the classifier appends to the embedding."""

FEATURES_VERSION = 1
"""Bumped whenever a feature's formula changes, so that a cached classifier trained on the old one is retrained."""

SPLITS = ("train", "heldout")

LENGTH_CAP_TOKENS = 2048
"""Approximate token count at which the length feature reaches 1 (log-scaled below it)."""

# Cues are mostly data: words looked up in one dictionary during a single pass over the
# prompt's words, and phrases counted as substrings of the space-joined words. A Python regular
# expression with dozens of alternatives costs ~0.2 ms per kilobyte; this costs about half of
# that for all the cues together.


@dataclass(frozen=True, slots=True)
class Cue:
    words: frozenset[str]
    phrases: tuple[str, ...]
    """Lowercase word sequences; punctuation between the words is ignored."""


def cue(words: str, phrases: str = "") -> Cue:
    """A cue from space-separated words and comma-separated phrases."""
    return Cue(frozenset(words.split()), tuple(p.strip() for p in phrases.split(",") if p.strip()))


CUES = {
    "code": cue(
        "python java javascript typescript kotlin rust golang sql bash regex cuda react django flask node nodejs "
        "pandas docker dockerfile api function functions class method decorator algorithm recursion recursive "
        "bug bugs debug compile compiler exception error traceback pytest implement implementation refactor "
        "kernel thread threads async await concurrency concurrent deadlock deadlocks complexity parser "
        "tokenizer serialise serialize deserialise deserialize query queries heap trie array arrays string "
        "strings def return import const var void struct fn func lambda null nonetype typeerror script code "
        "sort quicksort runtime stack server crash crashes loop endpoint json yaml",
        "stack trace, race condition, unit test, data structure, linked list, binary tree, hash table, hash map, "
        "time complexity",
    ),
    "maths": cue(
        "prove proof theorem lemma integral integrate derivative differentiate limit probability variance "
        "deviation matrix matrices eigenvalue eigenvalues eigenvector eigenvectors determinant equation "
        "equations solve polynomial quadratic prime primes divisible irrational rational induction modulo mod "
        "factor factorise factorize percentile series converge converges convergent diverge diverges vector "
        "vectors logarithm logarithms log ln sqrt sin cos tan exp geometry triangle circle radius volume "
        "countable uncountable inequality recurrence combinatorics permutation permutations congruent integer "
        "integers subgroup continuous bounded sequence compute calculate minimum maximum minimise maximise "
        "angle area percent interest expected odds roots",
        "show that, how many ways, how fast, how long, how far, how old, standard deviation",
    ),
    "multi_step": cue(
        "step-by-step plan schedule itinerary timeline roadmap milestone milestones phases stages",
        "step by step, and then, after that, followed by, show your working, show the working, show your work, "
        "walk me through, each step",
    ),
    "reasoning": cue(
        "why explain explains explained explaining explanation compare compared comparing comparison contrast "
        "trade-off trade-offs tradeoff tradeoffs analyse analyze analysis analysing analyzing design designing "
        "evaluate evaluating evaluation justify justification architect architecture strategy strategies derive "
        "derivation versus vs implication implications argue deduce reason reasoning consistency scale scaling "
        "scalable failure failures rigorous rigorously",
        "how would you, how does, how do, what happens, difference between, differences between, pros and cons",
    ),
    "constraints": cue(
        "must should without only never within budget exactly minimise minimize maximise maximize guarantee "
        "guarantees guaranteed avoid avoiding ensure constraint constraints require requires required "
        "requirement requirements unless except cannot",
        "at least, at most, no more than, per second, per day, per week",
    ),
    "simple_task": cue(
        "translate translation summarise summarize summary gist tldr typo typos spelling spell misspelled "
        "grammar punctuation rewrite rephrase reword paraphrase convert format capitalise capitalize uppercase "
        "lowercase extract classify sentiment label spam alphabetical alphabetically bullet bulleted synonym "
        "tone polite politely friendlier formal formally informal shorten shorter condense",
        "tl dr, positive or negative, which language, title case, in one sentence, in one line, in a sentence, "
        "what is the capital, who wrote, who painted, who invented, who composed, stand for, pull out, fix the, "
        "correct the",
    ),
    "chit_chat": cue(
        "joke jokes pun riddle compliment favourite favorite bored nervous birthday",
        "how are you, what's up, fun fact, wish me luck, cheer me up, good morning, good night, recommend a, "
        "suggest a, i'm feeling, i'm tired",
    ),
}
"""Word cues, each counted by `cue_hits` and scaled into the feature of the same name."""

GREETINGS = frozenset("hi hello hey yo morning thanks thank cheers ok okay lol bye".split())
"""A first word that makes a message small talk."""

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def _index(cues: dict[str, Cue]) -> tuple[dict[str, tuple[str, ...]], dict[str, list[tuple[str, str]]]]:
    """word → the cues it belongs to; first word of a phrase → (cue, " phrase ") to search for, so
    that only phrases whose first word occurs are searched."""
    lexicon: dict[str, tuple[str, ...]] = {}
    phrases: dict[str, list[tuple[str, str]]] = {}
    for name, c in cues.items():
        for word in c.words:
            lexicon[word] = (*lexicon.get(word, ()), name)
        for phrase in c.phrases:
            words = _WORD.findall(phrase)
            phrases.setdefault(words[0], []).append((name, f" {' '.join(words)} "))
    return lexicon, phrases


_LEXICON, _PHRASES = _index(CUES)

# Symbols are counted with str.count: a regular expression that does not start with a literal
# tries every position of the text, which costs more than all the word cues.
_CODE_SYMBOLS = tuple("{}();[]=<>")
_CODE_OPERATORS = ("==", "!=", "+=", "-=", "->", "=>", "::", "&&", "||")
_MATHS_SIGNS = tuple("^√∫∑π≤≥")
_ARITHMETIC = re.compile(r"\d\s*[-+*/^×÷=<>]\s*[\d(a-z]", re.IGNORECASE)
_EQUALS = re.compile(r"=(?=\s?[-\w(])")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_NUMBERED_LINE = re.compile(r"^[ \t]*\d+[.)][ \t]", re.MULTILINE)


def _count_any(text: str, needles: tuple[str, ...]) -> int:
    return sum(map(text.count, needles))


def _saturate(hits: float, cap: float) -> float:
    return min(1.0, hits / cap)


def approx_tokens(text: str) -> float:
    """Roughly the token count a BPE tokenizer gives: 1.3 per word, or 1 per 4 characters for dense text."""
    return max(len(text.split()) * 1.3, len(text) / 4)


def cue_hits(text: str) -> dict[str, int]:
    """How many words and phrases of each of `CUES` occur in `text`."""
    words = _WORD.findall(text.lower())
    hits = dict.fromkeys(CUES, 0)
    for word in words:
        for name in _LEXICON.get(word, ()):
            hits[name] += 1
    joined = f" {' '.join(words)} "
    for first in _PHRASES.keys() & set(words):
        for name, phrase in _PHRASES[first]:
            hits[name] += joined.count(phrase)
    if words and words[0] in GREETINGS:
        hits["chit_chat"] += 1
    if "first" in words and "then" in words:
        hits["multi_step"] += 1
    return hits


def cheap_features(text: str, turns: int = 1) -> dict[str, float]:
    """Cues of difficulty in `text`, each scaled to about [0, 1]; `turns` is the number of user
    messages in the conversation (1 for a lone prompt). About 0.1 ms for a kilobyte."""
    hits = cue_hits(text)
    chars = max(len(text), 1)
    symbol_density = _count_any(text, _CODE_SYMBOLS) / chars
    code_syntax = _count_any(text, _CODE_OPERATORS) + 3 * text.count("```") / 2
    # Several numbers in one prompt usually make a word problem.
    numbers = max(0, len(_NUMBER.findall(text)) - 1)
    maths_symbols = len(_ARITHMETIC.findall(text)) + len(_EQUALS.findall(text)) + _count_any(text, _MATHS_SIGNS)
    return {
        "length": min(1.0, math.log1p(approx_tokens(text)) / math.log1p(LENGTH_CAP_TOKENS)),
        "code": min(1.0, 0.12 * code_syntax + 0.25 * hits["code"] + 8 * symbol_density),
        "maths": min(1.0, 0.15 * maths_symbols + 0.3 * hits["maths"] + 0.05 * numbers),
        "multi_step": _saturate(hits["multi_step"] + len(_NUMBERED_LINE.findall(text)), 3),
        "reasoning": _saturate(hits["reasoning"], 2),
        "questions": _saturate(text.count("?"), 3),
        "turns": _saturate(max(turns, 1) - 1, 4),
        "constraints": _saturate(hits["constraints"], 4),
        "simple_task": _saturate(hits["simple_task"], 2),
        "chit_chat": _saturate(hits["chit_chat"], 1),
    }


HEURISTIC_WEIGHTS = {
    "length": 2.5,  # longer requests tend to ask for more, but long-and-easy exists: see simple_task
    "code": 2.5,
    "maths": 2.5,
    "multi_step": 1.5,
    "reasoning": 2.0,
    "questions": 0.3,  # several questions in one message: more to answer
    "turns": 0.5,  # a later turn carries context the answer must respect
    "constraints": 1.5,  # each constraint is one more thing a small model forgets
    "simple_task": -3.0,  # translate, summarise, fix typos, extract: easy however long the text
    "chit_chat": -2.0,
}
"""Weights of the fixed heuristic: z = bias + sum(w * feature), score = logistic(z). Set by hand
from the cues' meaning and checked on the training split, never on the held-out one."""

HEURISTIC_BIAS = -2.0
"""A dozen words with no cue (length ~0.37) score about 0.25."""


def heuristic_score(features: dict[str, float]) -> float:
    """Fixed logistic combination of `cheap_features` (see `HEURISTIC_WEIGHTS`), in [0, 1]."""
    z = HEURISTIC_BIAS + sum(w * features.get(name, 0.0) for name, w in HEURISTIC_WEIGHTS.items())
    return 1.0 / (1.0 + math.exp(-z))


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


def dataset_bytes(path: Path | None, bundled: str = "complexity/prompts.jsonl") -> bytes:
    """The bytes of a labelled dataset: `path`, or for None the file bundled in
    `tierserve.configs` at `bundled`."""
    if path is None:
        return resources.files("tierserve.configs").joinpath(*bundled.split("/")).read_bytes()
    return Path(path).read_bytes()


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


def _feature_matrix(features: list[dict[str, float]], names: tuple[str, ...] = FEATURES) -> np.ndarray:
    return np.array([[f[name] for name in names] for f in features], dtype=np.float32).reshape(-1, len(names))


EMBED_CHARS = 192
"""Characters of a prompt the embedder sees by default: about the 48 tokens the router's
embedder reads (`ComplexityConfig.embed_tokens`), which keeps a decision near 10 ms on one CPU
thread (docs/routing-quality.md)."""


def _window(text: str, max_chars: int) -> str:
    """What gets embedded: all of a short prompt; of a long one, its start and its end, where
    the instruction and the question usually are (the cheap features see all of it)."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]} ... {text[-half:]}"


@dataclass(slots=True, eq=False)
class EmbeddingClassifier:
    """P(positive) = logistic(coef · [embedding, features] + intercept): a logistic regression on
    a sentence embedding concatenated with named cheap features. The complexity scorer and the
    injection guard (`tierserve.safety.injection`) each train one on their own features."""

    coef: np.ndarray
    """Shape (dimension + len(feature_names),): embedding weights, then one weight per feature."""
    intercept: float
    embedder: str
    """Signature of the embedder the coefficients were fitted on; another embedder's vectors mean nothing to them."""
    dimension: int
    dataset_sha256: str
    feature_names: tuple[str, ...]
    """The feature columns, in order, that `predict` reads from each feature dict."""
    features_version: int
    """Version of the feature formulas it was trained on; a cached classifier of another version is retrained."""

    @classmethod
    def fit_rows(
        cls,
        embeddings: np.ndarray,
        features: list[dict[str, float]],
        labels: list[bool],
        *,
        embedder: Embedder,
        feature_names: tuple[str, ...],
        features_version: int,
        dataset_sha256: str,
        C: float = 1.0,
    ) -> EmbeddingClassifier:
        """Logistic regression (balanced classes, L2 with strength 1/C) on embedded, featurised rows
        (an instance of `cls`)."""
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(labels, dtype=bool)
        if y.all() or not y.any():
            raise ValueError("training needs both positive and negative examples")
        x = np.hstack([embeddings, _feature_matrix(features, feature_names)])
        model = LogisticRegression(C=C, class_weight="balanced", max_iter=2000).fit(x, y)
        return cls(
            coef=model.coef_[0].astype(np.float64),
            intercept=float(model.intercept_[0]),
            embedder=embedder.signature,
            dimension=embedder.dimension,
            dataset_sha256=dataset_sha256,
            feature_names=tuple(feature_names),
            features_version=features_version,
        )

    def predict(self, embeddings: np.ndarray, features: list[dict[str, float]]) -> np.ndarray:
        """P(positive) for each row of `embeddings` (n, dimension) with its feature dict."""
        embeddings = np.asarray(embeddings, dtype=np.float64).reshape(-1, self.dimension)
        if len(embeddings) != len(features):
            raise ValueError(f"{len(embeddings)} embeddings but {len(features)} feature dicts")
        x = np.hstack([embeddings, _feature_matrix(features, self.feature_names)])
        return 1.0 / (1.0 + np.exp(-(x @ self.coef + self.intercept)))

    def save(self, path: Path) -> None:
        """Plain arrays in a `.npz` (no pickle); `path` may also be an open binary file."""
        np.savez(
            path,
            coef=self.coef,
            intercept=np.float64(self.intercept),
            feature_names=np.array(self.feature_names),
            features_version=np.int64(self.features_version),
            embedder=np.array(self.embedder),
            dimension=np.int64(self.dimension),
            dataset_sha256=np.array(self.dataset_sha256),
        )

    @classmethod
    def load(cls, path: Path) -> EmbeddingClassifier:
        """What `save` wrote, as an instance of `cls`."""
        with np.load(path, allow_pickle=False) as f:
            classifier = cls(
                coef=f["coef"].astype(np.float64),
                intercept=float(f["intercept"]),
                embedder=str(f["embedder"]),
                dimension=int(f["dimension"]),
                dataset_sha256=str(f["dataset_sha256"]),
                feature_names=tuple(str(n) for n in f["feature_names"]),
                features_version=int(f["features_version"]),
            )
        if classifier.coef.shape != (classifier.dimension + len(classifier.feature_names),):
            raise ValueError(f"{path}: coef has shape {classifier.coef.shape}, not dimension + features")
        return classifier

    def has_features(self, names: tuple[str, ...], version: int) -> bool:
        """Whether it was trained on these feature columns, computed by this version of their formulas."""
        return self.feature_names == tuple(names) and self.features_version == version

    def check_embedder(self, embedder: Embedder | None, what: str) -> None:
        """Raise unless `embedder` is the one the coefficients were fitted on; `what` names the classifier."""
        if embedder is None:
            raise ValueError(f"a {what} classifier needs the embedder it was trained with")
        if (embedder.signature, embedder.dimension) != (self.embedder, self.dimension):
            raise ValueError(
                f"the {what} classifier was trained on embedder {self.embedder!r} "
                f"({self.dimension} dimensions), not {embedder.signature!r} ({embedder.dimension})"
            )


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
            embedder.encode([_window(e.text, max_chars) for e in examples]),
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
            embeddings = self.embedder.encode([_window(t, self.max_chars) for t in texts])
            classified = [float(p) for p in self.classifier.predict(embeddings, features)]
        ms = (time.perf_counter() - started) * 1e3 / len(texts)
        return [
            ComplexityScore(value=h if c is None else c, heuristic=h, classifier=c, features=f, ms=ms)
            for f, h, c in zip(features, heuristics, classified)
        ]


def cache_path(cache_dir: Path, prefix: str, data: bytes, signature: str) -> Path:
    """`cache_dir/{prefix}-{key}.npz`, the key a hash of a classifier's training data and of the
    signature of what it depends on (embedder, window)."""
    return Path(cache_dir) / f"{prefix}-{hashlib.sha256(data + signature.encode()).hexdigest()[:12]}.npz"


def cached_classifier(
    path: Path | None,
    fit: Callable[[], EmbeddingClassifier],
    feature_names: tuple[str, ...],
    features_version: int,
    cls: type[EmbeddingClassifier] = EmbeddingClassifier,
) -> EmbeddingClassifier:
    """The classifier saved at `path` if it was trained on these features, else `fit()`'s,
    saved there (None: fitted and not saved)."""
    classifier = cls.load(path) if path is not None and path.exists() else None
    if classifier is not None and classifier.has_features(feature_names, features_version):
        return classifier
    classifier = fit()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so that a concurrent reader (another replica) never sees half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.stem, suffix=".tmp", delete=False) as tmp:
            classifier.save(tmp)
        os.replace(tmp.name, path)
    return classifier


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


def calibrate_thresholds(scores: list[float], shares: list[float]) -> list[float]:
    """Per tier, weakest first, the lowest score that selects it, so that on `scores` (a sample of
    traffic) tier i gets `shares[i]` of the requests, as nearly as ties allow. The first threshold
    is 0.0; a tier whose share is zero at the top gets +inf (never chosen)."""
    if not shares:
        raise ValueError("shares must name at least one tier")
    if any(not math.isfinite(s) or s < 0 for s in shares):
        raise ValueError(f"shares must be finite and non-negative, got {shares}")
    if not math.isclose(sum(shares), 1.0, abs_tol=1e-6):
        raise ValueError(f"shares must sum to 1, got {sum(shares):g}")
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    if ordered.size == 0:
        raise ValueError("scores must not be empty")
    if not np.isfinite(ordered).all():
        raise ValueError("scores must be finite")
    n = ordered.size
    thresholds = [0.0]
    for cumulative in np.cumsum(shares)[:-1]:
        below = round(float(cumulative) * n)  # scores that should stay on the weaker tiers
        if below <= 0:
            thresholds.append(float(ordered[0]))
        elif below >= n:
            thresholds.append(math.inf)
        else:
            # Halfway between the last score kept below and the first sent above.
            thresholds.append(float(ordered[below - 1] + ordered[below]) / 2)
    return thresholds


@dataclass(frozen=True, slots=True)
class CurvePoint:
    threshold: float
    share_strong: float
    """Share of all prompts sent to the strong tier (score >= threshold)."""
    hard_recall: float
    """Share of hard prompts that reached the strong tier."""
    easy_to_strong: float
    """Share of easy prompts sent to the strong tier for nothing."""


def routing_curve(scores: list[float], hard: list[bool], thresholds: list[float]) -> list[CurvePoint]:
    """What each threshold does between a weak and a strong tier on labelled prompts."""
    s = np.asarray(scores, dtype=np.float64)
    h = np.asarray(hard, dtype=bool)
    if s.shape != h.shape or s.ndim != 1:
        raise ValueError(f"{s.size} scores but {h.size} labels")
    if h.all() or not h.any():
        raise ValueError("routing_curve needs at least one hard and one easy prompt")
    points = []
    for t in thresholds:
        strong = s >= t
        points.append(
            CurvePoint(
                threshold=float(t),
                share_strong=float(strong.mean()),
                hard_recall=float(strong[h].mean()),
                easy_to_strong=float(strong[~h].mean()),
            )
        )
    return points
