"""What guards say about a text: findings (what was found where) and a verdict (what to do).

A finding never carries the matched text, only its position, so findings can be logged,
counted, traced and returned without leaking what they found.
"""

from __future__ import annotations

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
