"""The guard chain: every configured guard's findings on a text, and one verdict from them.

All guards look at the same, original text, so their findings share coordinates. Then:

- a finding from a guard whose action at this stage is `block` blocks the text;
- otherwise findings from guards whose action is `redact` are replaced, each by its own guard's
  operator (overlapping findings merge into one covering them all, named by the best score:
  `merge_overlaps`);
- findings from guards whose action is `allow` are only reported.

Guards run in config order; a block stops the chain early (what the later guards would have
found no longer matters). `StreamGuard` runs the chain on a streamed answer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tierserve.safety.config import InjectionGuardConfig, PiiGuardConfig, SafetyConfig
from tierserve.safety.guard import Guard
from tierserve.safety.types import Action, Finding, Stage, Verdict, merge_overlaps

logger = logging.getLogger("tierserve.safety")


@dataclass(slots=True, frozen=True)
class Flagged:
    """A finding with the action its guard takes at the stage it was found in."""

    finding: Finding
    action: Action


class GuardChain:
    def __init__(self, guards: Iterable[tuple[Guard, dict[Stage, Action]]]):
        """`guards`: each guard with its action per stage (a stage left out: not checked)."""
        self.guards = list(guards)
        self._by_name = {guard.name: guard for guard, _ in self.guards}

    def active(self, stage: Stage) -> bool:
        """Whether any guard checks this stage."""
        return any(stage in actions for _, actions in self.guards)

    def flagged(self, text: str, stage: Stage) -> list[Flagged]:
        """Every guard's findings on `text`, in the text's coordinates, stopping after a guard
        that blocks."""
        out: list[Flagged] = []
        for guard, actions in self.guards:
            action = actions.get(stage)
            if action is None:
                continue
            found = guard.detect(text, stage)
            out += [Flagged(f, action) for f in found]
            if found and action == "block":
                break
        return out

    def may_flag(self, text: str, stage: Stage) -> bool:
        """False only when no guard that checks `stage` can find anything in `text`: each says
        so with `may_find` (a guard without it always may)."""
        return any(
            stage in actions and getattr(guard, "may_find", lambda _: True)(text) for guard, actions in self.guards
        )

    def verdict(self, text: str, flagged: list[Flagged], stage: Stage) -> Verdict:
        """The chain's decision on `text` given its findings (see the module docstring)."""
        findings = [f.finding for f in flagged]
        blocking = [f.finding for f in flagged if f.action == "block"]
        if blocking:
            guard = self._by_name[blocking[0].guard]
            reason = guard.block_reason([f for f in blocking if f.guard == guard.name], stage)
            return Verdict("block", text, findings, reason)
        redacted = self.redact(text, [f.finding for f in flagged if f.action == "redact"])
        return Verdict("redact" if redacted != text else "allow", redacted, findings)

    def check(self, text: str, stage: Stage) -> Verdict:
        return self.verdict(text, self.flagged(text, stage), stage)

    def split(self, stage: Stage) -> tuple[GuardChain, GuardChain]:
        """(the guards that rewrite text at `stage`, those that only refuse or report it): the
        second's verdict (block or not) and the first's text make the whole chain's verdict,
        so the second can run while the rewritten text is already in use."""
        rewriting = [(g, a) for g, a in self.guards if a.get(stage) == "redact"]
        checking = [(g, a) for g, a in self.guards if a.get(stage) in ("block", "allow")]
        return GuardChain(rewriting), GuardChain(checking)

    def redact(self, text: str, findings: list[Finding]) -> str:
        """`text` with each finding replaced by its guard's operator (joined once: splicing each
        into the whole text would copy it once per finding)."""
        pieces, end = [], 0
        for finding in merge_overlaps(findings):
            segment = text[finding.start : finding.end]
            local = Finding(finding.guard, finding.entity, 0, len(segment), finding.score)
            pieces += [text[end : finding.start], self._by_name[finding.guard].redact(segment, [local])]
            end = finding.end
        return "".join(pieces) + text[end:]


def build_chain(config: SafetyConfig, cache_dir: Path | None = None) -> GuardChain:
    """The configured guards, built (Presidio's engine, the injection classifier) once."""
    guards: list[tuple[Guard, dict[Stage, Action]]] = []
    for guard_config in config.guards:
        if isinstance(guard_config, PiiGuardConfig):
            from tierserve.safety.pii import PiiGuard

            guards.append((PiiGuard(guard_config), dict(guard_config.actions)))
        elif isinstance(guard_config, InjectionGuardConfig):
            from tierserve.safety.injection import InjectionGuard

            guards.append((InjectionGuard(guard_config, cache_dir), dict(guard_config.actions)))
    names = [g.name for g, _ in guards]
    if len(set(names)) != len(names):
        raise ValueError(f"guard names must be unique: {', '.join(names)}")
    return GuardChain(guards)


# Guarding a streamed answer: redact what the guards find, even when it arrives split across
# token chunks, while holding back as little text as possible.
#
# Text is released up to the start of the shortest tail that could still grow into something a
# guard would flag (`entity_tail`): an unfinished word (an e-mail address, URL, IP address or key
# has no spaces in it) or an unfinished run of digits and separators (phone, card and social
# security numbers, IBANs have spaces and dashes in them), and, where a guard finds names and
# places (a PII guard with a NER model), a run of capitalised words: "Maria" is held until the
# next word shows whether "Keller" follows. Everything before that tail can no
# longer change its meaning, so it is checked, redacted and sent. A finding that straddles the
# release point holds the release back to its start. The guards also see up to `CONTEXT_CHARS` of
# text already sent, for context words ("SSN:", "card number") that raise a pattern's score.
#
# So a prose answer streams about one word behind the model, and a number is sent whole, or
# redacted, once it ends.

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

    def quiet(self, delta: str) -> bool:
        """Whether feeding `delta` (or finishing after it) runs no guard: nothing pending or in
        `delta` is anything a guard could find (`GuardChain.may_flag`)."""
        return self.blocked is None and not self.chain.may_flag(self.pending + delta, "output")

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
        # A finding that matters overlaps the pending text (the text before it was released at a
        # point nothing can straddle), so pending text no guard could find anything in needs no
        # analysis.
        flagged = []
        if self.chain.may_flag(self.pending, "output"):
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
