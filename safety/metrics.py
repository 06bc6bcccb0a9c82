"""The guards' Prometheus metrics (through Ray's metrics pipeline, recorded in the ingress):
findings per guard, entity type, stage and the action taken; texts blocked per stage; time spent
guarding per stage. Never the text that was found."""

from __future__ import annotations

from typing import Any

from tierserve.safety.types import Stage, Verdict


class SafetyMetrics:
    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        self.findings: Any = Counter(
            "tierserve_guard_findings",
            "What the guards found, by guard, entity type, stage and the action taken on the text.",
            tag_keys=("guard", "entity", "stage", "action"),
        )
        self.blocked: Any = Counter(
            "tierserve_guard_blocked",
            "Texts a guard refused: requests (input), dropped chunks (retrieved), ended answers (output).",
            tag_keys=("stage",),
        )
        self.duration: Any = Histogram(
            "tierserve_guard_seconds",
            "Time spent in the guard chain per request and stage (a stream: all its chunks).",
            boundaries=[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
            tag_keys=("stage",),
        )

    def count(self, stage: Stage, verdict: Verdict) -> None:
        for f in verdict.findings:
            self.findings.inc(1, {"guard": f.guard, "entity": f.entity, "stage": stage, "action": verdict.action})
        if verdict.blocked:
            self.blocked.inc(1, {"stage": stage})
