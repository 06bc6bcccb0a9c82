"""Prompt injection and jailbreak detection (OWASP LLM01, and LLM07's system prompt extraction).

The same guard checks a request's own text (direct injection: "ignore previous instructions",
DAN and developer-mode role-play, "print your system prompt", fake `<|im_start|>system` turns)
and retrieved chunks before they reach the prompt (indirect injection: a web page, email or
README that tells whatever AI reads it to change its behaviour or to send data somewhere).

A text is cut into segments, runs of whole sentences of at most `SEGMENT_CHARS` characters
(`segments`), and each segment gets a score in [0, 1]; the text's score is its highest segment's.
One injected sentence in a long benign document is then scored on its own rather than diluted,
and the finding points at it. Two scorers, as for the router's complexity score
(`tierserve.router.complexity`):

- heuristic: a fixed logistic combination of `PATTERNS` (`tierserve.safety.injection_patterns`),
  a table of weighted regular expressions in groups (override, persona, extraction, role tags,
  exfiltration, text addressed to an AI, obfuscation, and a negative group for text *about*
  injection), matched on a folded copy of the
  segment (lowercase, zero-width characters dropped, look-alike letters and digits mapped) and on
  the text of any base64 payload in it. No model; about 0.9 ms per kilobyte on one CPU thread.
  Precise but narrow: it knows the phrasings it was written from (held-out TPR 0.14 at FPR 0.01).
- classifier: logistic regression on a MiniLM embedding of the segment concatenated with the
  pattern groups' scores, trained at first start on the train split of the bundled
  `configs/safety/injection.jsonl` and cached in a directory keyed by dataset and embedder
  (`EmbeddingClassifier`, shared with the complexity scorer). It catches phrasings the patterns
  do not know. A text is embedded in one batch of its segments; past `MAX_EMBEDDED` segments
  (about 8 KB) only those the patterns rank highest are embedded, so the cost of one check is
  bounded whatever the text's length: about 40 ms per kilobyte on one CPU thread in bfloat16.
  Held-out TPR 0.76 (direct 0.82, indirect 0.69) at FPR 0.04 at the default threshold 0.5.

Plain code with no Ray: the guard chain (`tierserve.safety.chain`) builds one `InjectionGuard`
per config, and tests use the same class.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from tierserve.core.classifier import EmbeddingClassifier, cache_path, cached_classifier, dataset_bytes
from tierserve.core.embedder import Embedder
from tierserve.safety.config import InjectionGuardConfig
from tierserve.safety.injection_patterns import FEATURES, FEATURES_VERSION, features, fold
from tierserve.safety.types import Finding, Stage, merge_overlaps

ENTITY = "PROMPT_INJECTION"
BLOCK_REASON = "the input contains instructions that try to override the system (prompt injection)"
"""Why a text was blocked: stable wording, safe to show a client (it quotes nothing)."""
REPLACEMENT = "[removed: possible prompt injection]"

BUNDLED_DATASET = "safety/injection.jsonl"
SPLITS = ("train", "heldout")
KINDS = ("direct", "indirect", "benign")

SEGMENT_CHARS = 320
"""Longest segment, in characters (about 80 tokens): long enough to hold an injected instruction
with its lead-in, short enough that a benign page around it does not drown it out."""
MAX_EMBEDDED = 24
"""Most segments the classifier embeds per text (about 8 KB of it); the rest keep their heuristic score."""
EMBED_TOKENS = 128
"""Tokens of a segment the embedder reads: all of a `SEGMENT_CHARS` segment of English."""
EMBED_DTYPE = "bfloat16"
"""The embedder's weights: on a CPU with bf16 instructions (AVX512-BF16), 40 ms per kilobyte of
text on one thread against 100 ms in float32, with the same held-out quality. A CPU without them
would emulate bfloat16 about 5x slower than float32, so the embedder uses float32 there
(`tierserve.core.embedder.native_bfloat16`)."""

CLASSIFIER_C = 0.3
"""Inverse L2 strength of the logistic regression: chosen by 5-fold cross-validation on the train
split together with the false positives on the segments of the bundled RAG corpus (long benign
documents); stronger fits flag more documentation, weaker ones miss more injections."""

# A line break only from the start of a run of whitespace: from each position inside a long run
# without one, `\s*\n` would scan to the run's end again (quadratic; 48 KB of spaces took 3 s).
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<!\s)\s*\n\s*")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def segments(text: str, max_chars: int = SEGMENT_CHARS) -> list[tuple[int, int]]:
    """(start, end) of the segments of `text`: consecutive whole sentences (or lines) packed into
    windows of at most `max_chars`, a new window at a paragraph break once the current one is
    half full, a sentence longer than `max_chars` cut at a space. A text that fits is one segment."""
    if max_chars < 16:
        raise ValueError(f"max_chars must be at least 16, got {max_chars}")
    if not text.strip():
        return []
    if len(text) <= max_chars:
        return [(0, len(text))]
    pieces: list[tuple[int, int, bool]] = []  # (start, end, follows a paragraph break)
    start, paragraph = 0, False
    for m in _SENTENCE_BREAK.finditer(text):
        if m.start() > start:
            pieces += _cut(text, start, m.start(), max_chars, paragraph)
            paragraph = False
        paragraph = paragraph or bool(_PARAGRAPH_BREAK.search(m.group()))
        start = m.end()
    if start < len(text):
        pieces += _cut(text, start, len(text), max_chars, paragraph)
    windows: list[tuple[int, int]] = []
    for s, e, after_paragraph in pieces:
        if windows:
            ws, we = windows[-1]
            fits = e - ws <= max_chars
            if fits and not (after_paragraph and we - ws >= max_chars // 2):
                windows[-1] = (ws, e)
                continue
        windows.append((s, e))
    return windows


def _cut(text: str, start: int, end: int, max_chars: int, paragraph: bool) -> list[tuple[int, int, bool]]:
    """A sentence as pieces of at most `max_chars`, cut at the last space before the limit."""
    out = []
    while end - start > max_chars:
        cut = text.rfind(" ", start + max_chars // 2, start + max_chars)
        cut = cut if cut > start else start + max_chars
        out.append((start, cut, paragraph))
        paragraph = False
        start = cut + (text[cut] == " ")
    out.append((start, end, paragraph))
    return out


@dataclass(frozen=True, slots=True)
class LabelledText:
    text: str
    label: bool
    """True for an injection (`label` 1 in the file)."""
    kind: str
    """`direct` (the user's own text), `indirect` (a document with injected instructions) or `benign`."""
    split: str
    """`train` or `heldout`; held-out texts are written from other templates than the train ones."""


def load_examples(path: Path | None = None, split: str | None = None) -> list[LabelledText]:
    """The labelled texts in `path` (default: the bundled `configs/safety/injection.jsonl`), all
    of them or one split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    where = path or f"configs/{BUNDLED_DATASET}"
    examples = []
    for number, line in enumerate(dataset_bytes(path, BUNDLED_DATASET).decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            example = LabelledText(str(row["text"]), bool(int(row["label"])), str(row["kind"]), str(row["split"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{where}:{number}: not a labelled text: {exc}") from exc
        if example.split not in SPLITS or example.kind not in KINDS:
            raise ValueError(f"{where}:{number}: split must be one of {SPLITS} and kind one of {KINDS}")
        if example.label != (example.kind != "benign"):
            raise ValueError(f"{where}:{number}: label {int(example.label)} does not fit kind {example.kind!r}")
        if split is None or example.split == split:
            examples.append(example)
    return examples


def fit_classifier(
    examples: list[LabelledText], embedder: Embedder, dataset_sha256: str, C: float = CLASSIFIER_C
) -> EmbeddingClassifier:
    """Logistic regression on the embedding and `features` of each whole example (the examples
    are short: one segment each).

    Each example is also seen a second time as if no pattern had matched it (feature dropout).
    The patterns were written from these very examples, so on them they look nearly infallible,
    while on new phrasings they often stay silent; trained on the true features alone, the
    classifier leans on them and scores most injections the patterns miss below the threshold.
    The dropped copies make the embedding carry evidence of its own."""
    texts = [fold(e.text) for e in examples]
    embeddings = embedder.encode(texts)
    labels = [e.label for e in examples]
    no_evidence = features("")
    return EmbeddingClassifier.fit_rows(
        np.vstack([embeddings, embeddings]),
        [features(e.text) for e in examples] + [no_evidence] * len(examples),
        labels + labels,
        embedder=embedder,
        feature_names=FEATURES,
        features_version=FEATURES_VERSION,
        dataset_sha256=dataset_sha256,
        C=C,
    )


def load_classifier(embedder: Embedder, cache_dir: Path | None, dataset: Path | None = None) -> EmbeddingClassifier:
    """The classifier cached in `cache_dir` for this dataset and embedder, or one trained on
    the dataset's train split (seconds on a CPU) and cached there (None: not cached)."""
    data = dataset_bytes(dataset, BUNDLED_DATASET)

    def fit() -> EmbeddingClassifier:
        return fit_classifier(load_examples(dataset, "train"), embedder, hashlib.sha256(data).hexdigest())

    path = None
    if cache_dir is not None:
        path = cache_path(cache_dir, "injection", data, f"{embedder.signature}|{SEGMENT_CHARS}")
    return cached_classifier(path, fit, FEATURES, FEATURES_VERSION)


@dataclass(frozen=True, slots=True)
class SegmentScore:
    start: int
    end: int
    score: float
    """What the guard decides on: the classifier's probability where it embedded the segment, else the heuristic."""
    heuristic: float
    classifier: float | None


def embedded_segments(rows: list[dict[str, float]]) -> list[int]:
    """Which of a text's segments (their `features` rows) the classifier embeds: at most
    `MAX_EMBEDDED`, those the patterns rank highest."""
    return sorted(range(len(rows)), key=lambda i: -rows[i]["heuristic"])[:MAX_EMBEDDED]


class InjectionGuard:
    """The `Guard` for prompt injection: one `PROMPT_INJECTION` finding per run of adjacent
    segments scoring at or above the threshold."""

    def __init__(
        self,
        config: InjectionGuardConfig | None = None,
        cache_dir: Path | None = None,
        embedder: Embedder | None = None,
    ):
        """`classifier` mode loads `config.embedder` (unless `embedder` is given: one loaded with
        `EMBED_TOKENS` and `EMBED_DTYPE` to share) and the classifier cached in `cache_dir`,
        training it there first if need be."""
        self.config = config or InjectionGuardConfig()
        self.name = self.config.name
        self.threshold = self.config.threshold
        self.embedder: Embedder | None = None
        self.classifier: EmbeddingClassifier | None = None
        if self.config.mode == "classifier":
            self.embedder = embedder or Embedder(self.config.embedder, max_seq_length=EMBED_TOKENS, dtype=EMBED_DTYPE)
            dataset = Path(self.config.dataset) if self.config.dataset else None
            self.classifier = load_classifier(self.embedder, Path(cache_dir) if cache_dir else None, dataset)
            if not self.classifier.has_features(FEATURES, FEATURES_VERSION):
                raise ValueError("the injection classifier was trained on other features; retrain it")
            self.classifier.check_embedder(self.embedder, "injection")

    @property
    def mode(self) -> Literal["heuristic", "classifier"]:
        return "heuristic" if self.classifier is None else "classifier"

    def score_segments(self, text: str) -> list[SegmentScore]:
        """Every segment of `text` with its scores; at most `MAX_EMBEDDED` are embedded."""
        spans = segments(text)
        rows = [features(text[s:e]) for s, e in spans]
        classified: dict[int, float] = {}
        if self.classifier is not None and spans:
            chosen = embedded_segments(rows)
            vectors = self.embedder.encode([fold(text[spans[i][0] : spans[i][1]]) for i in chosen])
            probabilities = self.classifier.predict(vectors, [rows[i] for i in chosen])
            classified = {i: float(p) for i, p in zip(chosen, probabilities)}
        out = []
        for i, ((s, e), row) in enumerate(zip(spans, rows)):
            c = classified.get(i)
            out.append(SegmentScore(s, e, row["heuristic"] if c is None else c, row["heuristic"], c))
        return out

    def score(self, text: str) -> float:
        """The text's injection score in [0, 1]: its highest segment's (0 for an empty text)."""
        return max((s.score for s in self.score_segments(text)), default=0.0)

    def detect(self, text: str, stage: Stage) -> list[Finding]:
        """One finding per run of adjacent flagged segments, spanning the run, with its highest score."""
        findings: list[Finding] = []
        for s in self.score_segments(text):
            if s.score < self.threshold:
                continue
            last = findings[-1] if findings else None
            if last is not None and not text[last.end : s.start].strip():
                findings[-1] = Finding(self.name, ENTITY, last.start, s.end, max(last.score, s.score))
            else:
                findings.append(Finding(self.name, ENTITY, s.start, s.end, s.score))
        return findings

    def redact(self, text: str, findings: list[Finding]) -> str:
        """`text` with each finding's span replaced by `REPLACEMENT` (overlapping spans merged)."""
        pieces, end = [], 0
        for f in merge_overlaps(findings):
            pieces += [text[end : f.start], REPLACEMENT]
            end = f.end
        return "".join(pieces) + text[end:]

    def block_reason(self, findings: list[Finding], stage: Stage) -> str:
        """The same stable wording at every stage; never the text."""
        return BLOCK_REASON
