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

- heuristic: a fixed logistic combination of `PATTERNS`, a table of weighted regular expressions
  in groups (override, persona, extraction, role tags, exfiltration, text addressed to an AI,
  obfuscation, and a negative group for text *about* injection), matched on a folded copy of the
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

import base64
import binascii
import hashlib
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from tierserve.core.classifier import EmbeddingClassifier, cache_path, cached_classifier, dataset_bytes
from tierserve.core.embedder import Embedder
from tierserve.safety.config import InjectionGuardConfig
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
text on one thread against 100 ms in float32, with the same held-out quality."""

GROUPS = ("override", "persona", "extraction", "role_tags", "exfiltration", "addressed", "obfuscation", "discussion")
FEATURES = (*GROUPS, "heuristic")
"""Names and order of the feature columns the classifier appends to the embedding."""
FEATURES_VERSION = 1
"""Bumped whenever `PATTERNS`, the folding or the feature formulas change, so that a cached classifier is retrained."""

CLASSIFIER_C = 0.3
"""Inverse L2 strength of the logistic regression: chosen by 5-fold cross-validation on the train
split together with the false positives on the segments of the bundled RAG corpus (long benign
documents); stronger fits flag more documentation, weaker ones miss more injections."""

HEURISTIC_BIAS = -3.0
"""With no pattern matched a segment scores 0.05; one strong pattern (weight 3) alone scores 0.5."""
GROUP_CAP = 4.0
"""Summed weight at which a group's feature reaches 1."""


@dataclass(frozen=True, slots=True)
class Pattern:
    group: str
    weight: float
    regex: re.Pattern[str]


def _any(words: str) -> str:
    """A non-capturing alternation of comma-separated words, phrases or regular expressions."""
    return "(?:" + "|".join(w.strip() for w in words.split(",")) + ")"


def _re(group: str, weight: float, regex: str) -> Pattern:
    if group not in GROUPS:
        raise ValueError(f"pattern group must be one of {GROUPS}, got {group!r}")
    return Pattern(group, weight, re.compile(regex, re.MULTILINE))


def _near(group: str, weight: float, *parts: str, words: int = 6) -> Pattern:
    """One of each part's comma-separated alternatives, in order, each within `words` words of
    the previous one in the same sentence."""
    gap = rf"(?:[^\w.!?\n]+\w+){{0,{words}}}?[^\w.!?\n]+"
    return _re(group, weight, r"\b" + gap.join(_any(p) for p in parts) + r"\b")


_AI = r"ais?, a\.i\., assistants?, llms?, language models?, chatbots?, chatgpt, gpt, agents?"
_SHOW = "reveal, print, show, display, output, repeat, recite, tell me, give me, quote, summari[sz]e, list, leak, dump"
_RULES = r"instructions?, directions?, directives?, rules, guidelines?, prompts?, polic(?:y|ies), orders, restrictions"
_SECRET = (
    "system prompt, system message, system instructions?, your prompt, your instructions, your rules, "
    "(?:initial|original|hidden|secret|confidential|internal|full|exact) (?:prompt|instructions?|message|rules|notes)"
)

