"""The Serve deployment of one model tier: a thin actor over `VLLMEngine`.

It knows nothing of HTTP, routing, retrieval or guards: a typed `GenerateRequest` in, batches
of `TokenChunk`s out (see `batch_stream` below for why batches), plus its own info, counters
and health for the ingress and for Serve's health checks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from ray import serve

from tierserve.actors.checkpoints import resolve_model
from tierserve.actors.config import TierConfig
from tierserve.actors.engine import VLLMEngine
from tierserve.actors.metrics import TierMetrics, sample_forever
from tierserve.actors.placement import (
    BIND_ENV,
    binding_spec,
    claim_cpu_binding,
    engine_placement_options,
    release_cpu_binding,
)
from tierserve.actors.restarts import EngineRestarts
from tierserve.actors.speculation import ResolvedSpeculation, resolve_speculation, vllm_speculative_config
from tierserve.actors.tracing import generation_span
from tierserve.actors.types import GenerateRequest, TierInfo, TierLoad, TierStats, TokenChunk
from tierserve.core.errors import ServiceUnavailable
from tierserve.core.streams import StreamObserver, observed
from tierserve.core.telemetry import TelemetryConfig, setup_telemetry, shutdown_telemetry

logger = logging.getLogger(__name__)

T = TypeVar("T")


# Batching of a token stream before it crosses a Ray boundary.
#
# Every message through a streaming DeploymentHandle costs both ends Ray's and gRPC's code
# (the ingress reads tiers over Serve's gRPC transport, `tierserve.router.handles.TIER_STREAM`),
# which is more than a decode step of a small model. So the tier sends the first chunk the
# moment it exists (time to first token is what users feel) and afterwards sends whatever piled
# up while the previous send was in flight, optionally waiting until `min_interval_s` has passed
# since the last send.


class _End:
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None):
        self.error = error


async def batch_stream(source: AsyncIterator[T], min_interval_s: float = 0.0) -> AsyncIterator[list[T]]:
    """Yield lists of items from `source`: the first item alone and at once, then all items
    that arrived since the previous list, at most once per `min_interval_s`.

    Closing or cancelling the returned generator cancels the pump reading `source` and waits
    for it, so `source`'s own cleanup (e.g. an engine abort) has run when this returns.
    """
    queue: asyncio.Queue[T | _End] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except Exception as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait(_End(exc))
        else:
            queue.put_nowait(_End(None))

    task = asyncio.create_task(pump())
    last_sent = 0.0
    try:
        while True:
            batch = [await queue.get()]
            if last_sent and min_interval_s:
                wait = last_sent + min_interval_s - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            while not queue.empty():
                batch.append(queue.get_nowait())
            end = batch[-1] if isinstance(batch[-1], _End) else None
            items = batch[:-1] if end else batch
            if items:
                yield items  # type: ignore[misc]
                last_sent = time.monotonic()
            if end is not None:
                if end.error is not None:
                    raise end.error
                return
    finally:
        if not task.done():
            task.cancel()
            # wait() neither raises the pump's CancelledError nor swallows our own.
            await asyncio.wait({task})


def coalesce(chunks: list[TokenChunk]) -> list[TokenChunk]:
    """Merge the chunks of a batch per choice, so each choice travels as one chunk.

    Choices keep the order in which they first appear; the request's usage, which rides on its
    last chunk, stays on the last chunk of the result.
    """
    merged: dict[int, TokenChunk] = {}
    usage = None
    for c in chunks:
        usage = c.usage or usage
        prev = merged.get(c.index)
        if prev is None:
            logprobs = None if c.logprobs is None else list(c.logprobs)
            merged[c.index] = replace(c, token_ids=list(c.token_ids), logprobs=logprobs, usage=None)
            continue
        prev.text += c.text
        prev.token_ids.extend(c.token_ids)
        prev.step, prev.finish_reason, prev.stop_reason = c.step, c.finish_reason, c.stop_reason
        prev.tool_calls = c.tool_calls or prev.tool_calls
        if c.logprobs is not None:
            prev.logprobs = (prev.logprobs or []) + c.logprobs
    out = list(merged.values())
    if out:
        out[-1].usage = usage
    return out


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
            model,
            engine_options(config, speculation),
            speculation,
            config.max_completion_tokens,
            adaptive,
            config.tools,
        )
        self.engine.start()
        self.metrics = TierMetrics(config.name)
        self._sampler: asyncio.Task | None = None
        self.restarts = EngineRestarts(config.name, config.engine_restarts, config.engine_restart_timeout_s)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[TokenChunk]]:
        """Stream the request's chunks in batches: the first at once, the rest as they pile up,
        merged per choice."""
        if self._sampler is None:  # the replica's event loop runs by now
            self._sampler = asyncio.get_running_loop().create_task(sample_forever(self.metrics, self.engine))
        observers: list[StreamObserver[TokenChunk]] = [self.metrics.request()]
        span = generation_span(
            request,
            self.config.name,
            self.config.model,
            token_every=self.telemetry.token_span_every(self.config.token_spans),
            speculating=self.engine.speculation is not None,
            decode=self.engine.token_text if self.telemetry.token_text else None,
        )
        if span is not None:
            observers.append(span)
        chunks = observed(self.engine.generate(request), observers)
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
            tool_parser=self.config.tools.parser if self.config.tools is not None else None,
        )

    async def stats(self) -> TierStats:
        return self.engine.stats()

    async def load(self) -> TierLoad:
        """Queue and latency model, polled by the router a few times a second."""
        return self.engine.load()

    async def speculation_schedule(self) -> list[int]:
        """The batch-size → k lookup this replica's engine runs now (see `adaptive.py`)."""
        return await self.engine.speculation_schedule()

    async def ready(self) -> str | None:
        """None if this replica's engine can serve now, else why not (the ingress's `/health`
        asks): a dead or restarting engine is not ready while Serve's `check_health` may still
        pass. Returned, not raised: Serve logs a traceback for every call that raises."""
        try:
            await self.engine.check_health()
        except ServiceUnavailable as exc:
            return str(exc)
        return None

    async def check_health(self) -> None:
        """Called by Serve every `health_check_period_s`; raising marks the replica unhealthy.
        A dead engine is restarted inside the replica (`EngineRestarts`), which passes this check
        meanwhile; its requests, load polls and `ready()` refuse until the new engine serves."""
        if self.restarts.under_way(self.engine):
            return
        await self.engine.check_health()

    def __del__(self) -> None:
        self.engine.shutdown()
        shutdown_telemetry()
        if self._bound:
            release_cpu_binding()
