"""The Serve deployment of one model tier: a thin actor over `VLLMEngine`.

It knows nothing of HTTP, routing, retrieval or guards: a typed `GenerateRequest` in, batches
of `TokenChunk`s out (see `streaming.batch_stream` for why batches), plus its own info, counters
and health for the ingress and for Serve's health checks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve

from tierserve.actors.checkpoints import resolve_model
from tierserve.actors.config import TierConfig
from tierserve.actors.engine import VLLMEngine
from tierserve.actors.streaming import batch_stream, coalesce
from tierserve.actors.types import GenerateRequest, TierInfo, TierStats, TokenChunk


@serve.deployment
class TierDeployment:
    """One replica of a tier: one vLLM engine."""

    def __init__(self, config: TierConfig, model_cache: str | None = None):
        self.config = config
        # Resolved here, on the replica's node: an embedded model is prepared where it is served.
        model = resolve_model(config.model, Path(model_cache) if model_cache else None, progress=False)
        self.engine = VLLMEngine(model, config.engine)
        self.engine.start()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[TokenChunk]]:
        """Stream the request's chunks in batches: the first at once, the rest as they pile up,
        merged per choice."""
        async for batch in batch_stream(self.engine.generate(request), self.config.stream_interval_ms / 1000):
            yield coalesce(batch)

    async def info(self) -> TierInfo:
        return TierInfo(name=self.config.name, model=self.config.model, max_model_len=self.engine.max_model_len)

    async def stats(self) -> TierStats:
        return self.engine.stats()

    async def check_health(self) -> None:
        """Called by Serve every `health_check_period_s`; raising marks the replica unhealthy."""
        await self.engine.check_health()

    def __del__(self) -> None:
        self.engine.shutdown()
