"""The PII guard: Microsoft Presidio's recognizers and anonymizer, offline.

Detection is a Presidio `AnalyzerEngine` over a registry of recognizers (`RECOGNIZERS`, one per
entity type: Presidio's own pattern, checksum and context recognizers, and tierserve's for what
Presidio lacks, such as API keys). Presidio's default engine loads the spaCy model
`en_core_web_lg` (and downloads it when missing); here the NLP engine is Presidio's slim,
NER-free engine on `spacy.blank("en")` with lower-cased words as lemmas. That is all the context
enhancer needs: a context word ("ssn", "card", "phone") among the five words before a match
raises its score. Nothing is downloaded, ever: the e-mail check reads tldextract's bundled
public-suffix snapshot, and a configured NER model must already be installed.

The engine is built once per process and NER setting and shared by every guard with that
setting. Calls into it hold one lock: Presidio's analysis itself gives the same results from many
threads, but spaCy's pipelines are not documented as thread-safe, and bounding their memory
(`BlankNlpEngine`, `memory_zone`) must not happen under another call; the work holds the GIL
anyway, so the lock costs no throughput.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import regex
import spacy
import tldextract
from presidio_analyzer import (
    AnalyzerEngine,
    EntityRecognizer,
    Pattern,
    PatternRecognizer,
    RecognizerRegistry,
    RecognizerResult,
)
from presidio_analyzer.nlp_engine import (
    NerModelConfiguration,
    NlpArtifacts,
    NlpEngine,
    SlimSpacyNlpEngine,
    SpacyNlpEngine,
    TransformersNlpEngine,
)
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    CryptoRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    IpRecognizer,
    MacAddressRecognizer,
    PhoneRecognizer,
    UrlRecognizer,
    UsSsnRecognizer,
)
from presidio_anonymizer import AnonymizerEngine, ConflictResolutionStrategy
from presidio_anonymizer.entities import OperatorConfig
from presidio_anonymizer.entities import RecognizerResult as AnonymizerResult
from spacy.language import Language
from spacy.tokens import Doc

from tierserve.safety.config import NerConfig, PiiGuardConfig
from tierserve.safety.guard import check_by_stage
from tierserve.safety.types import Finding, Stage, Verdict

MAX_ENTITY_CHARS = 256
"""Cap on `PiiGuard.max_entity_chars`. URLs (their paths) and the longest keys are unbounded or
longer; past this many characters, a stream split inside one may leave its tail unredacted."""

HASH_CHARS = 16
"""Hex digits of the salted SHA-256 the `hash` operator writes (64 bits)."""

_PROCESS_SALT = secrets.token_bytes(32)
"""The `hash` operator's salt: random per process, so a value hashes the same in every guard of
one ingress replica (and request), differently across replicas and restarts, and cannot be
recovered by hashing guesses offline."""

_LANGUAGE = "en"
_NER_MAX_CHARS = 128


# --- Recognizers -------------------------------------------------------------------------------


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's e-mail recognizer, checking the domain against tldextract's bundled public-suffix
    snapshot. Presidio calls `tldextract.extract`, whose first call in a process without a cache
    fetches the list from publicsuffix.org, then a GitHub mirror, with no timeout."""

    _suffixes = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)

    def validate_result(self, pattern_text: str) -> bool:
        return self._suffixes(pattern_text).fqdn != ""


_URL_CHARS = r"""[^\s<>"'()\[\]{}]"""
_URL_END = r"""[^\s<>"'()\[\]{}.,;:!?]"""  # a URL does not end on sentence punctuation
URL_PATTERNS = [
    Pattern("URL with scheme", rf"\b(?:https?|ftp)://{_URL_CHARS}*{_URL_END}", 0.6),
    Pattern("www URL", rf"(?<![\w.-])www\d{{0,3}}\.{_URL_CHARS}*{_URL_END}", 0.6),
    # A bare domain ("example.com", but also "setup.py": py is Paraguay's TLD) is only a URL with
    # a context word ("url", "website", "link") before it.
    Pattern("bare domain", rf"(?<![\w.@/-]){UrlRecognizer.BASE_URL_REGEX}(?![\w-])", 0.3),
]


PHONE_REGIONS = ("US", "GB", "DE", "FR", "IL", "IN", "BR")
"""Where a number written without a country code is tried: Presidio's default regions less CA,
which parsing as US covers (one numbering plan), for an eighth of the cost."""
PHONE_CONTEXT = [*PhoneRecognizer.CONTEXT, "tel", "fax", "contact", "reach", "dial", "sms", "whatsapp"]
"""Presidio's phone context words and a few more ways a number gets introduced."""


