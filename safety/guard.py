"""The one interface every guard implements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from tierserve.safety.types import Action, Finding, Stage, Verdict


class Guard(Protocol):
    """A detector plus what to do about its findings at each stage.

    `detect` finds; `redact` replaces findings in a text; `check` is both, with the action the
    guard's config sets for the stage (`allow` when the stage is not configured). Guards are
    plain objects, safe to call from several threads, cheap enough to run in the ingress."""

    name: str

    def detect(self, text: str, stage: Stage) -> list[Finding]: ...

    def redact(self, text: str, findings: list[Finding]) -> str: ...

    def check(self, text: str, stage: Stage) -> Verdict: ...

    def block_reason(self, findings: list[Finding], stage: Stage) -> str:
        """Why a text with these findings is refused, in words safe to show a client."""
        ...


def check_by_stage(guard: Guard, actions: Mapping[Stage, Action], text: str, stage: Stage) -> Verdict:
    """A guard's `check`: `detect`, then the stage's action from `actions`: allow (findings
    reported), redact, or block with the guard's reason. A stage not in `actions`: allow,
    unchecked."""
    action = actions.get(stage)
    if action is None:
        return Verdict("allow", text)
    findings = guard.detect(text, stage)
    if not findings or action == "allow":
        return Verdict("allow", text, findings)
    if action == "redact":
        return Verdict("redact", guard.redact(text, findings), findings)
    return Verdict("block", text, findings, guard.block_reason(findings, stage))