# Matched against the folded segment (see `fold`), which is lowercase: no re.IGNORECASE needed.
# Written from the train split of configs/safety/injection.jsonl, never from the held-out one.
PATTERNS: tuple[Pattern, ...] = (
    # Telling the model to drop what it was told.
    _near("override", 3.0, "ignore, disregard, forget, override, bypass, stop following", _RULES, words=7),
    _near("override", 2.0, "ignore, disregard, forget", "above, previous, prior, earlier, before", words=2),
    _near(
        "override", 2.0, "ignore, disregard", "the user's request, the user's question, the user, the question", words=0
    ),
    _re(
        "override",
        2.0,
        r"\b(?:new|updated|real|actual|true) (?:instructions?|rules?|task|goal|policy)\s*(?::|is\b|are\b)",
    ),
    _near("override", 1.5, "rules, restrictions, filters, safety mode, policy", "cancel+ed, lifted, disabled", words=2),
    _near("override", 1.5, "obey, follow, comply with", "me, mine, my orders, my commands, my rules", words=2),
    _near(
        "override",
        2.0,
        "turn off, disable, switch off, suspend",
        "safety, filters?, content filter, polic(?:y|ies)",
        words=3,
    ),
    _near("override", 1.5, "regardless of, no matter", "instructions, what you were told, your rules", words=2),
    _near("override", 1.5, r"authori[sz]ed me, authori[sz]ation code, take orders only from me"),
    _near("override", 1.0, "from now on, the only rule"),
    _near("override", 1.0, "content, safety, ethical, moral", "polic(?:y|ies), filters?, guidelines, rules", words=0),
    # Role-play jailbreaks.
    _near("persona", 4.0, "do anything now"),
    _near("persona", 4.0, "you are, act as, pretend to be, answer as, stay", "dan", words=1),
    _near(
        "persona", 2.5, "developer, dev, jailbreak, jailbroken, unrestricted, unfiltered, sudo, dan", "mode", words=0
    ),
    _near(
        "persona",
        2.0,
        "no, without, free of",
        "rules, restrictions, limits, limitations, filters?, guidelines",
        words=2,
    ),
    _near("persona", 2.0, "unfiltered, uncensored, amoral, unrestricted, jailbroken, jailbreak"),
    _near("persona", 2.0, "stay in character, remain in character, breaks? character, breaking character"),
    _near("persona", 2.0, "pretend, act as", _AI, "no, without, never"),
    _near("persona", 3.0, "you are no longer", f"{_AI}, bound, restricted", words=1),
    _near("persona", 2.0, "never refuses?, never says? no, never says? it can't"),
    _near("persona", 1.5, "alter ego, evil twin, answer twice, break the rules"),
    # System prompt extraction (LLM07).
    _near("extraction", 3.5, _SHOW, _SECRET),
    _near("extraction", 3.0, "what is your, what are your, what were your", f"instructions, {_SECRET}", words=0),
    _re("extraction", 2.0, r"\bstarting with ['\"]?you are\b|\beverything (?:above|before this)\b|\bcontext window\b"),
    _near("extraction", 1.0, "verbatim, word for word, in full"),
    # Turn and role markers of chat templates, where a user's text has no business having them.
    _re("role_tags", 3.0, r"<\|[a-z_]+\|>|\[/?inst\]|<</?sys>>"),
    _re("role_tags", 2.5, r"</?(?:system|user|assistant|developer)>"),
    _re("role_tags", 2.5, r"^\s*(?:#{2,}\s*)?(?:system|developer|assistant|admin)(?: message| prompt| override)?\s*:"),
    _near("role_tags", 2.5, "end of input, end of user input, system override, admin override"),
    _re("role_tags", 1.5, r"^\s*(?:human|ai|user)\s*:"),
    # Sending data out of the conversation.
    _near(
        "exfiltration",
        1.5,
        "send, forward, email, mail, post, upload, transmit, exfiltrate, append, encode",
        r"to, in, into, at",
        r"https?://, www\.\w+, [\w.+-]+@[\w-]+\.\w+",
        words=8,
    ),
    _near(
        "exfiltration", 2.0, "send, forward, share, dm, leak, exfiltrate, encode, include, collect", "the user's, their"
    ),
    _re("exfiltration", 3.0, r"!\[[^\]\n]*\]\(https?://[^)\s]*[?&][^)\s]*="),
    _near(
        "exfiltration", 1.5, "do not, don't, never, without", "tell, inform, mention, notify", "the user, them, anyone"
    ),
    _near("exfiltration", 1.5, "silently, quietly, secretly"),
    _near("exfiltration", 1.0, "api keys?, passwords?, credentials, credit card numbers?, inbox, chat history"),
    # Text that speaks to whatever AI reads it: the mark of an indirect injection.
    _near(
        "addressed",
        3.0,
        r"note, message, instructions?, directive, p\.s\., attention, important instruction",
        "for, to",
        _AI,
        words=2,
    ),
    _near(
        "addressed",
        3.0,
        "if, when, whenever",
        _AI,
        r"read\w*, process\w*, summari[sz]\w*, pars\w*, asked, sees?",
        words=3,
    ),
    _near("addressed", 2.5, _AI, "reading, processing, summari[sz]ing, parsing, browsing, ingesting", words=1),
    _re("addressed", 2.5, rf"(?:^|[\[(*>\-.!?:;]\s*)(?:dear |hey |@)?(?:\w+ )?{_any(_AI)}\s*[:,]\s"),
    _near(
        "addressed",
        2.0,
        f"the {_any(_AI)}, you the {_any(_AI)}",
        "must, shall, has been, is instructed, will now",
        words=2,
    ),
    _near("addressed", 1.5, f"as the {_any(_AI)}, {_any(_AI)} instructions, {_any(_AI)} directive"),
    # Instructions in a disguise.
    _near("obfuscation", 2.0, "decode, decrypt, deobfuscate, reverse", "follow, obey, execute, do what", words=8),
    # Text about injection rather than an injection: security articles, questions about defences.
    _near("discussion", -1.0, r"prompt injections?, owasp, llm0\d"),
    _near(
        "discussion", -1.0, r"attacks?, attackers?, adversarial, researchers?, red team, mitigations?, vulnerabilit\w+"
    ),
    _near(
        "discussion", -1.0, "protect, defend, secure, prevent, detect, flags?, classifier, false positives?, untrusted"
    ),
    _near("discussion", -1.0, "chat template, apply_chat_template, tokenizer, chatml, format wraps"),
)
"""The heuristic's whole knowledge: each pattern adds its weight to its group once per segment."""

ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
_FOLD = str.maketrans(
    {
        **dict.fromkeys(ZERO_WIDTH),
        # Cyrillic and Greek letters that look like Latin ones.
        **dict(zip("аеорсухіјѕԁһӏαεινορτυκ", "aeopcyxijsdhlaeivoptuk")),
    }
)
_LEET = str.maketrans(dict(zip("0134579", "oieastg")))
_LEET_WORD = re.compile(r"[a-z][0134579]|\b[0134579]+[a-z]")
_LETTER_SPACED = re.compile(r"(?:\b[a-z][ .\-_*]){5,}[a-z]\b")
_LETTER_GAP = re.compile(r"(?<=\b[a-z])[ .\-_*](?=[a-z]\b)")
_BASE64 = re.compile(r"[A-Za-z0-9+/]{20,}={0,2}")
_MIXED_SCRIPT = re.compile(r"[a-z][\u0370-\u04ff]|[\u0370-\u04ff][a-z]")


