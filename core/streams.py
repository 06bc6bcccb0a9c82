"""A stream's life, observed once: one outcome vocabulary and one driver that every observer reads.

A token stream passes through places that each want to know how it went: a tier's metrics
(time to first token, gaps, duration by outcome), its generation span (the first-token event, a
span per token, the end status) and the ingress's metrics (requests by outcome, the SLO, cost).
Each used to wrap the stream in an async generator of its own, time it with its own clock and
name the ending in its own words. `observed` wraps it once: it takes the time of the start and
of each item, measures the time to the first item once, decides the `Outcome` once, and hands
all of it to the observers, which only record.

An observer never changes the stream, and one that raises is logged and dropped for the rest
of that stream: watching a request must not fail it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Generic, TypeVar

from tierserve.core.errors import TierServeError

logger = logging.getLogger("tierserve")

T = TypeVar("T")


class Outcome(str, enum.Enum):
    """How a stream ended; the value is the metrics label and the span attribute."""

    FINISHED = "finished"
    """It ran to its end."""
    REJECTED = "rejected"
    """A user error ended it (a 4xx: bad input, content blocked)."""
    FAILED = "failed"
    """Anything else ended it: an engine, replica or timeout failure (5xx), or a bug."""
    CANCELLED = "cancelled"
    """Its consumer left first: the client disconnected, or the caller closed the stream."""


def outcome_of(exc: BaseException) -> Outcome:
    """The outcome of a stream that ended by raising `exc`."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return Outcome.CANCELLED
    if isinstance(exc, TierServeError):
        return Outcome.REJECTED if exc.status_code < 500 else Outcome.FAILED
    return Outcome.FAILED


class StreamObserver(Generic[T]):
    """What an observer of a stream is told; each hook does nothing unless overridden. Times are
    `time.perf_counter()` seconds, from the same clock as `observed`'s start."""

    __slots__ = ()

    def first(self, ttft_s: float) -> None:
        """The first item arrived `ttft_s` after the stream's start (called before `item`)."""

    def item(self, item: T, now: float) -> None:
        """An item arrived at `now`, before it is passed on."""

    def end(self, outcome: Outcome, error: BaseException | None, elapsed_s: float) -> None:
        """The stream ended `elapsed_s` after its start: how, and the exception that ended it
        (None when it finished or its consumer left)."""


async def observed(
    stream: AsyncIterator[T],
    observers: Sequence[StreamObserver[T]],
    *,
    started: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> AsyncIterator[T]:
    """`stream`, passed through unchanged, with its life reported to `observers`. Its start is
    `started` (a `clock()` reading taken where the request began), else the first `anext`.
    Closed early, it closes `stream` too."""
    start = clock() if started is None else started
    watching = list(observers)
    outcome, error = Outcome.CANCELLED, None
    first = True
    try:
        async for item in stream:
            now = clock()
            if first:
                first = False
                watching = _notify(watching, "first", now - start)
            for observer in watching:  # inline, not `_notify`: this runs once per token
                try:
                    observer.item(item, now)
                except Exception:
                    watching = _without(watching, observer, "item")
            yield item
        outcome = Outcome.FINISHED
    except BaseException as exc:
        outcome, error = outcome_of(exc), exc
        raise
    finally:
        _notify(watching, "end", outcome, error if outcome is not Outcome.CANCELLED else None, clock() - start)
        close = getattr(stream, "aclose", None)
        if close is not None:  # left early: `stream` ends now, not when collected
            await close()


def _notify(observers: list[StreamObserver], hook: str, *args: object) -> list[StreamObserver]:
    """Call `hook` on each observer; the observers still watching afterwards."""
    for observer in observers:  # rebinding `observers` below leaves this loop on the old list
        try:
            getattr(observer, hook)(*args)
        except Exception:
            observers = _without(observers, observer, hook)
    return observers


def _without(observers: list[StreamObserver], failed: StreamObserver, hook: str) -> list[StreamObserver]:
    """`observers` less `failed`, which raised in `hook` (logged, with the exception being handled)."""
    logger.exception("stream observer %s failed in %s; not observing this stream further", failed, hook)
    return [o for o in observers if o is not failed]
