"""The one interface every guard implements."""

from __future__ import annotations

from typing import Protocol

from tierserve.safety.types import Finding, Stage


class Guard(Protocol):
    """A detector and how it redacts what it finds.

    `detect` finds; `redact` replaces findings in a text; what to do with the findings at each
    stage is the chain's one decision (`tierserve.safety.chain.GuardChain`, built with each
    guard's configured actions). Guards are plain objects, safe to call from several threads,
    cheap enough to run in the ingress."""

    name: str

    def detect(self, text: str, stage: Stage) -> list[Finding]: ...

    def redact(self, text: str, findings: list[Finding]) -> str: ...

    def block_reason(self, findings: list[Finding], stage: Stage) -> str:
        """Why a text with these findings is refused, in words safe to show a client."""
        ...
