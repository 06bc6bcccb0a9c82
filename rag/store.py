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
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tierserve.rag.config import IndexConfig
from tierserve.rag.indexes import build_faiss, choose_type
from tierserve.rag.snapshot import CHUNKS_SCHEMA, IndexNotFound, IndexSnapshot, Manifest
from tierserve.rag.types import Chunk, check_index_name

logger = logging.getLogger("tierserve.rag")

KEEP_VERSIONS = 3
"""Published versions kept on disk (the newest and two before it, for readers still on them)."""


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
        self.db.executescript(CHUNKS_SCHEMA)
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
