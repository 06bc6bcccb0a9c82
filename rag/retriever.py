"""The retriever deployment: one embedder and every index of the store, shared by all tiers.

It answers `RetrievalQuery`s (embed the query, search the published version of the index) and
measures how well an answer is grounded in the passages it was given. Each index is loaded on
first use and swapped for the newer version within `reload_interval_s` of a publish
(`tierserve rag ingest` while the service runs), between two queries: a query is answered
wholly by one version. On start it builds the bundled handbook's index when the store lacks it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from opentelemetry import trace
from ray import serve

from tierserve.core.errors import InvalidRequest, TierServeError
from tierserve.core.telemetry import TelemetryConfig, extract, setup_telemetry, tracer
from tierserve.rag.config import RagConfig
from tierserve.rag.grounding import Grounding, grounding, sentences
from tierserve.rag.metrics import RetrieverMetrics
from tierserve.rag.snapshot import IndexMismatch, IndexNotFound, IndexSnapshot
from tierserve.rag.store import IndexStore
from tierserve.rag.types import Embedded, Hit, IndexUnavailable, InputTooLong, Retrieval, RetrievalQuery

logger = logging.getLogger("tierserve.rag")


class IndexConflict(TierServeError):
    """The index was built with another embedder than the retriever's (409)."""

    status_code = 409
    default_code = "index_embedder_mismatch"


def default_store(config: RagConfig, model_cache: str | Path | None) -> Path:
    """`rag.store`, else `<model cache>/indexes`."""
    if config.store:
        return Path(config.store).expanduser()
    from tierserve.core.config import default_cache_dir

    return (Path(model_cache) if model_cache else default_cache_dir()) / "indexes"


def build_bundled(config: RagConfig, store: IndexStore, embedder: Any, progress: bool = False) -> Any:
    """Ingest the shipped handbook into `config.bundled.index` (a no-op when it is up to date)."""
    from tierserve.rag.chunking import Chunker
    from tierserve.rag.ingest import bundled_corpus, ingest
    from tierserve.rag.loaders import load_documents

    assert config.bundled is not None
    chunker = Chunker(config.chunking, config.embedder.model)
    loaded = load_documents(bundled_corpus())
    return ingest(loaded, config.bundled.index, store, embedder, chunker, config.index, prune=True, progress=progress)


class _Loaded:
    """An index snapshot and when the store was last checked for a newer one."""

    def __init__(self, snapshot: IndexSnapshot):
        self.snapshot = snapshot
        self.checked = time.monotonic()