def fold(text: str) -> str:
    """Lowercase, without zero-width characters, with look-alike Cyrillic and Greek letters (and
    fullwidth forms) mapped to Latin ones: what `PATTERNS` are matched on and what is embedded
    (the embedder lowercases anyway)."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKC", text).lower().translate(_FOLD)


def _decoded_base64(text: str) -> list[str]:
    """The text of each base64 run in `text` that decodes to printable ASCII."""
    out = []
    for run in _BASE64.findall(text):
        try:
            decoded = base64.b64decode(run + "=" * (-len(run) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        if decoded.isascii() and decoded.decode().isprintable():
            out.append(decoded.decode())
    return out


def pattern_hits(text: str) -> dict[str, float]:
    """Summed weight of the `PATTERNS` of each group that `text` matches after `fold`, also read
    with leetspeak digits as letters (`1gn0r3`), letter-spaced words rejoined (`i g n o r e`) and
    base64 payloads decoded; each disguise found adds to the obfuscation group."""
    folded = fold(text)
    hits = dict.fromkeys(GROUPS, 0.0)
    searched = [folded]
    if not text.isascii() and (any(c in text for c in ZERO_WIDTH) or _MIXED_SCRIPT.search(text.lower())):
        hits["obfuscation"] += 1.5
    if _LEET_WORD.search(folded):
        searched.append(folded.translate(_LEET))
    if _LETTER_SPACED.search(folded):
        hits["obfuscation"] += 1.0
        searched.append(_LETTER_GAP.sub("", folded))
    payloads = _decoded_base64(text)
    if payloads:
        hits["obfuscation"] += 1.0
        searched += [fold(p) for p in payloads]
    haystack = "\n".join(searched)
    for p in PATTERNS:
        if p.regex.search(haystack):
            hits[p.group] += p.weight
    return hits


def features(text: str) -> dict[str, float]:
    """`FEATURES` of a segment, each in [0, 1]: each group's `pattern_hits` scaled by `GROUP_CAP`
    (the discussion group's by its magnitude), and the heuristic score."""
    hits = pattern_hits(text)
    out = {g: min(1.0, abs(hits[g]) / GROUP_CAP) for g in GROUPS}
    out["heuristic"] = 1.0 / (1.0 + math.exp(-(HEURISTIC_BIAS + sum(hits.values()))))
    return out


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
