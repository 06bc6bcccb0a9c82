"""Retrieval benchmark: ingestion speed, relevance on the labelled queries, and query latency and
recall per FAISS index type at 10k, 100k and 1M chunks.

1. Ingestion: the bundled handbook plus this repository's docs/ and README, through the same
   `ingest` the CLI runs (load, chunk, embed, publish), into a fresh store; chunks/s overall and
   per stage.
2. Relevance: the handbook index answers configs/rag/relevance.jsonl (hit@1, hit@4, MRR per
   split; how many off-topic questions the score threshold turns away).
3. Scale: there is no million-chunk corpus to embed on a 2-core CPU (the embedder does tens of
   chunks per second), so the chunk vectors at scale are drawn from a Gaussian fitted to the real
   chunk vectors of step 1 (their mean and covariance), normalised; the queries are the labelled
   questions, embedded for real on every query. Each index is built through the store's writer
   and searched through `IndexSnapshot.search` (chunk rows included), as the retriever does,
   with the retriever's threads: one for the embedder, FAISS's default for search. Latency is
   per query, embedding plus search; recall@10 is against the exact (flat) top 10 of the same
   query.

    .venv/bin/python bench/rag.py [--sizes 10000,100000,1000000] [--types flat,hnsw,ivf_flat,ivf_pq] [--no-write]

Prints the tables and writes them to docs/benchmarks/rag-benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
K = 10


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def corpus_documents() -> list:
    from tierserve.rag.ingest import bundled_corpus
    from tierserve.rag.loaders import load_documents

    docs = list(load_documents(bundled_corpus(), "handbook/"))
    docs += list(load_documents(REPO / "docs", "docs/"))
    docs += list(load_documents(REPO / "README.md"))
    return docs


def ingestion(store_root: Path, embedder, chunker) -> tuple[dict, np.ndarray]:
    """Ingest the corpus once; the report and the chunk vectors it produced."""
    from tierserve.rag.config import IndexConfig
    from tierserve.rag.ingest import ingest
    from tierserve.rag.store import IndexStore

    started = time.perf_counter()
    docs = corpus_documents()
    loaded_s = time.perf_counter() - started
    started = time.perf_counter()
    chunks = [c for d in docs for c in chunker.chunk(d)]
    chunk_s = time.perf_counter() - started
    megabytes = sum(len(d.text.encode()) for d in docs) / 1e6
    store = IndexStore(store_root)
    report = ingest(docs, "corpus", store, embedder, chunker, IndexConfig(type="flat"))
    snapshot = store.open("corpus")
    vectors = np.asarray(snapshot.vectors, dtype=np.float32)
    return {
        "documents": len(docs),
        "megabytes": megabytes,
        "chunks": report.chunks_added,
        "duplicates": report.duplicates,
        "load_s": loaded_s,
        "chunking_chunks_per_s": len(chunks) / chunk_s,
        "chunking_mb_per_s": megabytes / chunk_s,
        "embed_chunks_per_s": report.chunks_added / report.embed_seconds,
        "ingest_s": report.seconds,
        "ingest_chunks_per_s": report.chunks_per_s,
    }, vectors


def relevance(store_root: Path, embedder, chunker, thresholds: list[float]) -> list[dict]:
    from tierserve.rag.config import IndexConfig
    from tierserve.rag.ingest import bundled_corpus, ingest
    from tierserve.rag.loaders import load_documents
    from tierserve.rag.store import IndexStore

    store = IndexStore(store_root)
    ingest(load_documents(bundled_corpus()), "handbook", store, embedder, chunker, IndexConfig(type="flat"))
    snapshot = store.open("handbook")
    rows = [json.loads(line) for line in (REPO / "configs" / "rag" / "relevance.jsonl").read_text().splitlines()]
    out = []
    for split in ("tune", "heldout"):
        answerable = [r for r in rows if r["split"] == split and r["relevant"]]
        off_topic = [r for r in rows if r["split"] == split and not r["relevant"]]
        ranks, top_scores_pos, top_scores_neg = [], [], []
        for row in answerable:
            hits = snapshot.search(embedder.encode([row["query"]])[0], K)
            ranks.append(next((i + 1 for i, h in enumerate(hits) if h.doc_id in row["relevant"]), None))
            top_scores_pos.append(hits[0].score)
        for row in off_topic:
            top_scores_neg.append(snapshot.search(embedder.encode([row["query"]])[0], 1)[0].score)
        result = {
            "split": split,
            "queries": len(answerable),
            "hit@1": np.mean([r == 1 for r in ranks]),
            "hit@4": np.mean([r is not None and r <= 4 for r in ranks]),
            "mrr": np.mean([1 / r if r else 0.0 for r in ranks]),
            "off_topic": len(off_topic),
        }
        for t in thresholds:
            result[f"kept@{t}"] = np.mean([s >= t for s in top_scores_pos])
            result[f"refused@{t}"] = np.mean([s < t for s in top_scores_neg]) if off_topic else None
        out.append(result)
    return out


def synthetic(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n unit vectors from a Gaussian with the real chunk vectors' mean and covariance."""
    rng = np.random.default_rng(seed)
    mean = real.mean(axis=0)
    # Cholesky of the covariance (a little ridge: fewer chunks than dimensions is possible).
    cov = np.cov(real, rowvar=False) + 1e-5 * np.eye(real.shape[1])
    factor = np.linalg.cholesky(cov).astype(np.float32)
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        rows = mean + rng.standard_normal((stop - start, real.shape[1]), dtype=np.float32) @ factor.T
        out[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def build(store_root: Path, kind: str, vectors: np.ndarray, embedder) -> tuple[object, float]:
    from tierserve.rag.config import IndexConfig
    from tierserve.rag.store import IndexStore
    from tierserve.rag.types import Chunk

    store = IndexStore(store_root)
    started = time.perf_counter()
    with store.writer("scale", embedder.name, embedder.signature, embedder.dimension, IndexConfig(type=kind)) as w:
        chunks = [Chunk("synthetic", i, f"chunk {i}", 3) for i in range(len(vectors))]
        w.add_document("synthetic", "synthetic", {}, chunks, [str(i) for i in range(len(vectors))], vectors)
    return store.open("scale"), time.perf_counter() - started


def scale(sizes: list[int], kinds: list[str], real: np.ndarray, embedder, questions: list[str]) -> list[dict]:
    import faiss

    rows = []
    for n in sizes:
        vectors = synthetic(real, n)
        exact: dict[str, list[str]] = {}
        for kind in ["flat", *[k for k in kinds if k != "flat"]]:
            root = Path(tempfile.mkdtemp(prefix="tierserve-bench-rag-"))
            try:
                snapshot, build_s = build(root, kind, vectors, embedder)
                size_mb = (snapshot.path / "index.faiss").stat().st_size / 1e6
                latencies, recalls = [], []
                for q in questions * 3:
                    started = time.perf_counter()
                    hits = snapshot.search(embedder.encode([q])[0], K)
                    latencies.append(1e3 * (time.perf_counter() - started))
                    ids = [h.chunk_id for h in hits]
                    if kind == "flat":
                        exact[q] = ids
                    recalls.append(len(set(ids) & set(exact[q])) / K)
                snapshot.close()
            finally:
                shutil.rmtree(root, ignore_errors=True)
            row = {
                "chunks": n,
                "type": kind,
                "build_s": build_s,
                "index_mb": size_mb,
                "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
                "recall@10": float(np.mean(recalls)),
            }
            rows.append(row)
            print(
                f"  {n:>9,} {kind:<8} build {build_s:7.1f}s  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
                f"recall@10 {row['recall@10']:.3f}  ({faiss.omp_get_max_threads()} FAISS threads)",
                flush=True,
            )
        del vectors
    return rows


def embed_cost(embedder, questions: list[str]) -> tuple[float, float]:
    times = []
    for q in questions * 3:
        started = time.perf_counter()
        embedder.encode([q])
        times.append(1e3 * (time.perf_counter() - started))
    return percentile(times, 50), percentile(times, 99)


def tables(
    ingest_row: dict, relevance_rows: list[dict], thresholds: list[float], embed: tuple, scale_rows: list[dict]
) -> str:
    i = ingest_row
    out = [
        "## Ingestion",
        "",
        f"{i['documents']} documents, {i['megabytes']:.2f} MB of text, {i['chunks']} chunks "
        f"({i['duplicates']} duplicates dropped), chunks of 200 tokens with 40 of overlap.",
        "",
        "| stage | rate |",
        "|---|---:|",
        f"| chunking (tokenizer) | {i['chunking_chunks_per_s']:,.0f} chunks/s ({i['chunking_mb_per_s']:.2f} MB/s) |",
        f"| embedding (all-MiniLM-L6-v2, float32, all cores) | {i['embed_chunks_per_s']:,.1f} chunks/s |",
        f"| whole ingestion (load, chunk, embed, publish) | {i['ingest_chunks_per_s']:,.1f} chunks/s "
        f"({i['ingest_s']:.1f} s) |",
        "",
        "## Relevance on the labelled queries (bundled handbook, 14 pages)",
        "",
        "| split | questions | hit@1 | hit@4 | MRR | "
        + " | ".join(f"answerable kept at {t}" for t in thresholds)
        + " | off-topic | "
        + " | ".join(f"off-topic refused at {t}" for t in thresholds)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(thresholds) + "---:|" + "---:|" * len(thresholds),
    ]
    for r in relevance_rows:
        kept = " | ".join(f"{r[f'kept@{t}']:.0%}" for t in thresholds)
        refused = " | ".join("-" if r[f"refused@{t}"] is None else f"{r[f'refused@{t}']:.0%}" for t in thresholds)
        out.append(
            f"| {r['split']} | {r['queries']} | {r['hit@1']:.2f} | {r['hit@4']:.2f} | {r['mrr']:.2f} | {kept} | "
            f"{r['off_topic']} | {refused} |"
        )
    out += [
        "",
        "## Query latency and recall by index type",
        "",
        f"Query embedding alone (one thread, as in the retriever): p50 {embed[0]:.2f} ms, p99 {embed[1]:.2f} ms. "
        "Latency below is embedding plus search plus reading the hits' rows, per query.",
        "",
        "| chunks | index | build (s) | index size (MB) | p50 (ms) | p99 (ms) | recall@10 vs flat |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in scale_rows:
        out.append(
            f"| {r['chunks']:,} | {r['type']} | {r['build_s']:.1f} | {r['index_mb']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['recall@10']:.3f} |"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--types", default="flat,hnsw,ivf_flat,ivf_pq")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.types.split(",")
    thresholds = [0.2, 0.3]

    import faiss
    import torch

    from tierserve.core.embedder import Embedder
    from tierserve.rag.chunking import Chunker

    chunker = Chunker()
    bulk = Embedder()  # all cores, as `tierserve rag ingest`
    with tempfile.TemporaryDirectory(prefix="tierserve-bench-rag-") as tmp:
        print("ingestion ...", flush=True)
        ingest_row, real = ingestion(Path(tmp) / "ingest", bulk, chunker)
        print(json.dumps(ingest_row, indent=1), flush=True)
        torch.set_num_threads(1)  # the retriever's setting from here on
        print("relevance ...", flush=True)
        relevance_rows = relevance(Path(tmp) / "relevance", bulk, chunker, thresholds)
    questions = [json.loads(line)["query"] for line in (REPO / "configs/rag/relevance.jsonl").read_text().splitlines()]
    embed = embed_cost(bulk, questions)
    print(f"query embedding p50 {embed[0]:.2f} ms p99 {embed[1]:.2f} ms", flush=True)
    print("scale ...", flush=True)
    scale_rows = scale(sizes, kinds, real, bulk, questions)

    body = tables(ingest_row, relevance_rows, thresholds, embed, scale_rows)
    print(body)
    if args.no_write:
        return 0
    header = f"""# RAG benchmark

Written by `bench/rag.py` (`.venv/bin/python bench/rag.py --sizes {args.sizes} --types {args.types}`);
one run on {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},
torch {torch.__version__} ({torch.get_num_threads()} thread for query embedding), FAISS {faiss.__version__}
({faiss.omp_get_max_threads()} threads). How each part is measured is in the script's docstring; in short,
the scale rows use real query embeddings against chunk vectors drawn from a Gaussian fitted to
{ingest_row["chunks"]} real chunk vectors (no corpus of a million chunks can be embedded on this machine),
so their recall is that of this synthetic distribution, not of a real corpus of that size.
Index parameters are the defaults of `rag.index` (HNSW M=32, efConstruction 80, efSearch 256;
IVF sqrt(n) lists, nprobe 64; PQ 48 sub-quantizers of 8 bits, top 4k re-scored exactly).

"""
    (REPO / "docs" / "benchmarks" / "rag-benchmark.md").write_text(header + body + "\n")
    print("written to docs/benchmarks/rag-benchmark.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
