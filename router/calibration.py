"""Thresholds on a complexity score for a stated traffic share, and what a threshold buys.

`calibrate_thresholds` places each tier's threshold so that a sample of traffic splits in the
shares the tiers were sized for; `routing_curve` shows, on labelled prompts, how many hard prompts a
threshold sends to the strong tier against how many easy ones it sends there for nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def calibrate_thresholds(scores: list[float], shares: list[float]) -> list[float]:
    """Per tier, weakest first, the lowest score that selects it, so that on `scores` (a sample of
    traffic) tier i gets `shares[i]` of the requests, as nearly as ties allow. The first threshold
    is 0.0; a tier whose share is zero at the top gets +inf (never chosen)."""
    if not shares:
        raise ValueError("shares must name at least one tier")
    if any(not math.isfinite(s) or s < 0 for s in shares):
        raise ValueError(f"shares must be finite and non-negative, got {shares}")
    if not math.isclose(sum(shares), 1.0, abs_tol=1e-6):
        raise ValueError(f"shares must sum to 1, got {sum(shares):g}")
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    if ordered.size == 0:
        raise ValueError("scores must not be empty")
    if not np.isfinite(ordered).all():
        raise ValueError("scores must be finite")
    n = ordered.size
    thresholds = [0.0]
    for cumulative in np.cumsum(shares)[:-1]:
        below = round(float(cumulative) * n)  # scores that should stay on the weaker tiers
        if below <= 0:
            thresholds.append(float(ordered[0]))
        elif below >= n:
            thresholds.append(math.inf)
        else:
            # Halfway between the last score kept below and the first sent above.
            thresholds.append(float(ordered[below - 1] + ordered[below]) / 2)
    return thresholds


@dataclass(frozen=True, slots=True)
class CurvePoint:
    threshold: float
    share_strong: float
    """Share of all prompts sent to the strong tier (score >= threshold)."""
    hard_recall: float
    """Share of hard prompts that reached the strong tier."""
    easy_to_strong: float
    """Share of easy prompts sent to the strong tier for nothing."""


def routing_curve(scores: list[float], hard: list[bool], thresholds: list[float]) -> list[CurvePoint]:
    """What each threshold does between a weak and a strong tier on labelled prompts."""
    s = np.asarray(scores, dtype=np.float64)
    h = np.asarray(hard, dtype=bool)
    if s.shape != h.shape or s.ndim != 1:
        raise ValueError(f"{s.size} scores but {h.size} labels")
    if h.all() or not h.any():
        raise ValueError("routing_curve needs at least one hard and one easy prompt")
    points = []
    for t in thresholds:
        strong = s >= t
        points.append(
            CurvePoint(
                threshold=float(t),
                share_strong=float(strong.mean()),
                hard_recall=float(strong[h].mean()),
                easy_to_strong=float(strong[~h].mean()),
            )
        )
    return points