@serve.deployment
class Retriever:
    def __init__(self, config: RagConfig, model_cache: str | None = None, telemetry: TelemetryConfig | None = None):
        from tierserve.core.embedder import Embedder

        setup_telemetry(telemetry or TelemetryConfig(), "retriever")
        self.metrics = RetrieverMetrics()
        self.config = config
        self.store = IndexStore(default_store(config, model_cache))
        # One thread: the replica reserves a fraction of a CPU next to the engines' pinned cores.
        self.embedder = Embedder(
            config.embedder.model, config.embedder.device, config.embedder.batch_size, num_threads=1
        )
        if config.bundled is not None and config.bundled.build_on_start:
            report = build_bundled(config, self.store, self.embedder)
            logger.info("bundled corpus: %s", report.summary())
        self._loaded: dict[str, _Loaded] = {}
        self._loading: dict[str, asyncio.Lock] = {}

    async def _snapshot(self, name: str) -> IndexSnapshot:
        """The newest published version of `name` (checked at most every `reload_interval_s`)."""
        loaded = self._loaded.get(name)
        now = time.monotonic()
        if loaded is not None and now - loaded.checked < self.config.reload_interval_s:
            return loaded.snapshot
        lock = self._loading.setdefault(name, asyncio.Lock())
        async with lock:
            loaded = self._loaded.get(name)
            if loaded is not None and time.monotonic() - loaded.checked < self.config.reload_interval_s:
                return loaded.snapshot
            current = self.store.current(name)
            if current is None:
                raise IndexUnavailable.named(name)
            if loaded is not None and loaded.snapshot.version == current:
                loaded.checked = time.monotonic()
                return loaded.snapshot
            try:
                snapshot = await asyncio.to_thread(self.store.open, name, self.config.index.use_gpu)
                snapshot.manifest.check_embedder(self.embedder.signature, self.embedder.dimension)
            except IndexNotFound:
                raise IndexUnavailable.named(name) from None
            except IndexMismatch as exc:
                raise IndexConflict(str(exc), "retrieval.index") from None
            if loaded is not None:
                logger.info("index %s: %s -> %s", name, loaded.snapshot.version, snapshot.version)
                old = loaded.snapshot
                # Queries already searching the old version finish on it; close it after them.
                asyncio.get_running_loop().call_later(30, old.close)
            self._loaded[name] = _Loaded(snapshot)
            return snapshot

    async def retrieve(self, query: RetrievalQuery) -> Retrieval:
        """The query's top chunks from the newest version of its index."""
        with tracer().start_as_current_span(
            "tierserve.retriever.search",
            context=extract(query.trace_context),
            attributes={"gen_ai.data_source.id": query.index, "tierserve.retrieval.top_k": query.top_k},
        ) as span:
            snapshot = await self._snapshot(query.index)
            started = time.perf_counter()
            with tracer().start_as_current_span(
                f"embeddings {self.embedder.name}",
                attributes={"gen_ai.operation.name": "embeddings", "gen_ai.request.model": self.embedder.name},
            ):
                vector = await asyncio.to_thread(self.embedder.encode, [query.query])
            embedded = time.perf_counter()
            try:
                hits = await asyncio.to_thread(
                    snapshot.search, vector[0], query.top_k, query.score_threshold, query.filters
                )
            except ValueError as exc:  # a malformed filter
                raise TierServeError(str(exc), "retrieval.filters") from None
            searched = time.perf_counter()
            span.set_attribute("tierserve.retrieval.version", snapshot.version)
            span.set_attribute("tierserve.retrieval.hits", len(hits))
            self.metrics.observe(query.index, embedded - started, searched - embedded, len(hits))
            return Retrieval(
                query.index, snapshot.version, hits, 1e3 * (embedded - started), 1e3 * (searched - embedded)
            )

    async def embed(
        self, texts: list[str], dimensions: int | None = None, trace_context: dict[str, str] | None = None
    ) -> Embedded:
        """The texts' vectors (`POST /v1/embeddings`), in the caller's trace. A text longer than
        the embedder reads is refused (`InputTooLong`, naming `input.N`) rather than embedded
        truncated; `dimensions` other than the embedder's own is refused (its vectors are not
        trained to keep their meaning in a prefix)."""
        if dimensions is not None and dimensions != self.embedder.dimension:
            raise InvalidRequest(
                f"{self.embedder.name} gives {self.embedder.dimension}-dimensional vectors and cannot shorten "
                "them (it is not trained to keep meaning in a prefix); leave dimensions out",
                "dimensions",
            )
        with tracer().start_as_current_span(
            f"embeddings {self.embedder.name}",
            context=extract(trace_context or {}),
            attributes={
                "gen_ai.operation.name": "embeddings",
                "gen_ai.request.model": self.embedder.name,
                "tierserve.embeddings.inputs": len(texts),
            },
        ) as span:
            counts = await asyncio.to_thread(self.embedder.token_counts, texts)
            limit = self.embedder.max_tokens
            for i, count in enumerate(counts):
                if count > limit:
                    raise InputTooLong(
                        f"input {i} is {count} tokens long; {self.embedder.name} reads at most {limit} "
                        "(split the text)",
                        f"input.{i}" if len(texts) > 1 else "input",
                    )
            vectors = await self._encode_together(texts)
            span.set_attribute("gen_ai.usage.input_tokens", sum(counts))
            return Embedded(self.embedder.name, vectors, sum(counts))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _encode_together(self, calls: list[list[str]]) -> list[Any]:
        """The texts of embeddings calls that arrive together, encoded in one batch (the
        embedder pads a batch to its longest text and runs it at once)."""
        vectors = await asyncio.to_thread(self.embedder.encode, [text for texts in calls for text in texts])
        out, start = [], 0
        for texts in calls:
            out.append(vectors[start : start + len(texts)])
            start += len(texts)
        return out

    async def ground(self, answer: str, passages: list[Hit]) -> Grounding:
        """How much of `answer` the passages support (see `tierserve.rag.grounding`)."""
        judged = sentences(answer)
        texts = [hit.text for hit in passages]
        if judged and texts:
            vectors = await asyncio.to_thread(self.embedder.encode, judged + texts)
            sentence_vectors, passage_vectors = vectors[: len(judged)], vectors[len(judged) :]
        else:
            sentence_vectors = passage_vectors = self.embedder.encode([])
        result = grounding(answer, texts, sentence_vectors, passage_vectors, self.config.grounding_threshold)
        trace.get_current_span().set_attribute("tierserve.grounding.score", result.score or 0.0)
        return result

    async def indexes(self) -> list[dict[str, Any]]:
        """Every index of the store with its published version's manifest."""
        out = []
        for name in self.store.names():
            manifest = self.store.manifest(name)
            loaded = self._loaded.get(name)
            out.append({**manifest.__dict__, "served_version": loaded.snapshot.version if loaded is not None else None})
        return out

    async def check_health(self) -> None:
        return None
