"""Presidio's analyzer, offline, in time linear in the text, and one per concurrent call.

The NLP engine is Presidio's slim, NER-free engine on `spacy.blank("en")` with lower-cased words
as lemmas (`BlankNlpEngine`), or a NER pipeline that is already installed; nothing is
downloaded. Two steps that took time quadratic in the text are replaced: spaCy's tokenizer, on a
long chunk without whitespace, sees only chunks of up to `MAX_TOKENIZED_CHARS` (`BoundedTokenizer`:
its own tokens everywhere else), and the context enhancer looks matches up in sorted indexes
instead of scanning the tokens for each (`IndexedContextEnhancer`: the same scores).

No lock is held while a text is analysed. Presidio's recognizers give the same results from many
threads, but spaCy's pipelines are not documented as thread-safe, and bounding their memory
(`BlankNlpEngine`'s rebuild, `memory_zone`) must not happen under another call; so each call
borrows an analyzer of its own from an `EnginePool`, which builds one more when all are busy
(without NER: about 75 ms and 2 MB, growing to about 25 MB as its vocabulary fills). Calls from
different threads run side by side: the GIL interleaves them every few milliseconds, so a small
text is not stuck behind a large one.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import regex
import spacy
from presidio_analyzer import AnalyzerEngine, EntityRecognizer, RecognizerRegistry, RecognizerResult
from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer
from presidio_analyzer.nlp_engine import (
    NerModelConfiguration,
    NlpArtifacts,
    NlpEngine,
    SlimSpacyNlpEngine,
    SpacyNlpEngine,
    TransformersNlpEngine,
)
from presidio_anonymizer import AnonymizerEngine
from spacy.language import Language
from spacy.tokens import Doc

from tierserve.safety.config import NerConfig

LANGUAGE = "en"

_NER_LABELS_TO_IGNORE = [
    "O",
    "CARDINAL",
    "EVENT",
    "LANGUAGE",
    "LAW",
    "MONEY",
    "ORDINAL",
    "PERCENT",
    "PRODUCT",
    "QUANTITY",
    "WORK_OF_ART",
]
"""spaCy/OntoNotes labels that are not personal data (as in Presidio's conf/spacy.yaml)."""


# --- NLP engines -------------------------------------------------------------------------------


@Language.component("tierserve_lowercase_lemma")
def _lowercase_lemma(doc: Doc) -> Doc:
    """A blank pipeline has no lemmatizer; Presidio matches context words as substrings of
    lemmas, so the lower-cased word serves ("cards" contains "card")."""
    for token in doc:
        token.lemma_ = token.lower_
    return doc


MAX_TOKENIZED_CHARS = 32
"""Longest chunk without whitespace that spaCy's tokenizer sees (at this length it spends up to
7 ms per KB of text on it); longer ones, rare outside URLs, keys and junk, are cut by
`BoundedTokenizer`."""

_LONG_CHUNK = regex.compile(rf"\S{{{MAX_TOKENIZED_CHARS + 1},}}")
_PIECE = regex.compile(rf"\w{{1,{MAX_TOKENIZED_CHARS}}}|[^\w\s]{{1,{MAX_TOKENIZED_CHARS}}}")


class BoundedTokenizer:
    """spaCy's tokenizer on all but chunks without whitespace longer than `MAX_TOKENIZED_CHARS`,
    which are cut into runs of word characters and runs of other characters, none longer.

    spaCy peels a chunk's prefixes and suffixes off one at a time, copying the rest of the chunk
    and searching it again for each: time quadratic in the chunk's length (24,000 `!` take 96 s).
    The runs give Presidio what it needs of a chunk that long: offsets, and words that a context
    word can be among."""

    def __init__(self, tokenizer: Callable[[str], Doc]):
        self.tokenizer = tokenizer
        self.vocab = tokenizer.vocab

    def __call__(self, text: str) -> Doc:
        docs: list[Doc] = []
        start = 0
        for chunk in _LONG_CHUNK.finditer(text):
            if chunk.start() > start:
                docs.append(self.tokenizer(text[start : chunk.start()]))
            words = _PIECE.findall(chunk.group())
            spaces = [False] * len(words)
            start = chunk.end()
            if text[start : start + 1] == " ":  # spaCy's trailing space of a token
                spaces[-1] = True
                start += 1
            docs.append(Doc(self.vocab, words=words, spaces=spaces))
        if not docs:
            return self.tokenizer(text)
        if start < len(text):
            docs.append(self.tokenizer(text[start:]))
        return Doc.from_docs(docs, ensure_whitespace=False)


def _bound_tokenizer(nlp: Language) -> Language:
    if not isinstance(nlp.tokenizer, BoundedTokenizer):
        nlp.tokenizer = BoundedTokenizer(nlp.tokenizer)
    return nlp


def _blank_english() -> Language:
    nlp = spacy.blank(LANGUAGE)
    nlp.add_pipe("tierserve_lowercase_lemma")
    return _bound_tokenizer(nlp)


class BlankNlpEngine(SlimSpacyNlpEngine):
    """Presidio's slim engine (tokens and lemmas for context words, no NER) on `spacy.blank`
    instead of a downloaded `en_core_web_sm`.

    spaCy keeps every string it has seen in its vocabulary and tokenizer cache. A service seeing
    endless new tokens (ids, keys, numbers) would grow without bound, so the pipeline is rebuilt
    (~75 ms) past `MAX_STRINGS`: about 25 MB, held by each engine of an `EnginePool`. spaCy's
    `memory_zone` also bounds it, but drops the tokenizer cache after every call: 1.5 ms more
    per KB."""

    MAX_STRINGS = 50_000

    def __init__(self, not_stop_words: set[str]) -> None:
        """`not_stop_words`: context words spaCy counts as stop words (Presidio skips those)."""
        super().__init__(models=[{"lang_code": LANGUAGE, "model_name": "blank"}], auto_download=False)
        self.not_stop_words = not_stop_words

    def load(self) -> None:
        nlp = _blank_english()
        for word in self.not_stop_words:
            nlp.vocab[word].is_stop = False
        self.nlp = {LANGUAGE: nlp}

    def process_text(self, text: str, language: str) -> NlpArtifacts:
        if len(self.nlp[language].vocab.strings) > self.MAX_STRINGS:
            self.load()
        return super().process_text(text, language)


class BlankTransformersNlpEngine(TransformersNlpEngine):
    """Presidio's transformers NER engine, tokenizing with `spacy.blank` rather than a spaCy
    model it would download."""

    def load(self) -> None:
        from presidio_analyzer.nlp_engine.huggingface_token_pipe import FACTORY_NAME

        nlp = _blank_english()
        ner = self.ner_model_configuration
        config = {
            "model": self.models[0]["model_name"]["transformers"],
            "stride": ner.stride,
            "alignment_mode": ner.alignment_mode,
            "aggregation_strategy": ner.aggregation_strategy,
            "spans_key": self.entity_key,
        }
        nlp.add_pipe(FACTORY_NAME, config=config)
        self.nlp = {LANGUAGE: nlp}


def _nlp_engine(ner: NerConfig | None, context_words: set[str]) -> NlpEngine:
    if ner is None:
        return BlankNlpEngine(context_words)
    ner_config = NerModelConfiguration(labels_to_ignore=_NER_LABELS_TO_IGNORE)
    if ner.engine == "spacy":
        # Presidio would run `spacy download` for a missing model: refuse instead.
        if not (spacy.util.is_package(ner.model) or Path(ner.model).is_dir()):
            raise ValueError(
                f"ner.model: spaCy model {ner.model!r} is not installed (no package or directory of that "
                "name); install it into the environment or give a model directory (nothing is downloaded)"
            )
        return SpacyNlpEngine(
            models=[{"lang_code": LANGUAGE, "model_name": ner.model}], ner_model_configuration=ner_config
        )
    if not TransformersNlpEngine.is_available:
        raise ValueError("ner.engine: 'transformers' needs the transformers package, which is not installed")
    if not Path(ner.model).is_dir():
        raise ValueError(
            f"ner.model: {ner.model!r} is not a directory; give a local transformers token-classification "
            "model directory (nothing is downloaded)"
        )
    return BlankTransformersNlpEngine(
        models=[{"lang_code": LANGUAGE, "model_name": {"spacy": "blank", "transformers": ner.model}}],
        ner_model_configuration=ner_config,
    )


# --- Context words in linear time -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TokenIndex:
    ends: list[int]
    """Each token's end offset, ascending."""
    keywords: list[int]
    """Positions of the tokens whose lemma is one of the text's keywords, ascending."""
    lemmas: list[str]


class IndexedContextEnhancer(LemmaContextAwareEnhancer):
    """Presidio's context enhancer (a context word among the five keywords before a match raises
    its score), with the same results in time linear in the text.

    Presidio finds a match's token by scanning the tokens from the first, and its context by
    walking back through the lemmas, looking each up in the list of the text's keywords, until it
    has five: quadratic in a text with thousands of matches, more in one with few keywords (24 KB
    of short URLs took a minute). Here both come from an index built once per text: token ends and
    keyword positions, searched by bisection."""

    def __init__(self) -> None:
        super().__init__()
        self._index: _TokenIndex | None = None

    def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers, context=None):
        if nlp_artifacts is not None and nlp_artifacts.tokens:
            keywords = set(nlp_artifacts.keywords)
            self._index = _TokenIndex(
                ends=[i + len(t) for i, t in zip(nlp_artifacts.tokens_indices, nlp_artifacts.tokens)],
                keywords=[i for i, lemma in enumerate(nlp_artifacts.lemmas) if lemma.lower() in keywords],
                lemmas=nlp_artifacts.lemmas,
            )
        try:  # an analyzer, and so its enhancer, serves one call at a time (`EnginePool`)
            return super().enhance_using_context(text, raw_results, nlp_artifacts, recognizers, context)
        finally:
            self._index = None

    def _extract_surrounding_words(self, nlp_artifacts, word, start):
        index = self._index
        if index is None:
            return super()._extract_surrounding_words(nlp_artifacts, word, start)
        token = bisect.bisect_right(index.ends, start)  # the first token ending after `start`
        if token == len(index.ends):
            raise ValueError(f"no token at offset {start} for the match {word!r}")
        before = bisect.bisect_right(index.keywords, token)  # keywords at or before the token
        after = bisect.bisect_left(index.keywords, token)  # and at or after it
        positions = (
            index.keywords[max(0, before - self.context_prefix_count - 1) : before]
            + index.keywords[after : after + self.context_suffix_count + 1]
        )
        return list({index.lemmas[p].lower() for p in positions})


