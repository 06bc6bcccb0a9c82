"""The index store: FAISS indexes on disk, published atomically, one directory per index.

```
<store>/<index>/
    CURRENT                 the published version's name; replaced with one rename
    versions/<version>/     immutable once published
        manifest.json       embedder (name, signature, dimension), index type and parameters, counts
        index.faiss         the FAISS index (Flat or HNSW in an IndexIDMap2, or IVF), ids = chunk rows
        vectors.npy         every chunk's vector, so a later version can delete from HNSW, change
                            index type or search a filtered subset exactly, without re-embedding
        chunks.sqlite       chunk rows (id, chunk_id, doc_id, text, metadata JSON, text hash) and
                            document rows (doc_id, content hash, metadata)
    .staging-<uuid>/        a version being written; readers never look here
    .lock                   held by the one writer at a time (flock: a killed writer releases it)
```

A writer copies the current version into a staging directory, applies deletes and adds, and
publishes by renaming the directory into `versions/` and then replacing `CURRENT`; both steps
are single renames, so a reader sees the old version or the new one, never half of either, and
an ingestion killed at any point leaves the old version served (its staging directory is
removed by the next writer). Readers load a version whole (`IndexStore.open`) and keep serving
it while newer ones are published; the retriever swaps in the newest when `CURRENT` changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierserve.rag.config import IndexConfig
from tierserve.rag.indexes import build_faiss, choose_type, filter_sql, search_params, to_gpu
from tierserve.rag.types import Chunk, FilterValue, Hit, check_index_name

logger = logging.getLogger("tierserve.rag")

FORMAT = 1
KEEP_VERSIONS = 3
"""Published versions kept on disk (the newest and two before it, for readers still on them)."""
EXACT_FILTER_BELOW = 20_000
"""A metadata filter that leaves fewer chunks than this is searched exactly over those chunks'
vectors; above, the ANN index searches with an id selector (HNSW under a very selective filter
can miss allowed neighbours, exact search cannot)."""

_SCHEMA = """
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


class StoreError(ValueError):
    """Base of the index store's errors."""


class IndexNotFound(StoreError):
    pass


class IndexMismatch(StoreError):
    """An index built with one embedder asked to take or answer vectors of another."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


# ----- reading -------------------------------------------------------------------------------


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


class IndexStore:
    """A directory of named indexes."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path(self, name: str) -> Path:
        return self.root / check_index_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "CURRENT").is_file())

    def current(self, name: str) -> str | None:
        """The published version of index `name`, or None if it has none."""
        try:
            return (self.path(name) / "CURRENT").read_text().strip() or None
        except FileNotFoundError:
            return None

    def manifest(self, name: str) -> Manifest:
        version = self.current(name)
        if version is None:
            raise IndexNotFound(f"no index named {name!r} in {self.root}")
        return Manifest.read(self.path(name) / "versions" / version)

    def open(self, name: str, use_gpu: bool | None = None) -> IndexSnapshot:
        """The published version of `name`, loaded. Retries once if a publish removed the
        version between reading CURRENT and loading it (only possible for very old versions)."""
        for attempt in range(2):
            version = self.current(name)
            if version is None:
                raise IndexNotFound(f"no index named {name!r} in {self.root}")
            try:
                return IndexSnapshot(self.path(name) / "versions" / version, use_gpu)
            except FileNotFoundError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def writer(
        self,
        name: str,
        embedder: str,
        embedder_signature: str,
        dimension: int,
        config: IndexConfig,
        chunking: dict[str, Any] | None = None,
        rebuild: bool = False,
        lock_timeout_s: float = 600.0,
    ) -> Iterator[IndexWriter]:
        """A writer on a copy of the current version; leaving the block without an error
        publishes it. `rebuild` starts from empty (to change embedders)."""
        directory = self.path(name)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "versions").mkdir(exist_ok=True)
        with _locked(directory / ".lock", lock_timeout_s):
            _remove_stale_staging(directory)
            staging = directory / f".staging-{uuid.uuid4().hex}"
            staging.mkdir()
            try:
                base = None if rebuild else self.current(name)
                base_manifest = Manifest.read(directory / "versions" / base) if base else None
                if base_manifest is not None:
                    base_manifest.check_embedder(embedder_signature, dimension)
                writer = IndexWriter(
                    name, directory, staging, base, embedder, embedder_signature, dimension, config, chunking or {}
                )
                yield writer
                if writer.dirty or base is None:
                    writer._publish()
                else:  # nothing changed: the published version stays
                    writer.db.close()
                    writer.version = base
            finally:
                shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path, timeout_s: float) -> Iterator[None]:
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another ingestion holds {path} (waited {timeout_s:g}s)") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_stale_staging(directory: Path) -> None:
    """Staging directories left by killed writers (safe: the caller holds the lock)."""
    for stale in directory.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)


