"""Guarding a streamed answer: redact what the guards find, even when it arrives split across
token chunks, while holding back as little text as possible.

Text is released up to the start of the shortest tail that could still grow into something a
guard would flag (`entity_tail`): an unfinished word (an e-mail address, URL, IP address or key
has no spaces in it) or an unfinished run of digits and separators (phone, card and social
security numbers, IBANs have spaces and dashes in them), and, where a guard finds names and
places (a PII guard with a NER model), a run of capitalised words: "Maria" is held until the
next word shows whether "Keller" follows. Everything before that tail can no
longer change its meaning, so it is checked, redacted and sent. A finding that straddles the
release point holds the release back to its start. The guards also see up to `CONTEXT_CHARS` of
text already sent, for context words ("SSN:", "card number") that raise a pattern's score.

So a prose answer streams about one word behind the model, and a number is sent whole, or
redacted, once it ends.
"""

from __future__ import annotations

import re

from tierserve.safety.chain import Flagged, GuardChain
from tierserve.safety.types import Finding, Verdict

CONTEXT_CHARS = 100
MAX_HOLD_CHARS = 256
"""A tail longer than this is released anyway: no entity the guards find is longer."""

_WORD_TAIL = re.compile(r"\S+$")
_NAME_PARTICLES = "van|von|der|den|de|del|della|da|di|du|dos|le|la|bin|ibn|al|el|ben"
_NAME_TAIL = re.compile(rf"(?<![\w'’.-])(?:[A-Z][\w'’.-]*(?:\s+|$)(?:(?:{_NAME_PARTICLES})(?:\s+|$))*)+$")
"""A run of capitalised words (with the particles of names such as "Ludwig van Beethoven"; a
word's dots kept, for "Dr." and initials) at the end of the text, and the space after it: a name
the next token may continue."""
_NUMBER_TAIL = re.compile(r"(?:[+(]\s*)?\d[\d\s().\-/]*$")
_IBAN_TAIL = re.compile(r"\b[A-Z]{2}\d{2}[A-Z0-9 ]*$")


def entity_tail(text: str, cap: int = MAX_HOLD_CHARS, names: bool = False) -> int:
    """Length of the shortest suffix of `text` that might still be the start of an entity,
    at most `cap` (the longest entity the guards can find). `names`: a guard finds names and
    places, so a trailing run of capitalised words is held whole ("Maria" waits for "Keller")."""
    tail = 0
    window = text[-cap:]  # no tail is longer, and it bounds the work per call
    for pattern in (_WORD_TAIL, _NUMBER_TAIL, _IBAN_TAIL, *((_NAME_TAIL,) if names else ())):
        match = pattern.search(window)
        if match is not None:
            tail = max(tail, len(window) - match.start())
    return min(tail, cap)


def hold_cap(chain: GuardChain) -> int:
    """The most text worth holding back for the chain's output guards: the longest entity they
    can find, where every guard says (the PII guard does: 20 characters for cards and SSNs
    alone), else `MAX_HOLD_CHARS`."""
    limits = [getattr(guard, "max_entity_chars", None) for guard, actions in chain.guards if "output" in actions]
    if not limits or any(limit is None for limit in limits):
        return MAX_HOLD_CHARS
    return min(MAX_HOLD_CHARS, max(limits))


def holds_names(chain: GuardChain) -> bool:
    """Whether one of the chain's output guards finds names (a PII guard with a NER model)."""
    return any(getattr(guard, "finds_names", False) for guard, actions in chain.guards if "output" in actions)


class StreamGuard:
    """The output stage for one streamed choice: `feed` each text delta, send what it returns,
    and `finish` at the end. Once a blocking guard fires, `blocked` holds the verdict and
    nothing more is released."""

    def __init__(self, chain: GuardChain):
        self.chain = chain
        self.cap = hold_cap(chain)
        self.names = holds_names(chain)
        self.context = ""
        self.pending = ""
        self.findings: list[Finding] = []
        self.blocked: Verdict | None = None

    def feed(self, delta: str) -> str:
        if self.blocked is not None:
            return ""
        self.pending += delta
        return self._release(len(self.pending) - entity_tail(self.pending, self.cap, self.names))

    def finish(self) -> str:
        """The rest of the text, checked as a whole."""
        if self.blocked is not None:
            return ""
        return self._release(len(self.pending))

    def _release(self, limit: int) -> str:
        if limit <= 0:
            return ""
        text = self.context + self.pending
        offset = len(self.context)
        boundary = offset + limit
        flagged = [f for f in self.chain.flagged(text, "output") if f.finding.end > offset]
        straddling = True
        while straddling:  # never release part of a finding
            straddling = False
            for f in flagged:
                if f.finding.start < boundary < f.finding.end:
                    boundary, straddling = f.finding.start, True
        released = [f for f in flagged if f.finding.end <= boundary]
        if boundary <= offset:
            return ""
        piece = text[offset:boundary]
        local = [
            Flagged(
                Finding(
                    f.finding.guard,
                    f.finding.entity,
                    max(0, f.finding.start - offset),
                    f.finding.end - offset,
                    f.finding.score,
                ),
                f.action,
            )
            for f in released
        ]
        verdict = self.chain.verdict(piece, local, "output")
        self.findings += verdict.findings
        if verdict.blocked:
            self.blocked = verdict
            return ""
        self.context = (self.context + piece)[-CONTEXT_CHARS:]
        self.pending = text[boundary:]
        return verdict.text
