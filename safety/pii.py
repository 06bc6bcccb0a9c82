"""The PII guard: Microsoft Presidio's recognizers and anonymizer, offline.

Detection is a Presidio `AnalyzerEngine` over a registry of recognizers (`RECOGNIZERS`, one per
entity type: Presidio's own pattern, checksum and context recognizers, and tierserve's for what
Presidio lacks, such as API keys). Presidio's default engine loads the spaCy model
`en_core_web_lg` (and downloads it when missing); here the NLP engine is Presidio's slim,
NER-free engine on `spacy.blank("en")` with lower-cased words as lemmas
(`tierserve.safety.presidio`). That is all the context enhancer needs: a context word ("ssn",
"card", "phone") among the five words before a match raises its score. Nothing is downloaded,
ever: the e-mail check reads tldextract's bundled public-suffix snapshot, and a configured NER
model must already be installed.

Every step takes time linear in the text, crafted or not (tests/unit/test_guard_linear.py,
docs/benchmarks/guard-adversarial.md): the patterns here bound their lookaheads and repeats by the longest
match they can make, overlapping findings are resolved by bisection, and
`tierserve.safety.presidio` bounds spaCy's tokenizer and Presidio's context enhancer.
libphonenumber's matcher (seven regions, each a pass over the text) stays the costliest step on
digit-dense text, at up to ~50 ms per KB.

Each NER setting has one pool of analyzers, shared by every guard with that setting; each call
borrows one of its own, so calls from different threads run side by side, with no lock held.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

import regex
import tldextract
from phonenumbers import Leniency, PhoneNumberMatcher
from presidio_analyzer import EntityRecognizer, Pattern, PatternRecognizer, RecognizerResult
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
from presidio_anonymizer import ConflictResolutionStrategy
from presidio_anonymizer.entities import OperatorConfig
from presidio_anonymizer.entities import RecognizerResult as AnonymizerResult

from tierserve.safety.config import NerConfig, PiiGuardConfig
from tierserve.safety.presidio import MAX_NER_ENGINES, EnginePool, new_analyzer
from tierserve.safety.types import Finding, Stage, merge_overlaps

MAX_ENTITY_CHARS = 256
"""Cap on `PiiGuard.max_entity_chars`. URLs (their paths) and the longest keys are unbounded or
longer; past this many characters, a stream split inside one may leave its tail unredacted."""

HASH_CHARS = 16
"""Hex digits of the salted SHA-256 the `hash` operator writes (64 bits)."""

_PROCESS_SALT = secrets.token_bytes(32)
"""The `hash` operator's salt: random per process, so a value hashes the same in every guard of
one ingress replica (and request), differently across replicas and restarts, and cannot be
recovered by hashing guesses offline."""

_NER_MAX_CHARS = 128


# --- Recognizers -------------------------------------------------------------------------------


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's e-mail recognizer, checking the domain against tldextract's bundled public-suffix
    snapshot. Presidio calls `tldextract.extract`, whose first call in a process without a cache
    fetches the list from publicsuffix.org, then a GitHub mirror, with no timeout.

    Its pattern, with the local part bounded by RFC 5321's 64 characters: unbounded, each word
    boundary in a run such as `a.a.a.…` began a scan to the run's end (24 KB of it ending in `@x`
    took a minute)."""

    PATTERNS = [
        Pattern(
            "Email (Medium)",
            r"\b((([!#$%&'*+\-/=?^_`{|}~\w])|([!#$%&'*+\-/=?^_`{|}~\w][!#$%&'*+\-/=?^_`{|}~\.\w]{0,62}"
            r"[!#$%&'*+\-/=?^_`{|}~\w]))[@]\w+(?:-+\w+)*(?:\.\w+(?:-+\w+)*)+)\b",
            0.5,
        ),
    ]

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