class IndexWriter:
    """Deletes and adds on a staged copy of one index; `IndexStore.writer` publishes it."""

    def __init__(
        self,
        name: str,
        directory: Path,
        staging: Path,
        base: str | None,
        embedder: str,
        signature: str,
        dimension: int,
        config: IndexConfig,
        chunking: dict[str, Any],
    ):
        self.name = name
        self.directory = directory
        self.staging = staging
        self.base = base
        self.embedder = embedder
        self.signature = signature
        self.dimension = dimension
        self.config = config
        self.chunking = chunking
        base_dir = directory / "versions" / base if base else None
        if base_dir is not None:
            shutil.copyfile(base_dir / "chunks.sqlite", staging / "chunks.sqlite")
            self._vectors = np.load(base_dir / "vectors.npy")
            self._ids = np.load(base_dir / "ids.npy")
            self._base_manifest = Manifest.read(base_dir)
        else:
            self._vectors = np.zeros((0, dimension), dtype=np.float32)
            self._ids = np.zeros(0, dtype=np.int64)
            self._base_manifest = None
        self.db = sqlite3.connect(staging / "chunks.sqlite")
        self.db.executescript(_SCHEMA)
        self._new_vectors: list[np.ndarray] = []
        self._new_ids: list[np.ndarray] = []
        self._deleted: set[int] = set()
        row = self.db.execute("SELECT MAX(id) FROM chunks").fetchone()
        self._next_id = int(row[0]) + 1 if row[0] is not None else 0
        self.version: str | None = None

    @property
    def dirty(self) -> bool:
        """Whether anything was deleted or added."""
        return bool(self._deleted or self._new_ids)

    def documents(self) -> dict[str, str]:
        """doc_id -> content hash of the documents in the staged index."""
        return dict(self.db.execute("SELECT doc_id, hash FROM documents").fetchall())

    def known_hashes(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT hash FROM chunks")}

    def delete_documents(self, doc_ids: Iterable[str]) -> int:
        """Remove these documents and their chunks; returns how many chunks went."""
        removed = 0
        for doc_id in doc_ids:
            ids = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE doc_id = ?", (doc_id,))]
            self._deleted.update(ids)
            removed += len(ids)
            self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
            self.db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
        return removed

    def add_document(
        self,
        doc_id: str,
        content_hash: str,
        metadata: dict[str, Any],
        chunks: Sequence[Chunk],
        hashes: Sequence[str],
        vectors: np.ndarray,
    ) -> None:
        """One document's chunks with their vectors (rows aligned with `chunks`)."""
        if vectors.shape != (len(chunks), self.dimension):
            raise ValueError(f"vectors shape {vectors.shape} != ({len(chunks)}, {self.dimension})")
        ids = np.arange(self._next_id, self._next_id + len(chunks), dtype=np.int64)
        self._next_id += len(chunks)
        self.db.executemany(
            "INSERT INTO chunks (id, chunk_id, doc_id, idx, text, token_count, metadata, hash) "
            "VALUES (?,?,?,?,?,?,?,?)",
            [
                (int(i), c.chunk_id, c.doc_id, c.index, c.text, c.token_count, json.dumps(c.metadata, default=str), h)
                for i, c, h in zip(ids, chunks, hashes)
            ],
        )
        self.db.execute(
            "INSERT OR REPLACE INTO documents (doc_id, hash, metadata, chunks) VALUES (?,?,?,?)",
            (doc_id, content_hash, json.dumps(metadata, default=str), len(chunks)),
        )
        self._new_vectors.append(np.asarray(vectors, dtype=np.float32))
        self._new_ids.append(ids)

    def _publish(self) -> None:
        keep = ~np.isin(self._ids, np.fromiter(self._deleted, dtype=np.int64)) if self._deleted else slice(None)
        vectors = (
            np.concatenate([self._vectors[keep], *self._new_vectors]) if self._new_vectors else self._vectors[keep]
        )
        ids = np.concatenate([self._ids[keep], *self._new_ids]) if self._new_ids else self._ids[keep]
        kind = choose_type(self.config, len(ids))
        index = self._incremental(kind, vectors, ids)
        self.db.commit()
        self.db.execute("VACUUM")
        self.db.close()

        import faiss

        faiss.write_index(index, str(self.staging / "index.faiss"))
        np.save(self.staging / "vectors.npy", np.ascontiguousarray(vectors, dtype=np.float32))
        np.save(self.staging / "ids.npy", ids.astype(np.int64))
        documents = sqlite3.connect(self.staging / "chunks.sqlite")
        n_docs = documents.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        documents.close()
        versions = self.directory / "versions"
        previous = [p.name for p in versions.iterdir() if p.is_dir()]
        number = 1 + max((int(v.split("-")[0][1:]) for v in previous if v.startswith("v")), default=0)
        self.version = f"v{number:06d}-{time.strftime('%Y%m%dT%H%M%S')}"
        Manifest(
            index=self.name,
            version=self.version,
            embedder=self.embedder,
            embedder_signature=self.signature,
            dimension=self.dimension,
            index_type=kind,
            chunks=len(ids),
            documents=n_docs,
            created=time.time(),
            chunking=self.chunking,
            index_config=self.config.model_dump(),
        ).write(self.staging)
        _fsync_tree(self.staging)
        os.rename(self.staging, versions / self.version)
        _fsync_dir(versions)
        pointer = self.directory / f".CURRENT.{uuid.uuid4().hex}"
        pointer.write_text(self.version + "\n")
        with open(pointer, "rb") as f:
            os.fsync(f.fileno())
        os.replace(pointer, self.directory / "CURRENT")
        _fsync_dir(self.directory)
        for old in sorted(p for p in versions.iterdir() if p.is_dir())[:-KEEP_VERSIONS]:
            shutil.rmtree(old, ignore_errors=True)

    def _incremental(self, kind: str, vectors: np.ndarray, ids: np.ndarray) -> Any:
        """The base version's index with this writer's deletes and adds applied where FAISS can
        (Flat and IVF remove, every kind adds), else built afresh from the kept vectors."""
        import faiss

        base = self._base_manifest
        same = base is not None and base.index_type == kind and IndexConfig(**base.index_config) == self.config
        can_remove = kind != "hnsw" or not self._deleted
        if not (same and can_remove):
            return build_faiss(kind, self.config, vectors, ids)
        index = faiss.read_index(str(self.directory / "versions" / self.base / "index.faiss"))
        if self._deleted:
            index.remove_ids(faiss.IDSelectorBatch(np.fromiter(self._deleted, dtype=np.int64)))
        for new_vectors, new_ids in zip(self._new_vectors, self._new_ids):
            index.add_with_ids(np.ascontiguousarray(new_vectors, dtype=np.float32), new_ids)
        return index
