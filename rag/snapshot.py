"""One published version of an index, read whole: its manifest, its FAISS index and vectors, its
chunk rows, and search over them (with metadata filters and score thresholds).

The directory layout and how versions are published are in `tierserve.rag.store`; a version is
immutable once published, so a snapshot keeps answering from it while newer ones appear.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierserve.rag.config import IndexConfig
from tierserve.rag.indexes import filter_sql, search_params, to_gpu
from tierserve.rag.types import FilterValue, Hit

FORMAT = 1
EXACT_FILTER_BELOW = 20_000
"""A metadata filter that leaves fewer chunks than this is searched exactly over those chunks'
vectors; above, the ANN index searches with an id selector (HNSW under a very selective filter
can miss allowed neighbours, exact search cannot)."""

CHUNKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    chunk_id TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    token_count INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE INDEX IF NOT EXISTS chunks_hash ON chunks(hash);
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    metadata TEXT NOT NULL,
    chunks INTEGER NOT NULL
);
"""
"""The tables of a version's `chunks.sqlite`: chunk rows and document rows."""


class StoreError(ValueError):
    """Base of the index store's errors."""


class IndexNotFound(StoreError):
    pass


class IndexMismatch(StoreError):
    """An index built with one embedder asked to take or answer vectors of another."""


@dataclass(frozen=True)
class Manifest:
    index: str
    version: str
    embedder: str
    embedder_signature: str
    dimension: int
    index_type: str
    chunks: int
    documents: int
    created: float
    chunking: dict[str, Any]
    index_config: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> Manifest:
        data = json.loads((path / "manifest.json").read_text())
        if data.get("format") != FORMAT:
            raise StoreError(f"{path}: manifest format {data.get('format')!r}, this tierserve reads {FORMAT}")
        data.pop("format")
        return cls(**data)

    def write(self, path: Path) -> None:
        (path / "manifest.json").write_text(json.dumps({"format": FORMAT, **self.__dict__}, indent=2, sort_keys=True))

    def check_embedder(self, signature: str, dimension: int) -> None:
        """Refuse vectors from any other embedder than the one the index was built with."""
        if signature != self.embedder_signature or dimension != self.dimension:
            raise IndexMismatch(
                f"index {self.index!r} was built with embedder {self.embedder_signature!r} "
                f"({self.dimension} dimensions), not {signature!r} ({dimension} dimensions); "
                f"re-ingest it with --rebuild to change embedders"
            )


class IndexSnapshot:
    """One published version, loaded for search. Thread-safe: FAISS searches in parallel, chunk
    rows are read under a lock."""

    def __init__(self, path: Path, use_gpu: bool | None = None):
        import faiss

        self.path = path
        self.manifest = Manifest.read(path)
        self.config = IndexConfig(**self.manifest.index_config)
        cpu_index = faiss.read_index(str(path / "index.faiss"))
        self.index, self.on_gpu = to_gpu(cpu_index, self.manifest.index_type, use_gpu)
        self.vectors = np.load(path / "vectors.npy", mmap_mode="r")
        self.ids = np.load(path / "ids.npy")
        self._db = sqlite3.connect(f"file:{path / 'chunks.sqlite'}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        return self.manifest.version

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def search(
        self,
        vector: np.ndarray,
        top_k: int,
        score_threshold: float | None = None,
        filters: dict[str, FilterValue] | None = None,
    ) -> list[Hit]:
        """The `top_k` chunks closest to `vector` (one unit row), best first."""
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self.manifest.dimension:
            raise IndexMismatch(
                f"query has {query.shape[1]} dimensions, index {self.manifest.index!r} {self.manifest.dimension}"
            )
        if len(self) == 0:
            return []
        if filters:
            allowed = self._filtered_ids(filters)
            if len(allowed) == 0:
                return []
            # GPU indexes take no id selector: filtered searches there are exact.
            if len(allowed) < EXACT_FILTER_BELOW or self.on_gpu:
                scores, ids = self._exact(query, allowed, top_k)
            else:
                scores, ids = self._ann(query, top_k, allowed)
        else:
            scores, ids = self._ann(query, top_k, None)
        found = [(float(s), int(i)) for s, i in zip(scores, ids) if i >= 0]
        if score_threshold is not None:
            found = [(s, i) for s, i in found if s >= score_threshold]
        return self._hits(found)

    def _ann(self, query: np.ndarray, top_k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The index's top_k; for `ivf_pq`, its top `top_k * pq_rerank` re-scored exactly from the
        stored vectors (quantised scores misorder close neighbours; the vectors stay on disk,
        memory-mapped, so the index keeps its small footprint)."""
        import faiss

        selector = faiss.IDSelectorBatch(allowed) if allowed is not None else None
        params = None if self.on_gpu else search_params(self.manifest.index_type, self.config, selector)
        rerank = self.manifest.index_type == "ivf_pq" and self.config.pq_rerank > 1
        k = min(top_k * self.config.pq_rerank if rerank else top_k, len(self))
        scores, ids = self.index.search(query, k, params=params) if params is not None else self.index.search(query, k)
        if rerank:
            return self._exact(query, ids[0][ids[0] >= 0], top_k)
        return scores[0], ids[0]

    def _exact(self, query: np.ndarray, candidates: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the candidate ids from the stored vectors; the best top_k."""
        # Ids only grow and deletes keep order, so `self.ids` is sorted: a row is a binary search away.
        rows = np.sort(np.searchsorted(self.ids, candidates))
        scores = np.asarray(self.vectors[rows], dtype=np.float32) @ query[0]
        best = np.argsort(-scores)[:top_k]
        return scores[best], self.ids[rows][best]

    def _filtered_ids(self, filters: dict[str, FilterValue]) -> np.ndarray:
        where, args = filter_sql(filters)
        with self._lock:
            rows = self._db.execute(f"SELECT id FROM chunks WHERE {where}", args).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def _hits(self, found: list[tuple[float, int]]) -> list[Hit]:
        if not found:
            return []
        marks = ",".join("?" * len(found))
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, chunk_id, doc_id, idx, text, metadata FROM chunks WHERE id IN ({marks})",
                [i for _, i in found],
            ).fetchall()
        by_id = {r[0]: r for r in rows}
        return [
            Hit(
                chunk_id=by_id[i][1],
                doc_id=by_id[i][2],
                chunk=by_id[i][3],
                text=by_id[i][4],
                score=score,
                metadata=json.loads(by_id[i][5]),
            )
            for score, i in found
            if i in by_id
        ]

    def documents(self) -> dict[str, str]:
        """doc_id -> content hash of every document in this version."""
        with self._lock:
            return dict(self._db.execute("SELECT doc_id, hash FROM documents").fetchall())


# ----- the store and its writer -------------------------------------------------------------------------