class SecretKeyRecognizer(PatternRecognizer):
    """API keys and access tokens with a recognisable prefix, and long random values assigned to
    a key-like name (`api_key = "..."`). Lookaheads require the character classes the issuer's
    alphabet guarantees (a random base62 key of 40 or more characters lacks a digit or a capital
    with negligible probability), so words such as `sk-learn-compatible-estimators` are not keys;
    `invalidate_result` drops placeholders (`xxxxxxxx`, `0000000000000000`)."""

    _B = r"(?<![\w-])"  # token boundaries: keys contain `-` and `_`
    _E = r"(?![\w-])"
    _MIXED = r"(?=[\w-]*[A-Z])(?=[\w-]*[a-z])(?=[\w-]*\d)"
    PATTERNS = [
        # OpenAI (sk-, sk-proj-, sk-svcacct-) and Anthropic (sk-ant-api03-) keys
        Pattern("OpenAI / Anthropic key", rf"{_B}sk-{_MIXED}[\w-]{{20,230}}{_E}", 0.85),
        Pattern("AWS access key id", rf"{_B}(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{{16}}{_E}", 0.85),
        Pattern("GitHub token", rf"{_B}(?:gh[pousr]_[A-Za-z0-9]{{36,240}}|github_pat_\w{{22,240}}){_E}", 0.9),
        Pattern("Slack token", rf"{_B}xox[abposr]-(?=[\w-]*\d)[A-Za-z0-9-]{{10,240}}{_E}", 0.85),
        Pattern("Google API key", rf"{_B}AIza[\w-]{{35}}{_E}", 0.85),
        Pattern("Stripe key", rf"{_B}[rs]k_(?:live|test)_[A-Za-z0-9]{{16,240}}{_E}", 0.9),
        Pattern("Hugging Face token", rf"{_B}hf_(?=\w*[A-Z])(?=\w*[a-z])[A-Za-z0-9]{{30,40}}{_E}", 0.85),
        Pattern(
            "assigned secret",
            r"(?<=(?i:\b(?:api|access|auth|secret|private)[_-]?(?:key|token)|\bsecret|\btoken|\bpassword|\bpasswd)"
            r"""["']?\s{0,3}[:=]\s{0,3}["']?)(?=[\w\-+/=.]*\d)(?=[\w\-+/=.]*[A-Za-z])[\w\-+/=.]{16,200}(?![\w\-+/=.])""",
            0.6,
        ),
    ]
    CONTEXT = ["key", "token", "secret", "api", "credential", "password", "bearer", "auth"]

    def __init__(self) -> None:
        super().__init__(
            supported_entity="SECRET_KEY",
            patterns=self.PATTERNS,
            context=self.CONTEXT,
            name="SecretKeyRecognizer",
            global_regex_flags=regex.DOTALL | regex.MULTILINE,  # case matters in keys
        )

    def invalidate_result(self, pattern_text: str) -> bool:
        return len(set(pattern_text)) < 10 or regex.search(r"(.)\1{5}", pattern_text) is not None


@dataclass(frozen=True, slots=True)
class RecognizerSpec:
    """How to find one entity type."""

    build: Callable[[], EntityRecognizer]
    """A new recognizer for the registry (Presidio's class, or tierserve's)."""
    max_chars: int
    """The longest span it can match (or, for unbounded patterns, `MAX_ENTITY_CHARS`)."""


RECOGNIZERS: dict[str, RecognizerSpec] = {
    "EMAIL_ADDRESS": RecognizerSpec(OfflineEmailRecognizer, 254),  # RFC 5321's path limit
    # libphonenumber's matcher in Presidio's default regions (~15 digits, punctuation, extension);
    # 0.4 alone, so a context word is needed at the default threshold
    "PHONE_NUMBER": RecognizerSpec(lambda: PhoneRecognizer(context=PHONE_CONTEXT, supported_regions=PHONE_REGIONS), 64),
    "CREDIT_CARD": RecognizerSpec(CreditCardRecognizer, 20),  # up to 19 digits in 4 groups, Luhn
    "IBAN_CODE": RecognizerSpec(IbanRecognizer, 42),  # 34 characters in groups of 4, mod-97 checksum
    "US_SSN": RecognizerSpec(UsSsnRecognizer, 11),
    "IP_ADDRESS": RecognizerSpec(IpRecognizer, 64),  # IPv6 with zone and prefix length
    "URL": RecognizerSpec(lambda: UrlRecognizer(patterns=URL_PATTERNS), MAX_ENTITY_CHARS),
    "SECRET_KEY": RecognizerSpec(SecretKeyRecognizer, MAX_ENTITY_CHARS),
    "CRYPTO": RecognizerSpec(CryptoRecognizer, 62),  # Bitcoin addresses (base58 or bech32), checksummed
    "MAC_ADDRESS": RecognizerSpec(MacAddressRecognizer, 17),
}
"""Entity types `PiiGuardConfig.entities` may name without NER, and how each is found."""

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