# --- The engines -------------------------------------------------------------------------------

MAX_NER_ENGINES = 2
"""Analyzers an `EnginePool` with a NER model keeps: each holds a copy of the model (hundreds of
MB), so a third concurrent call waits for one of them."""


def new_analyzer(recognizers: list[EntityRecognizer], ner: NerConfig | None, warmup_text: str) -> AnalyzerEngine:
    """An analyzer over `recognizers` (new ones: an analyzer's own) and the NLP engine for `ner`,
    warmed up on `warmup_text` (what Presidio loads lazily: suffix list, phone metadata, compiled
    patterns). Raises `ValueError` naming the field for a NER model that is not installed."""
    # Presidio skips stop words when it collects context words, and spaCy's stop words
    # include "call", one of the phone number's.
    context_words = {w for r in recognizers for w in r.context or []}
    nlp_engine = _nlp_engine(ner, context_words)
    nlp_engine.load()
    registry = RecognizerRegistry(recognizers, supported_languages=[LANGUAGE])
    if ner is not None:
        registry.add_nlp_recognizer(nlp_engine)
        nlp = _bound_tokenizer(nlp_engine.nlp[LANGUAGE])
        for word in context_words:
            nlp.vocab[word].is_stop = False
    analyzer = AnalyzerEngine(
        registry=registry,
        nlp_engine=nlp_engine,
        supported_languages=[LANGUAGE],
        context_aware_enhancer=IndexedContextEnhancer(),
    )
    analyzer.analyze(warmup_text, LANGUAGE)
    return analyzer