class PhoneNumberRecognizer(PhoneRecognizer):
    """Presidio's phone recognizer, scored by how much of libphonenumber's evidence a match has.

    Presidio keeps every number libphonenumber finds valid for a region (`Leniency.VALID`) at
    0.4, under the default threshold, so a number with no context word before it is missed. A
    valid number written the way its region writes numbers scores `GROUPED_SCORE`, over the
    threshold on its own: its digit groups are exactly the region's (`EXACT_GROUPING`:
    "(212) 555-0199", "+44 20 7946 0958"; not "2125 550 199", nor an SSN's "059-56-4323", which is
    a valid German number grouped otherwise), and it is written with separators or a country
    code (a bare run of ten digits is as often an order or account number). The other digit runs
    a text holds (quantities, dates, cards and IBANs that fail their checksums) are seldom valid
    and so grouped (docs/benchmarks/safety-benchmark.md); they stay at 0.4 and need a context word, as
    before. The grouping check re-reads only the matched characters."""

    GROUPED_SCORE = 0.6

    def __init__(self) -> None:
        super().__init__(context=PHONE_CONTEXT, supported_regions=PHONE_REGIONS, leniency=Leniency.VALID)

    def analyze(self, text: str, entities: list[str], nlp_artifacts=None) -> list[RecognizerResult]:
        results = []
        for region in self.supported_regions:
            for match in PhoneNumberMatcher(text, region, leniency=self.leniency):
                result = self._get_recognizer_result(match, text, region, nlp_artifacts)
                if self._grouped(match.raw_string, region):
                    result.score = self.GROUPED_SCORE
                    result.analysis_explanation.set_improved_score(self.GROUPED_SCORE)
                results.append(result)
        return EntityRecognizer.remove_duplicates(results)

    @staticmethod
    def _grouped(raw: str, region: str) -> bool:
        if raw.isdigit():
            return False
        return any(True for _ in PhoneNumberMatcher(raw, region, leniency=Leniency.EXACT_GROUPING))


