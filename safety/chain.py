"""The guard chain: every configured guard's findings on a text, and one verdict from them.

All guards look at the same, original text, so their findings share coordinates. Then:

- a finding from a guard whose action at this stage is `block` blocks the text;
- otherwise findings from guards whose action is `redact` are replaced, each by its own guard's
  operator (overlapping findings merge into one covering them all, named by the best score:
  `merge_overlaps`);
- findings from guards whose action is `allow` are only reported.

Guards run in config order; a block stops the chain early (what the later guards would have
found no longer matters).
"""

from __future__ import annotations

import logging
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
