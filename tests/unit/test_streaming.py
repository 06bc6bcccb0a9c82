"""batch_stream: first item at once, later items batched, errors and cancellation propagate."""

import asyncio
import time

import pytest

from tierserve.actors.deployment import batch_stream, coalesce
from tierserve.actors.types import TokenChunk, TokenLogprob, Usage
from tierserve.core.types import ToolCall


async def ticker(n: int, gap: float, log: list[str] | None = None, fail_after: int | None = None):
    try:
        for i in range(n):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("engine broke")
            yield i
            await asyncio.sleep(gap)
    finally:
        if log is not None:
            log.append("source closed")


async def test_first_item_alone_then_everything_that_piled_up():
    batches = []
    async for batch in batch_stream(ticker(6, 0.0)):
        batches.append(batch)
        await asyncio.sleep(0.05)  # a slow consumer lets items pile up
    assert batches[0] == [0]
    assert [i for b in batches for i in b] == list(range(6))
    assert len(batches) < 6


async def test_fast_consumer_gets_items_one_by_one():
    batches = [b async for b in batch_stream(ticker(4, 0.02))]
    assert batches == [[0], [1], [2], [3]]


async def test_min_interval_spaces_sends():
    stamps = []
    async for batch in batch_stream(ticker(10, 0.005), min_interval_s=0.04):
        stamps.append((time.monotonic(), batch))
    assert stamps[0][1] == [0]
    gaps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    assert all(g >= 0.035 for g in gaps)
    assert [i for _, b in stamps for i in b] == list(range(10))


async def test_error_arrives_after_the_items_before_it():
    seen = []
    with pytest.raises(RuntimeError, match="engine broke"):
        async for batch in batch_stream(ticker(5, 0.0, fail_after=3)):
            seen.extend(batch)
    assert seen == [0, 1, 2]


async def test_closing_early_closes_the_source():
    log: list[str] = []
    stream = batch_stream(ticker(1000, 0.001, log))
    async for batch in stream:
        if batch[-1] >= 3:
            break
    await stream.aclose()
    assert log == ["source closed"]


async def test_cancelling_the_consumer_closes_the_source():
    log: list[str] = []

    async def consume():
        async for _ in batch_stream(ticker(1000, 0.01, log)):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["source closed"]


def test_coalesce_merges_per_choice_and_keeps_usage_last():
    batch = [
        TokenChunk(0, "a", [1], 1, logprobs=[TokenLogprob("a", 1, -0.1)]),
        TokenChunk(1, "x", [7], 1),
        TokenChunk(1, "y", [8], 2, finish_reason="stop", stop_reason="."),
        TokenChunk(0, "b", [2], 2, finish_reason="length", logprobs=[TokenLogprob("b", 2, -0.2)], usage=Usage(3, 4)),
    ]
    merged = coalesce(batch)
    assert [(c.index, c.text, c.token_ids, c.step, c.finish_reason) for c in merged] == [
        (0, "ab", [1, 2], 2, "length"),
        (1, "xy", [7, 8], 2, "stop"),
    ]
    assert [t.token for t in merged[0].logprobs] == ["a", "b"] and merged[1].logprobs is None
    assert merged[1].stop_reason == "." and merged[-1].usage == Usage(3, 4) and merged[0].usage is None
    assert batch[0].text == "a"  # inputs are not modified
    assert coalesce([]) == []
    # A choice's calls ride on its last chunk, and stay on the merged one.
    calls = [ToolCall("c1", "f", "{}")]
    merged = coalesce(
        [TokenChunk(0, "", [1], 1), TokenChunk(0, "", [2], 2, finish_reason="tool_calls", tool_calls=calls)]
    )
    assert merged[0].tool_calls == calls and merged[0].finish_reason == "tool_calls"
