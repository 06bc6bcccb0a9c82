"""The Serve deployment of one model tier: a thin actor over `VLLMEngine`.

It knows nothing of HTTP, routing, retrieval or guards: a typed `GenerateRequest` in, batches
of `TokenChunk`s out (see `streaming.batch_stream` for why batches), plus its own info, counters
and health for the ingress and for Serve's health checks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from tierserve.actors.checkpoints import resolve_model
from tierserve.actors.config import TierConfig
from tierserve.actors.engine import VLLMEngine
from tierserve.actors.errors import ServiceUnavailable
from tierserve.actors.metrics import TierMetrics, sample_forever
from tierserve.actors.placement import (
    BIND_ENV,
    binding_spec,
    claim_cpu_binding,
    engine_placement_options,
    release_cpu_binding,
)
from tierserve.actors.speculation import ResolvedSpeculation, resolve_speculation, vllm_speculative_config
from tierserve.actors.streaming import batch_stream, coalesce
from tierserve.actors.tracing import traced_generation
from tierserve.actors.types import GenerateRequest, TierInfo, TierLoad, TierStats, TokenChunk
from tierserve.cluster.telemetry import TelemetryConfig, setup_telemetry, shutdown_telemetry

logger = logging.getLogger(__name__)

ENGINE_RESTARTS = 3
"""Engine deaths a replica recovers from by restarting its engine in place; after that many, its
health check fails and Serve replaces the whole replica."""
ENGINE_RESTART_TIMEOUT_S = 600.0
"""An in-place restart that takes longer fails the health check (Serve then replaces the replica)."""


def engine_options(config: TierConfig, speculation: ResolvedSpeculation | None) -> dict[str, Any]:
    """The tier's vLLM engine arguments: its engine block plus what placement and speculation add."""
    options = {**config.engine, **engine_placement_options(config)}
    if config.speculative is not None and speculation is not None:
        options["speculative_config"] = vllm_speculative_config(config.speculative, speculation)
    return options


@serve.deployment
class TierDeployment:
    """One replica of a tier: one vLLM engine."""

    def __init__(self, config: TierConfig, model_cache: str | None = None, telemetry: TelemetryConfig | None = None):
        self.config = config
        self.telemetry = telemetry or TelemetryConfig()
        setup_telemetry(self.telemetry, "tier", tier=config.name)
        # Resolved here, on the replica's node: an embedded model is prepared where it is served.
        cache = Path(model_cache) if model_cache else None
        model = resolve_model(config.model, cache, progress=False)
        speculation = resolve_speculation(config.speculative, cache) if config.speculative else None
        self._bound = False
        if config.accelerator == "cpu" and BIND_ENV not in os.environ:
            # The engine's worker processes inherit this; they bind their OpenMP threads to it.
            cores = claim_cpu_binding(config.tensor_parallel_size, config.deployment.num_cpus)
            os.environ[BIND_ENV] = binding_spec(cores)
            self._bound = True
            logger.info("tier %s: ranks bound to cores %s", config.name, os.environ[BIND_ENV])
        adaptive = config.speculative.adaptive if config.speculative else None
        self.engine = VLLMEngine(
            model, engine_options(config, speculation), speculation, config.max_completion_tokens, adaptive
        )
        self.engine.start()
        self.metrics = TierMetrics(config.name)
        self._sampler: asyncio.Task | None = None
        self._restart: asyncio.Task | None = None
        self._restart_began = 0.0
        self._restarts = 0

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[TokenChunk]]:
        """Stream the request's chunks in batches: the first at once, the rest as they pile up,
        merged per choice."""
        if self._sampler is None:  # the replica's event loop runs by now
            self._sampler = asyncio.get_running_loop().create_task(sample_forever(self.metrics, self.engine))
        chunks = traced_generation(
            self.metrics.observe(self.engine.generate(request)),
            request,
            self.config.name,
            self.config.model,
            token_every=self.telemetry.token_span_every(self.config.token_spans),
            speculating=self.engine.speculation is not None,
            decode=self.engine.token_text if self.telemetry.token_text else None,
        )
        async for batch in batch_stream(chunks, self.config.stream_interval_ms / 1000):
            yield coalesce(batch)

    async def info(self) -> TierInfo:
        return TierInfo(
            name=self.config.name,
            model=self.config.model,
            max_model_len=self.engine.max_model_len,
            tensor_parallel_size=self.config.tensor_parallel_size,
            max_completion_tokens=self.config.max_completion_tokens,
            speculation=self.engine.speculation.describe() if self.engine.speculation else None,
        )

    async def stats(self) -> TierStats:
        return self.engine.stats()

    async def load(self) -> TierLoad:
        """Queue and latency model, polled by the router a few times a second."""
        return self.engine.load()

    async def speculation_schedule(self) -> list[int]:
        """The batch-size → k lookup this replica's engine runs now (see `adaptive.py`)."""
        return await self.engine.speculation_schedule()

    async def ready(self) -> None:
        """Raise unless this replica's engine can serve now (the ingress's `/health` asks): a
        dead or restarting engine raises `ServiceUnavailable`, while Serve's `check_health`
        may still pass."""
        await self.engine.check_health()

    async def check_health(self) -> None:
        """Called by Serve every `health_check_period_s`; raising marks the replica unhealthy.

        A dead engine is restarted inside this replica (its start in a worker thread), up to
        `ENGINE_RESTARTS` times: a new replica would spend its first ~25 s on a process and
        imports before the same engine start (docs/reliability.md). While the engine restarts the
        replica reports healthy to Serve, but its requests and load polls refuse with
        `ServiceUnavailable`, so the router keeps traffic on the other tiers meanwhile. A restart
        that fails, or outlasts `ENGINE_RESTART_TIMEOUT_S`, fails the check, and so does a death
        past the limit: then Serve replaces the replica."""
        if self._restart is not None:
            if not self._restart.done():
                if time.monotonic() - self._restart_began <= ENGINE_RESTART_TIMEOUT_S:
                    return
                raise ServiceUnavailable(f"engine restart for tier {self.config.name} is taking too long")
            restart, self._restart = self._restart, None
            if restart.exception() is not None:
                raise ServiceUnavailable(f"engine restart for tier {self.config.name} failed: {restart.exception()}")
            logger.info("tier %s: engine restarted in %.1f s", self.config.name, time.monotonic() - self._restart_began)
        if self.engine.dead and self._restarts < ENGINE_RESTARTS:
            self._restarts += 1
            logger.warning("tier %s: engine died; restarting it in this replica", self.config.name)
            self._restart_began = time.monotonic()
            self._restart = asyncio.get_running_loop().create_task(self.engine.restart())
            return
        await self.engine.check_health()

    def __del__(self) -> None:
        self.engine.shutdown()
        shutdown_telemetry()
        if self._bound:
            release_cpu_binding()
