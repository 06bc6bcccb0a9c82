"""The FAISS index store: index types, publish, incremental add/delete, filters, refusal of a
foreign embedder, and atomic publish under a writer killed at any point."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tierserve.rag import snapshot as snapshot_module
from tierserve.rag import store as store_module
from tierserve.rag.config import IndexConfig
from tierserve.rag.indexes import choose_type
from tierserve.rag.snapshot import IndexMismatch, IndexNotFound
from tierserve.rag.store import IndexStore
from tierserve.rag.types import Chunk

DIM = 32
SIGNATURE = "test-embedder|float32|256"


def unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def add_doc(writer, doc_id: str, vectors: np.ndarray, **metadata) -> None:
    chunks = [Chunk(doc_id, i, f"{doc_id} chunk {i}", 3, dict(metadata)) for i in range(len(vectors))]
    writer.add_document(
        doc_id, f"hash-{doc_id}", dict(metadata), chunks, [f"{doc_id}/{i}" for i in range(len(chunks))], vectors
    )


def writer(store: IndexStore, config: IndexConfig | None = None, name: str = "docs", **kwargs):
    return store.writer(name, "test-embedder", SIGNATURE, DIM, config or IndexConfig(type="flat"), **kwargs)


@pytest.fixture
def store(tmp_path: Path) -> IndexStore:
    return IndexStore(tmp_path / "indexes")


def test_publish_and_search_finds_each_stored_vector(store: IndexStore) -> None:
    vectors = unit_rows(50, 0)
    with writer(store) as w:
        add_doc(w, "a.md", vectors[:30], topic="alpha")
        add_doc(w, "b.md", vectors[30:], topic="beta")
    assert store.current("docs") == w.version
    snap = store.open("docs")
    assert len(snap) == 50 and snap.manifest.documents == 2 and snap.manifest.index_type == "flat"
    hits = snap.search(vectors[31], 3)
    assert hits[0].chunk_id == "b.md#1" and hits[0].doc_id == "b.md" and hits[0].chunk == 1
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].metadata == {"topic": "beta"}
    assert hits[0].score >= hits[1].score >= hits[2].score


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat", "ivf_pq"])
def test_every_index_type_finds_near_duplicates(store: IndexStore, kind: str) -> None:
    vectors = unit_rows(2000, 1)
    config = IndexConfig(type=kind, ivf_nprobe=8, pq_m=8)
    with writer(store, config) as w:
        add_doc(w, "big.md", vectors)
    snap = store.open("docs")
    assert snap.manifest.index_type == kind
    queries = vectors[::100] + 0.01 * unit_rows(20, 2)
    found = [snap.search(q / np.linalg.norm(q), 10)[0].chunk for q in queries]
    recall = np.mean([f == i for f, i in zip(found, range(0, 2000, 100))])
    assert recall >= (1.0 if kind in ("flat", "hnsw", "ivf_flat") else 0.8)
    # Scores are exact cosines for every kind: PQ's quantised ones are re-scored from the vectors.
    query = queries[0] / np.linalg.norm(queries[0])
    for h in snap.search(query, 5):
        assert h.score == pytest.approx(float(vectors[h.chunk] @ query), abs=1e-5)


def test_auto_type_by_corpus_size() -> None:
    config = IndexConfig(type="auto", flat_below=1000)
    assert choose_type(config, 999) == "flat"
    assert choose_type(config, 1000) == "hnsw"
    assert choose_type(IndexConfig(type="ivf_pq"), 10) == "ivf_pq"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat"])
def test_incremental_add_and_delete_by_document(store: IndexStore, kind: str) -> None:
    vectors = unit_rows(600, 3)
    config = IndexConfig(type=kind)
    with writer(store, config) as w:
        add_doc(w, "a.md", vectors[:200])
        add_doc(w, "b.md", vectors[200:400])
    first = w.version
    with writer(store, config) as w:
        assert set(w.documents()) == {"a.md", "b.md"}
        assert w.delete_documents(["a.md"]) == 200
        add_doc(w, "c.md", vectors[400:])
    assert w.version != first
    snap = store.open("docs")
    assert len(snap) == 400 and snap.manifest.documents == 2
    assert set(snap.documents()) == {"b.md", "c.md"}
    assert snap.search(vectors[450], 1)[0].chunk_id == "c.md#50"
    assert all(hit.doc_id != "a.md" for hit in snap.search(vectors[10], 10))
    # The ids of kept chunks do not move: b's chunks answer as before.
    assert snap.search(vectors[250], 1)[0].chunk_id == "b.md#50"


def test_writer_without_changes_publishes_nothing(store: IndexStore) -> None:
    with writer(store) as w:
        add_doc(w, "a.md", unit_rows(5, 4))
    version = w.version
    with writer(store) as w2:
        pass
    assert w2.version == version and store.current("docs") == version
    assert len(list((store.path("docs") / "versions").iterdir())) == 1


def test_foreign_embedder_is_refused(store: IndexStore) -> None:
    with writer(store) as w:
        add_doc(w, "a.md", unit_rows(5, 5))
    with pytest.raises(IndexMismatch, match="test-embedder"):
        with store.writer("docs", "other", "other|float32|256", DIM, IndexConfig()):
            pass
    with pytest.raises(IndexMismatch, match="dimensions"):
        with store.writer("docs", "test-embedder", SIGNATURE, DIM * 2, IndexConfig()):
            pass
    with pytest.raises(IndexMismatch):
        store.manifest("docs").check_embedder("other|float32|256", DIM)
    with pytest.raises(IndexMismatch, match="dimensions"):
        store.open("docs").search(np.ones(DIM * 2, dtype=np.float32), 1)
    # --rebuild starts afresh with the new embedder.
    with store.writer("docs", "other", "other|float32|256", DIM * 2, IndexConfig(), rebuild=True) as w:
        add_doc(w, "a.md", np.eye(DIM * 2, dtype=np.float32)[:3])
    assert store.manifest("docs").embedder_signature == "other|float32|256"


def test_missing_index_and_bad_names(store: IndexStore) -> None:
    with pytest.raises(IndexNotFound):
        store.open("nothing")
    with pytest.raises(ValueError, match="index name"):
        store.path("../escape")
    assert store.names() == []


def test_score_threshold_and_metadata_filters(store: IndexStore, monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = unit_rows(90, 6)
    with writer(store) as w:
        add_doc(w, "a.md", vectors[:30], audience="user", tags=["routing", "sla"])
        add_doc(w, "b.md", vectors[30:60], audience="operator", tags=["tracing"])
        add_doc(w, "c.md", vectors[60:], audience="operator", draft=True, version=2)
    snap = store.open("docs")
    query = vectors[5]
    assert {h.doc_id for h in snap.search(query, 90, filters={"audience": "operator"})} == {"b.md", "c.md"}
    assert {h.doc_id for h in snap.search(query, 90, filters={"tags": "sla"})} == {"a.md"}
    assert {h.doc_id for h in snap.search(query, 90, filters={"tags": ["tracing", "sla"]})} == {"a.md", "b.md"}
    assert {h.doc_id for h in snap.search(query, 90, filters={"draft": True, "version": 2})} == {"c.md"}
    assert snap.search(query, 5, filters={"audience": "nobody"}) == []
    assert snap.search(query, 5, filters={"audience": "operator"})[0].doc_id in {"b.md", "c.md"}
    with pytest.raises(ValueError, match="filter key"):
        snap.search(query, 5, filters={"bad key'": "x"})
    # Threshold: only the query's own chunk is that close.
    assert [h.chunk_id for h in snap.search(query, 10, score_threshold=0.99)] == ["a.md#5"]
    # The ANN path with an id selector gives the same answer as the exact one.
    exact = [h.chunk_id for h in snap.search(query, 5, filters={"audience": "operator"})]
    monkeypatch.setattr(snapshot_module, "EXACT_FILTER_BELOW", 0)
    assert [h.chunk_id for h in snap.search(query, 5, filters={"audience": "operator"})] == exact


def test_old_snapshot_keeps_serving_after_newer_versions(store: IndexStore) -> None:
    vectors = unit_rows(20, 7)
    with writer(store) as w:
        add_doc(w, "a.md", vectors[:10])
    old = store.open("docs")
    for n in range(store_module.KEEP_VERSIONS + 1):
        with writer(store) as w:
            add_doc(w, f"n{n}.md", vectors[10 + n : 11 + n])
    versions = sorted(p.name for p in (store.path("docs") / "versions").iterdir())
    assert len(versions) == store_module.KEEP_VERSIONS and old.version not in versions
    assert old.search(vectors[3], 1)[0].chunk_id == "a.md#3"  # its files are gone, its data is not
    assert len(store.open("docs")) == 10 + store_module.KEEP_VERSIONS + 1


KILLED_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from tierserve.rag.config import IndexConfig
    from tierserve.rag.store import IndexStore
    from tierserve.rag.types import Chunk
    root, n = sys.argv[1], int(sys.argv[2])
    rows = np.random.default_rng(n).standard_normal((4000, 32)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    store = IndexStore(root)
    print("ready", flush=True)
    while True:
        with store.writer("docs", "test-embedder", "test-embedder|float32|256", 32, IndexConfig(type="hnsw")) as w:
            docs = w.documents()
            w.delete_documents(list(docs)[:1])
            doc = f"d{n}-{len(docs)}.md"
            chunks = [Chunk(doc, i, f"{doc} {i}", 2) for i in range(len(rows))]
            w.add_document(doc, doc, {}, chunks, [f"{doc}/{i}" for i in range(len(rows))], rows)
    """
)