def _blank_english() -> Language:
    nlp = spacy.blank(_LANGUAGE)
    nlp.add_pipe("tierserve_lowercase_lemma")
    return nlp


class BlankNlpEngine(SlimSpacyNlpEngine):
    """Presidio's slim engine (tokens and lemmas for context words, no NER) on `spacy.blank`
    instead of a downloaded `en_core_web_sm`.

    spaCy keeps every string it has seen in its vocabulary and tokenizer cache. A service seeing
    endless new tokens (ids, keys, numbers) would grow without bound, so the pipeline is rebuilt
    (~60 ms) past `MAX_STRINGS`. spaCy's `memory_zone` also bounds it, but drops the tokenizer
    cache after every call: 1.5 ms more per KB."""

    MAX_STRINGS = 200_000

    def __init__(self, not_stop_words: set[str]) -> None:
        """`not_stop_words`: context words spaCy counts as stop words (Presidio skips those)."""
        super().__init__(models=[{"lang_code": _LANGUAGE, "model_name": "blank"}], auto_download=False)
        self.not_stop_words = not_stop_words

    def load(self) -> None:
        nlp = _blank_english()
        for word in self.not_stop_words:
            nlp.vocab[word].is_stop = False
        self.nlp = {_LANGUAGE: nlp}

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
        self.nlp = {_LANGUAGE: nlp}


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
            models=[{"lang_code": _LANGUAGE, "model_name": ner.model}], ner_model_configuration=ner_config
        )
    if not TransformersNlpEngine.is_available:
        raise ValueError("ner.engine: 'transformers' needs the transformers package, which is not installed")
    if not Path(ner.model).is_dir():
        raise ValueError(
            f"ner.model: {ner.model!r} is not a directory; give a local transformers token-classification "
            "model directory (nothing is downloaded)"
        )
    return BlankTransformersNlpEngine(
        models=[{"lang_code": _LANGUAGE, "model_name": {"spacy": "blank", "transformers": ner.model}}],
        ner_model_configuration=ner_config,
    )


# --- The shared engine -------------------------------------------------------------------------

_WARMUP_TEXT = (
    "Mail jane@example.com or call +1 212-555-0123; card 4111 1111 1111 1111, IBAN GB82 WEST 1234 "
    "5698 7654 32, ssn 536-22-8726, host 10.0.0.1 / fe80::1, see https://example.com/a and www.a.org."
)


@dataclass(slots=True)
class _Engine:
    analyzer: AnalyzerEngine
    anonymizer: AnonymizerEngine
    lock: threading.Lock

    def analyze(self, text: str, entities: list[str], score_threshold: float) -> list[RecognizerResult]:
        nlp_engine = self.analyzer.nlp_engine
        with self.lock:
            if isinstance(nlp_engine, BlankNlpEngine):  # bounds its own vocabulary
                return self.analyzer.analyze(text, _LANGUAGE, entities=entities, score_threshold=score_threshold)
            # A NER pipeline is too slow to rebuild; its cost dwarfs the lost tokenizer cache.
            with nlp_engine.nlp[_LANGUAGE].memory_zone():
                return self.analyzer.analyze(text, _LANGUAGE, entities=entities, score_threshold=score_threshold)


_engines: dict[tuple[str, str] | None, _Engine] = {}
_engines_lock = threading.Lock()


def _shared_engine(ner: NerConfig | None) -> _Engine:
    """The analyzer for this NER setting, built on first use, with every registered recognizer."""
    key = None if ner is None else (ner.engine, ner.model)
    with _engines_lock:
        if key not in _engines:
            recognizers = [spec.build() for spec in RECOGNIZERS.values()]
            # Presidio skips stop words when it collects context words, and spaCy's stop words
            # include "call", one of the phone number's.
            context_words = {w for r in recognizers for w in r.context or []}
            nlp_engine = _nlp_engine(ner, context_words)
            nlp_engine.load()
            registry = RecognizerRegistry(recognizers, supported_languages=[_LANGUAGE])
            if ner is not None:
                registry.add_nlp_recognizer(nlp_engine)
                for word in context_words:
                    nlp_engine.nlp[_LANGUAGE].vocab[word].is_stop = False
            analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=[_LANGUAGE])
            # Loads what Presidio loads lazily (suffix list, phone metadata, compiled patterns).
            analyzer.analyze(_WARMUP_TEXT, _LANGUAGE)
            _engines[key] = _Engine(analyzer, AnonymizerEngine(), threading.Lock())
        return _engines[key]