class EnginePool:
    """The analyzers for one NER setting, each lent to one call at a time: an idle one, or a new
    one when all are busy (up to `max_size`; past it, the next one freed). Idle ones are reused
    last-in first-out, so a pool holds as many as calls have overlapped, and one thread calling
    alone gets the same one each time."""

    def __init__(self, build: Callable[[], AnalyzerEngine], max_size: int | None = None):
        """Builds the first analyzer now, so configuration errors raise where the guard is built."""
        first = build()
        self.supported_entities = frozenset(first.get_supported_entities(LANGUAGE))
        self.anonymizer = AnonymizerEngine()
        self.size = 1
        """Analyzers built so far."""
        self._build = build
        self._idle = [first]
        self._idle_lock = threading.Lock()  # held to take or return an analyzer, never while one works
        self._slots = None if max_size is None else threading.BoundedSemaphore(max_size)

    @contextmanager
    def lease(self) -> Iterator[AnalyzerEngine]:
        """An analyzer no other call is using until this one returns it."""
        if self._slots is not None:
            self._slots.acquire()
        try:
            with self._idle_lock:
                analyzer = self._idle.pop() if self._idle else None
            if analyzer is None:
                analyzer = self._build()
                with self._idle_lock:
                    self.size += 1
            try:
                yield analyzer
            finally:
                with self._idle_lock:
                    self._idle.append(analyzer)
        finally:
            if self._slots is not None:
                self._slots.release()

    def analyze(self, text: str, entities: list[str], score_threshold: float) -> list[RecognizerResult]:
        """Presidio's results for `text`, on an analyzer of this call's own."""
        with self.lease() as analyzer:
            nlp_engine = analyzer.nlp_engine
            if isinstance(nlp_engine, BlankNlpEngine):  # bounds its own vocabulary
                return analyzer.analyze(text, LANGUAGE, entities=entities, score_threshold=score_threshold)
            # A NER pipeline is too slow to rebuild; its cost dwarfs the lost tokenizer cache.
            with nlp_engine.nlp[LANGUAGE].memory_zone():
                return analyzer.analyze(text, LANGUAGE, entities=entities, score_threshold=score_threshold)