class SecretKeyRecognizer(PatternRecognizer):
    """API keys and access tokens with a recognisable prefix, and long random values assigned to
    a key-like name (`api_key = "..."`). Lookaheads require the character classes the issuer's
    alphabet guarantees (a random base62 key of 40 or more characters lacks a digit or a capital
    with negligible probability), so words such as `sk-learn-compatible-estimators` are not keys;
    `invalidate_result` drops placeholders (`xxxxxxxx`, `0000000000000000`).

    Each lookahead looks no further than the longest key its pattern matches (the key must end
    there, so nothing further can count): unbounded, the assigned secret's scanned to the end of
    the run after every `token=` in `token=token=…`, 47 KB of which took 4 s."""

    _B = r"(?<![\w-])"  # token boundaries: keys contain `-` and `_`
    _E = r"(?![\w-])"
    _MIXED = r"(?=[\w-]{0,229}[A-Z])(?=[\w-]{0,229}[a-z])(?=[\w-]{0,229}\d)"
    PATTERNS = [
        # OpenAI (sk-, sk-proj-, sk-svcacct-) and Anthropic (sk-ant-api03-) keys
        Pattern("OpenAI / Anthropic key", rf"{_B}sk-{_MIXED}[\w-]{{20,230}}{_E}", 0.85),
        Pattern("AWS access key id", rf"{_B}(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{{16}}{_E}", 0.85),
        Pattern("GitHub token", rf"{_B}(?:gh[pousr]_[A-Za-z0-9]{{36,240}}|github_pat_\w{{22,240}}){_E}", 0.9),
        Pattern("Slack token", rf"{_B}xox[abposr]-(?=[\w-]{{0,239}}\d)[A-Za-z0-9-]{{10,240}}{_E}", 0.85),
        Pattern("Google API key", rf"{_B}AIza[\w-]{{35}}{_E}", 0.85),
        Pattern("Stripe key", rf"{_B}[rs]k_(?:live|test)_[A-Za-z0-9]{{16,240}}{_E}", 0.9),
        Pattern("Hugging Face token", rf"{_B}hf_(?=\w{{0,39}}[A-Z])(?=\w{{0,39}}[a-z])[A-Za-z0-9]{{30,40}}{_E}", 0.85),
        Pattern(
            "assigned secret",
            r"(?<=(?i:\b(?:api|access|auth|secret|private)[_-]?(?:key|token)|\bsecret|\btoken|\bpassword|\bpasswd)"
            r"""["']?\s{0,3}[:=]\s{0,3}["']?)(?=[\w\-+/=.]{0,199}\d)(?=[\w\-+/=.]{0,199}[A-Za-z])"""
            r"[\w\-+/=.]{16,200}+(?![\w\-+/=.])",  # possessive: a shorter match cannot end the run either
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
    # libphonenumber's matcher in Presidio's default regions (~15 digits, punctuation, extension)
    "PHONE_NUMBER": RecognizerSpec(PhoneNumberRecognizer, 64),
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

MAY_HOLD = regex.compile(r"[^A-Za-z\s,;!?'\"().:]|[.:](?!\s)|[A-Za-z]{16}")
"""What every entity type of `RECOGNIZERS` contains: a character other than an ASCII letter,
white space or `,;!?'"()` (a digit, `@`, `/`, `-`, `_`, ...), a `.` or `:` that white space does
not follow (`example.com`, `fe80::1`; one at the end of the text may be followed by more), or a
run of 16 letters (an access key without digits or separators). No entity holds white space, so
the `.` and `:` that end sentences and introduce lists do not count. Text without any of these
holds no entity, so a stream of plain sentences needs no analysis (`PiiGuard.may_find`)."""


_WARMUP_TEXT = (
    "Mail jane@example.com or call +1 212-555-0123; card 4111 1111 1111 1111, IBAN GB82 WEST 1234 "
    "5698 7654 32, ssn 536-22-8726, host 10.0.0.1 / fe80::1, see https://example.com/a and www.a.org."
)

_engines: dict[tuple[str, str] | None, EnginePool] = {}
_engines_lock = threading.Lock()


def _shared_engine(ner: NerConfig | None) -> EnginePool:
    """The pool of analyzers for this NER setting, started on first use."""
    key = None if ner is None else (ner.engine, ner.model)
    with _engines_lock:
        if key not in _engines:
            _engines[key] = EnginePool(
                lambda: new_analyzer([spec.build() for spec in RECOGNIZERS.values()], ner, _WARMUP_TEXT),
                None if ner is None else MAX_NER_ENGINES,
            )
        return _engines[key]


_SUBJECT: dict[Stage, str] = {"input": "the input", "retrieved": "a retrieved document", "output": "the answer"}


class PiiGuard:
    """Finds personal data with Presidio and replaces it (`replace`: `<EMAIL_ADDRESS>`, `mask`:
    `*` of the same length, `hash`: a salted SHA-256 prefix). Safe to call from several threads,
    which analyse side by side.

    Building one builds (or reuses) the process's pool of Presidio engines for its NER setting; configuration errors (an
    unknown entity type, a NER model that is not installed) raise `ValueError` here."""

    def __init__(self, config: PiiGuardConfig, *, salt: bytes | None = None):
        """`salt`: for the `hash` operator; None: the process's random salt."""
        self.config = config
        self.name = config.name
        self._engine = _shared_engine(config.ner)
        supported = self._engine.supported_entities
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

    @property
    def finds_names(self) -> bool:
        """Whether it looks for names and places, which span several words (a NER model's)."""
        return self.config.ner is not None and any(e not in RECOGNIZERS for e in self._entities)

    def may_find(self, text: str) -> bool:
        """False only when `text` holds none of the entity types this guard looks for (no
        analysis needed: see `MAY_HOLD`); names and places can be any words, so a guard that
        finds them may find them anywhere."""
        return self.finds_names or MAY_HOLD.search(text) is not None

    def detect(self, text: str, stage: Stage) -> list[Finding]:
        """Findings scoring at least `score_threshold`, non-overlapping, by start. The same at
        every stage (`stage` is for the protocol)."""
        if not text or not self._entities:
            return []
        results = self._engine.analyze(text, self._entities, self.config.score_threshold)
        found = [Finding(self.name, r.entity_type, r.start, r.end, r.score) for r in results]
        return merge_overlaps(found)

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
