"""The injection guard's patterns: weighted regular expressions in groups, matched on a folded
copy of a segment, and the features and heuristic score made from their hits.

Groups: override, persona, extraction, role tags, exfiltration, text addressed to an AI,
obfuscation, and a negative group for text *about* injection. Folding lowercases the text, drops
zero-width characters and maps look-alike letters and digits, and base64 payloads are matched as
their decoded text. The heuristic scorer of `tierserve.safety.injection` is these features
alone; its classifier appends them to a segment's embedding.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import unicodedata
from dataclasses import dataclass

GROUPS = ("override", "persona", "extraction", "role_tags", "exfiltration", "addressed", "obfuscation", "discussion")
FEATURES = (*GROUPS, "heuristic")
"""Names and order of the feature columns the classifier appends to the embedding."""
FEATURES_VERSION = 1
"""Bumped whenever `PATTERNS`, the folding or the feature formulas change, so that a cached classifier is retrained."""

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
