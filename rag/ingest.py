"""Ingestion: files in, a new published index version out.

Documents whose content (text, metadata, chunking settings) did not change since the last
version are skipped; changed ones are re-chunked and re-embedded and replace their old chunks;
`prune` deletes documents that are no longer among the sources. A chunk whose text the index
already holds (from any document) is dropped as a duplicate. Nothing is visible to readers until
the version is published, in one rename, at the end (`tierserve.rag.store`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tierserve.rag.chunking import text_hash
from tierserve.rag.config import ChunkingConfig, IndexConfig
from tierserve.rag.store import IndexStore
from tierserve.rag.types import Chunk, Document

if TYPE_CHECKING:
    from tierserve.core.embedder import Embedder
    from tierserve.rag.chunking import Chunker


def document_hash(doc: Document, chunking: ChunkingConfig) -> str:
    """Changes when the document's text, its metadata or the chunking settings change."""
    payload = json.dumps([doc.text, doc.metadata, chunking.model_dump()], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def bundled_corpus() -> Path:
    """The handbook the embedded default serves (`configs/rag/corpus/`)."""
    return Path(str(resources.files("tierserve.configs").joinpath("rag", "corpus")))


@dataclass
class IngestReport:
    index: str
    version: str | None
    documents: int = 0
    """Documents among the sources."""
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    deleted: list[str] = field(default_factory=list)
    chunks_added: int = 0
    chunks_deleted: int = 0
    duplicates: int = 0
    chunks_total: int = 0
    index_type: str = ""
    seconds: float = 0.0
    embed_seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    """Files of a format ingestion does not read."""

    @property
    def chunks_per_s(self) -> float:
        return self.chunks_added / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (
            f"index {self.index!r} version {self.version}: {self.documents} documents "
            f"({len(self.added)} new, {len(self.updated)} updated, {self.unchanged} unchanged, "
            f"{len(self.deleted)} deleted); {self.chunks_added} chunks embedded, {self.chunks_deleted} removed, "
            f"{self.duplicates} duplicates dropped; {self.chunks_total} chunks in a {self.index_type} index; "
            f"{self.seconds:.1f}s ({self.chunks_per_s:.0f} chunks/s)"
        )


def ingest(
    documents: Iterable[Document],
    index: str,
    store: IndexStore,
    embedder: Embedder,
    chunker: Chunker,
    index_config: IndexConfig,
    prune: bool = False,
    rebuild: bool = False,
    progress: bool = False,
    skipped: list[str] | None = None,
) -> IngestReport:
    """Bring index `index` up to date with `documents` and publish the result."""
    started = time.perf_counter()
    docs = list(documents)
    ids = [d.doc_id for d in docs]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"document ids must be unique; repeated: {', '.join(repeated[:5])}")
    report = IngestReport(index, None, documents=len(docs), skipped=list(skipped or []))
    with store.writer(
        index,
        embedder.name,
        embedder.signature,
        embedder.dimension,
        index_config,
        chunking=chunker.config.model_dump(),
        rebuild=rebuild,
    ) as writer:
        stored = writer.documents()
        changed: list[tuple[Document, str]] = []
        for doc in docs:
            digest = document_hash(doc, chunker.config)
            if stored.get(doc.doc_id) == digest:
                report.unchanged += 1
                continue
            (report.updated if doc.doc_id in stored else report.added).append(doc.doc_id)
            changed.append((doc, digest))
        gone = sorted(set(stored) - set(ids)) if prune else []
        report.deleted = gone
        report.chunks_deleted = writer.delete_documents([d.doc_id for d, _ in changed if d.doc_id in stored] + gone)

        seen = writer.known_hashes()
        planned: list[tuple[Document, str, list[Chunk], list[str]]] = []
        for doc, digest in changed:
            kept, hashes = [], []
            for chunk in chunker.chunk(doc):
                h = text_hash(chunk.text)
                if h in seen:
                    report.duplicates += 1
                    continue
                seen.add(h)
                kept.append(chunk)
                hashes.append(h)
            planned.append((doc, digest, kept, hashes))

        texts = [c.text for _, _, chunks, _ in planned for c in chunks]
        embed_started = time.perf_counter()
        vectors = embedder.encode(texts, progress=progress) if texts else np.zeros((0, embedder.dimension), np.float32)
        report.embed_seconds = time.perf_counter() - embed_started
        row = 0
        for doc, digest, chunks, hashes in planned:
            writer.add_document(doc.doc_id, digest, doc.metadata, chunks, hashes, vectors[row : row + len(chunks)])
            row += len(chunks)
        report.chunks_added = row
    report.version = writer.version
    manifest = store.manifest(index)
    report.chunks_total = manifest.chunks
    report.index_type = manifest.index_type
    report.seconds = time.perf_counter() - started
    return report