def resolve_overlaps(findings: list[Finding]) -> list[Finding]:
    """Non-overlapping findings, by start. Of findings that overlap, the one with the higher score
    (then the longer one) names the entity, and its span grows to cover the others, so nothing
    either found is left unredacted."""
    kept: list[Finding] = []
    for f in sorted(findings, key=lambda f: (-f.score, -(f.end - f.start), f.start)):
        overlapping = [k for k in kept if k.start < f.end and f.start < k.end]
        if not overlapping:
            kept.append(f)
            continue
        winner = max(overlapping, key=lambda k: (k.score, k.end - k.start))
        merged = Finding(
            winner.guard,
            winner.entity,
            min(f.start, *(k.start for k in overlapping)),
            max(f.end, *(k.end for k in overlapping)),
            winner.score,
        )
        kept = [k for k in kept if k not in overlapping] + [merged]
    return sorted(kept, key=lambda f: f.start)


_SUBJECT: dict[Stage, str] = {"input": "the input", "retrieved": "a retrieved document", "output": "the answer"}


class PiiGuard:
    """Finds personal data with Presidio and replaces it (`replace`: `<EMAIL_ADDRESS>`, `mask`:
    `*` of the same length, `hash`: a salted SHA-256 prefix). Safe to call from several threads.

    Building one builds (or reuses) the process's Presidio engine; configuration errors (an
    unknown entity type, a NER model that is not installed) raise `ValueError` here."""

    def __init__(self, config: PiiGuardConfig, *, salt: bytes | None = None):
        """`salt`: for the `hash` operator; None: the process's random salt."""
        self.config = config
        self.name = config.name
        self._engine = _shared_engine(config.ner)
        supported = set(self._engine.analyzer.get_supported_entities(_LANGUAGE))
        for entity in config.entities:
            if entity not in supported:
                hint = "" if config.ner else " (entities such as PERSON need `ner:`)"
                raise ValueError(
                    f"entities: unknown entity type {entity!r} in PII guard {self.name!r}{hint}; "
                    f"known: {', '.join(sorted(supported))}"
                )
        self._entities = list(dict.fromkeys(config.entities))
        self._salt = _PROCESS_SALT if salt is None else salt
        self._operator = self._operator_config()

    @property
    def max_entity_chars(self) -> int:
        """The longest span any configured recognizer can match, at most `MAX_ENTITY_CHARS`: a
        streaming window holding back this many characters splits no entity shorter than the cap."""
        lengths = [RECOGNIZERS[e].max_chars if e in RECOGNIZERS else _NER_MAX_CHARS for e in self._entities]
        return min(max(lengths, default=0), MAX_ENTITY_CHARS)

    def detect(self, text: str, stage: Stage) -> list[Finding]:
        """Findings scoring at least `score_threshold`, non-overlapping, by start. The same at
        every stage (`stage` is for the protocol)."""
        if not text or not self._entities:
            return []
        results = self._engine.analyze(text, self._entities, self.config.score_threshold)
        found = [Finding(self.name, r.entity_type, r.start, r.end, r.score) for r in results]
        return resolve_overlaps(found)

    def redact(self, text: str, findings: list[Finding]) -> str:
        """`text` with each finding replaced by the configured operator."""
        if not findings:
            return text
        results = [AnonymizerResult(f.entity, f.start, f.end, f.score) for f in findings]
        return self._engine.anonymizer.anonymize(
            text,
            results,
            operators={"DEFAULT": self._operator},
            conflict_resolution=ConflictResolutionStrategy.REMOVE_INTERSECTIONS,
            merge_entities_with_spaces=False,
        ).text

    def check(self, text: str, stage: Stage) -> Verdict:
        """`detect`, then the configured action for `stage` (see `check_by_stage`)."""
        return check_by_stage(self, self.config.actions, text, stage)

    def block_reason(self, findings: list[Finding], stage: Stage) -> str:
        """Why a text with these findings is refused: the entity types, never the text."""
        entities = ", ".join(sorted({f.entity for f in findings}))
        return f"{_SUBJECT[stage]} contains personal data ({entities})"

    def _operator_config(self) -> OperatorConfig:
        if self.config.operator == "replace":
            return OperatorConfig("replace")  # no new_value: `<ENTITY_TYPE>`
        if self.config.operator == "mask":
            return OperatorConfig("mask", {"masking_char": "*", "chars_to_mask": 1 << 30, "from_end": False})
        return OperatorConfig("custom", {"lambda": self._hash})

    def _hash(self, value: str) -> str:
        return hashlib.sha256(self._salt + value.encode()).hexdigest()[:HASH_CHARS]
