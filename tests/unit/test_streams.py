"""`core.streams.observed`: one pass over a stream tells every observer its first-item time, its
items and one outcome; an observer that fails is dropped, never the stream."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tierserve.core.errors import InvalidRequest, ServiceUnavailable
from tierserve.core.streams import Outcome, StreamObserver, observed, outcome_of


class Clock:
    """Advances one second per reading, so every time below is exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class Recorder(StreamObserver[str]):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def first(self, ttft_s: float) -> None:
        self.calls.append(("first", ttft_s))

    def item(self, item: str, now: float) -> None:
        self.calls.append(("item", item, now))

    def end(self, outcome: Outcome, error: BaseException | None, elapsed_s: float) -> None:
        self.calls.append(("end", outcome, error, elapsed_s))


async def letters(*items: str, error: BaseException | None = None):
    for item in items:
        yield item
    if error is not None:
        raise error


def drain(stream) -> list:
    async def run():
        return [item async for item in stream]

    return asyncio.run(run())


def test_a_finished_stream_reports_first_items_and_end_once():
    clock, recorder = Clock(), Recorder()
    items = drain(observed(letters("a", "b"), [recorder], started=100.0, clock=clock))
    assert items == ["a", "b"]
    assert recorder.calls == [
        ("first", 1.0),  # measured once, from `started`
        ("item", "a", 101.0),
        ("item", "b", 102.0),
        ("end", Outcome.FINISHED, None, 3.0),
    ]


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (InvalidRequest("bad max_tokens", "max_tokens"), Outcome.REJECTED),
        (ServiceUnavailable("engine died"), Outcome.FAILED),
        (RuntimeError("bug"), Outcome.FAILED),
    ],
)
def test_a_raising_stream_ends_with_its_outcome_and_error_and_reraises(error, outcome):
    recorder = Recorder()
    with pytest.raises(type(error)):
        drain(observed(letters("a", error=error), [recorder], clock=Clock()))
    assert recorder.calls[-1][:3] == ("end", outcome, error)
    assert outcome_of(error) is outcome


def test_a_consumer_that_leaves_cancels_without_an_error():
    recorder = Recorder()

    async def run():
        stream = observed(letters("a", "b", "c"), [recorder], clock=Clock())
        assert await anext(stream) == "a"
        await stream.aclose()

    asyncio.run(run())
    assert recorder.calls[-1][:3] == ("end", Outcome.CANCELLED, None)
    assert [c[1] for c in recorder.calls if c[0] == "item"] == ["a"]
    assert outcome_of(asyncio.CancelledError()) is Outcome.CANCELLED


def test_a_consumer_that_leaves_closes_the_stream_underneath_at_once():
    """What is under an observed stream (a tier's stream, an engine request) ends when its
    consumer leaves, not when the garbage collector finds it."""
    closed = []

    async def source():
        try:
            for letter in "abc":
                yield letter
        finally:
            closed.append(True)

    async def run():
        inner = source()
        stream = observed(inner, [], clock=Clock())
        assert await anext(stream) == "a"
        await stream.aclose()
        assert closed == [True]
        del inner  # still referenced here until now: only the close can have ended it

    asyncio.run(run())


def test_a_stream_with_no_items_has_no_first():
    recorder = Recorder()
    assert drain(observed(letters(), [recorder], clock=Clock())) == []
    assert [c[0] for c in recorder.calls] == ["end"] and recorder.calls[0][1] is Outcome.FINISHED


def test_a_failing_observer_is_dropped_and_the_stream_goes_on(caplog):
    class Broken(StreamObserver[str]):
        def item(self, item: str, now: float) -> None:
            raise ValueError("observer bug")

        def end(self, outcome, error, elapsed_s) -> None:
            raise AssertionError("a dropped observer is not told the end")

    recorder = Recorder()
    with caplog.at_level(logging.ERROR, logger="tierserve"):
        items = drain(observed(letters("a", "b"), [Broken(), recorder], clock=Clock()))
    assert items == ["a", "b"]
    assert [c[0] for c in recorder.calls] == ["first", "item", "item", "end"]
    assert "stream observer" in caplog.text and "observer bug" in caplog.text