def consistent(store: IndexStore) -> int:
    """The published version opens and its parts agree; returns its chunk count."""
    snap = store.open("docs")
    db = sqlite3.connect(snap.path / "chunks.sqlite")
    rows = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    db.close()
    manifest = json.loads((snap.path / "manifest.json").read_text())
    assert len(snap) == rows == manifest["chunks"] == len(snap.ids) == len(snap.vectors)
    assert snap.search(np.asarray(snap.vectors[0]), 1)[0].score == pytest.approx(1.0, abs=1e-4)
    return rows


def test_a_killed_writer_never_leaves_a_half_published_index(store: IndexStore) -> None:
    """A writer process publishing in a loop is SIGKILLed at varied moments; every time, the
    served version is whole, and the next writer clears the dead one's staging directory."""
    with writer(store, IndexConfig(type="hnsw")) as w:
        add_doc(w, "seed.md", unit_rows(100, 8))
    published = {store.current("docs")}
    rng = np.random.default_rng(9)
    for trial in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_WRITER, str(store.root), str(trial)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.3, 3.0)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        consistent(store)
        published.add(store.current("docs"))
    assert len(published) > 1, "the writer never got as far as publishing; lengthen the waits"
    assert list(store.path("docs").glob(".staging-*")), "expected a killed writer's staging directory"
    with writer(store, IndexConfig(type="hnsw")) as w:
        add_doc(w, "after.md", unit_rows(3, 10))
    assert not list(store.path("docs").glob(".staging-*"))
    consistent(store)
