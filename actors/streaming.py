"""Batching of a token stream before it crosses a Ray boundary.

Every message through a streaming DeploymentHandle costs a Ray object, which is more than a
decode step of a small model. So the tier sends the first chunk the moment it exists (time to
first token is what users feel) and afterwards sends whatever piled up while the previous send
was in flight, optionally waiting until `min_interval_s` has passed since the last send.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TypeVar

from tierserve.actors.types import TokenChunk

T = TypeVar("T")


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
        if c.logprobs is not None:
            prev.logprobs = (prev.logprobs or []) + c.logprobs
    out = list(merged.values())
    if out:
        out[-1].usage = usage
    return out
