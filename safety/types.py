"""What guards say about a text: findings (what was found where) and a verdict (what to do).

A finding never carries the matched text, only its position, so findings can be logged,
counted, traced and returned without leaking what they found.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Literal

Stage = Literal["input", "retrieved", "output"]
"""Where in the pipeline a text is checked: the request's own text, a retrieved chunk before it
reaches the prompt, or the model's answer as it streams."""

Action = Literal["allow", "redact", "block"]
"""What happens to a text with findings: pass it on unchanged (the findings are still counted),
pass it on with the findings replaced, or refuse it (a request gets a 400, a retrieved chunk is
dropped, a streamed answer ends with an error event)."""


@dataclass(slots=True, frozen=True)
class Finding:
    """Something a guard found in a text: `text[start:end]`, never the text itself."""

    guard: str
    """Name of the guard that found it (`pii`, `injection`)."""
    entity: str
    """What it is: a Presidio entity type (`EMAIL_ADDRESS`, `CREDIT_CARD`, ...) or `PROMPT_INJECTION`."""
    start: int
    end: int
    score: float


@dataclass(slots=True)
class Verdict:
    """A guard's (or the chain's) decision on one text."""

    action: Action
    text: str
    """The text to pass on: the input for allow and block, the redacted text for redact."""
    findings: list[Finding] = field(default_factory=list)
    reason: str | None = None
    """Why a text was blocked, in words safe to show a client (no matched text)."""

    @property
    def blocked(self) -> bool:
        return self.action == "block"


def merge_overlaps(findings: list[Finding]) -> list[Finding]:
    """Non-overlapping findings, by start. Of findings that overlap, the one with the higher score
    (then the longer one) names the entity and its guard, and its span grows to cover the others,
    so nothing any of them found is left unredacted. The one rule for every guard and the chain.

    Findings are taken best first; those kept so far never overlap, so, sorted by start, they
    are sorted by end too, and the ones a new finding overlaps are found by bisection."""
    starts: list[int] = []
    kept: list[tuple[Finding, int]] = []  # with when each was kept: the earliest wins a tie
    for when, f in enumerate(sorted(findings, key=lambda f: (-f.score, -(f.end - f.start), f.start))):
        hi = bisect.bisect_left(starts, f.end)
        lo = hi
        while lo > 0 and kept[lo - 1][0].end > f.start:
            lo -= 1
        if lo < hi:
            winner = max(kept[lo:hi], key=lambda k: (k[0].score, k[0].end - k[0].start, -k[1]))[0]
            f = Finding(
                winner.guard,
                winner.entity,
                min(f.start, kept[lo][0].start),
                max(f.end, kept[hi - 1][0].end),
                winner.score,
            )
        starts[lo:hi] = [f.start]
        kept[lo:hi] = [(f, when)]
    return [f for f, _ in kept]
