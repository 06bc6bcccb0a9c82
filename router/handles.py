"""Calls through Serve deployment handles: a request's stream from a tier, and what a failed
call means for the caller.

The pipeline reaches the tiers and the retriever through handles. Ray wraps what the callee raised
(`unwrap_error` takes the wrappers off) and adds failures of its own: the replica died, or the
deployment's queue is full (`max_queued_requests`, Serve's back-pressure), or it has no replica.
`handle_error` is the one mapping from those to the user errors the caller answers with; the
tiers and the retriever differ only in the words, the `param` and the error codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import ray.exceptions
from opentelemetry import trace
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from tierserve.actors.types import GenerateRequest, TokenChunk
from tierserve.core.errors import Overloaded, ServiceUnavailable, TierServeError, unwrap_error
from tierserve.core.telemetry import inject


def handle_error(
    exc: BaseException,
    service: str,
    param: str,
    *,
    unavailable_code: str | None = None,
    full_queue: type[TierServeError] = Overloaded,
    retry_after_s: float | None = None,
) -> BaseException:
    """The error `exc` means: what the callee raised, if it was a user error; for a replica that
    died or a deployment with no replica, `ServiceUnavailable` (with `unavailable_code`); for a
    full queue, `full_queue` (a 429 `Overloaded` by default) with the retry Serve proposes, else
    `retry_after_s`. Anything else comes back unwrapped: a bug, which the caller lets become a
    500. `service` names the callee in the message ("tier 'small'", "the retriever")."""
    cause = unwrap_error(exc)
    if isinstance(cause, TierServeError):
        return cause
    if isinstance(cause, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return ServiceUnavailable(
            f"{service} is unavailable: its replica died", param, unavailable_code, retry_after_s=retry_after_s
        )
    if isinstance(cause, DeploymentUnavailableError):
        return ServiceUnavailable(
            f"{service} is unavailable: {cause}", param, unavailable_code, retry_after_s=retry_after_s
        )
    if isinstance(cause, BackPressureError):
        retry = getattr(cause, "retry_after_s", None) or retry_after_s
        code = unavailable_code if full_queue is ServiceUnavailable else None
        return full_queue(f"{service} is at capacity: its queue is full", param, code, retry_after_s=retry)
    return cause


def tier_error(exc: BaseException, tier: str) -> BaseException:
    """What a failed call to `tier` means (`handle_error`, for a tier)."""
    return handle_error(exc, f"tier {tier!r}", "model")


TIER_STREAM = {"stream": True, "_by_reference": False}
"""How a tier's chunks reach the ingress: a stream over Serve's gRPC transport between replicas
(`_by_reference=False`), not one Ray object per message. A handle's default follows Serve's
`RAY_SERVE_USE_GRPC_BY_DEFAULT` as the process that built it saw it: `tierserve serve` builds the
application in its driver, where that differs from the replicas' `ray.env`, so the default
would send every chunk as a Ray object there and over gRPC under `serve run`. Every Serve
replica runs the gRPC server this needs. Measured with `bench/serving.py` (2026-12-07): 1188 us
of gateway CPU per output token with tier streams as Ray objects, 749 us over gRPC (the model
replica's part 321 and 177 us)."""


class TierHandles:
    """The tiers' deployment handles, and how a request streams from one of them."""

    def __init__(self, handles: dict[str, DeploymentHandle]):
        self.handles = handles

    async def stream(self, tier: str, request: GenerateRequest, span: trace.Span) -> AsyncIterator[list[TokenChunk]]:
        """The tier's batches of token chunks; leaving early cancels the tier's stream (and so
        the engine request). The tier's spans join `span`'s trace."""
        request.trace_context = inject(trace.set_span_in_context(span))
        responses = self.handles[tier].options(**TIER_STREAM).generate.remote(request)
        finished = False
        try:
            async for batch in responses:
                yield batch
            finished = True
        except Exception as exc:
            raise tier_error(exc, tier) from None
        finally:
            if not finished:
                responses.cancel()
