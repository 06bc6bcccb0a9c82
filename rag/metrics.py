"""Retrieval's Prometheus metrics (through Ray's metrics pipeline, like the tiers' and the
ingress's): query latency by stage, hits per query, and the grounding score of answers."""

from __future__ import annotations

from typing import Any

from tierserve.core.telemetry import LATENCY_BUCKETS

SCORE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


class RetrieverMetrics:
    def __init__(self) -> None:
        from ray.util.metrics import Histogram

        self.latency: Any = Histogram(
            "tierserve_retrieval_seconds",
            "Retrieval time per query by stage: embed (the query) and search (the index).",
            boundaries=[0.001, 0.002, *LATENCY_BUCKETS],
            tag_keys=("index", "stage"),
        )
        self.hits: Any = Histogram(
            "tierserve_retrieval_hits",
            "Chunks returned per query (after the score threshold and filters).",
            boundaries=[0.5, 1.5, 2.5, 4.5, 8.5, 16.5],  # le="0.5" counts queries with no hit
            tag_keys=("index",),
        )

    def observe(self, index: str, embed_s: float, search_s: float, hits: int) -> None:
        self.latency.observe(embed_s, {"index": index, "stage": "embed"})
        self.latency.observe(search_s, {"index": index, "stage": "search"})
        self.hits.observe(hits, {"index": index})


class GroundingMetrics:
    """Recorded by the ingress, which sees the whole answer."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        self.score: Any = Histogram(
            "tierserve_grounding_score",
            "Share of an answer's sentences supported by the passages it cites (embedding similarity).",
            boundaries=SCORE_BUCKETS,
            tag_keys=("index", "tier"),
        )
        self.ungrounded: Any = Counter(
            "tierserve_ungrounded_answers",
            "Answers with retrieval whose grounding score is below 0.5, or that had no passage to stand on.",
            tag_keys=("index", "tier"),
        )
