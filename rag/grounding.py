"""How much of an answer the cited passages support: a cheap signal for hallucination-prone traffic.

The answer is split into sentences; a sentence is supported when its embedding's cosine
similarity to some cited passage reaches a threshold (`rag.grounding_threshold`). The score is
the supported share of the answer's sentences, weighted by length. A lexical measure goes with
it: the share of the answer's content words that occur in the passages. Both are in [0, 1];
neither proves an answer right, but a low score flags an answer that wandered off its sources.
If the answer cites nothing, it is measured against every passage it was given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_'-]*")
_CITATION = re.compile(r"\[\d{1,2}\]")
MIN_WORDS = 3
"""Sentences shorter than this ("Yes.", "[1]") are not judged."""
_STOPWORDS = frozenset(
    "a an and are as at be been but by can do does for from has have how i if in into is it its of on or "
    "so such that the their them then there these they this to was we were what when which while who "
    "will with you your not no".split()
)


@dataclass(slots=True)
class Grounding:
    score: float | None
    """Length-weighted share of the answer's sentences supported by a passage; None when the
    answer has no sentence long enough to judge."""
    lexical: float | None
    """Share of the answer's content words found in the passages."""
    sentences: int
    supported: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "score": None if self.score is None else round(self.score, 4),
            "lexical": None if self.lexical is None else round(self.lexical, 4),
            "sentences": self.sentences,
            "supported": self.supported,
        }


def sentences(answer: str) -> list[str]:
    """The answer's sentences worth judging, citation markers removed."""
    parts = (_CITATION.sub("", s).strip() for s in _SENTENCE.split(answer))
    return [p for p in parts if len(_WORD.findall(p)) >= MIN_WORDS]


def content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)} - _STOPWORDS


def lexical_support(answer: str, passages: list[str]) -> float | None:
    words = content_words(_CITATION.sub("", answer))
    if not words:
        return None
    source = set().union(*(content_words(p) for p in passages)) if passages else set()
    return len(words & source) / len(words)


def grounding(
    answer: str, passages: list[str], sentence_vectors: np.ndarray, passage_vectors: np.ndarray, threshold: float
) -> Grounding:
    """`sentence_vectors` are the unit embeddings of `sentences(answer)`, `passage_vectors` of
    `passages` (both rows in order)."""
    judged = sentences(answer)
    lexical = lexical_support(answer, passages)
    if not judged or len(passage_vectors) == 0:
        return Grounding(None if not judged else 0.0, lexical, len(judged), 0)
    best = (sentence_vectors @ passage_vectors.T).max(axis=1)
    ok = best >= threshold
    weights = np.array([len(_WORD.findall(s)) for s in judged], dtype=np.float64)
    return Grounding(float(weights[ok].sum() / weights.sum()), lexical, len(judged), int(ok.sum()))
