"""FAISS indexes over unit vectors, and the metadata filters searches apply.

Vectors are L2-normalised sentence embeddings, so every index searches by inner product, which is
the cosine similarity. Flat is exact; HNSW is a graph (fast, high recall, more memory); IVF
clusters the vectors into lists and searches the `nprobe` closest, with the vectors kept whole
(`ivf_flat`) or product-quantised (`ivf_pq`, for corpora where memory is the limit). Every kind
carries the caller's int64 ids, which the store uses as chunk row ids.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tierserve.rag.config import IndexConfig
from tierserve.rag.types import FilterValue

logger = logging.getLogger("tierserve.rag")


def choose_type(config: IndexConfig, count: int) -> str:
    """The index type for `count` vectors: the configured one, or for `auto` exact search while
    it is cheap (under `flat_below`) and HNSW above."""
    if config.type != "auto":
        return config.type
    return "flat" if count < config.flat_below else "hnsw"


def _nlist(config: IndexConfig, count: int) -> int:
    if config.ivf_nlist:
        return config.ivf_nlist
    # About sqrt(n) lists (FAISS's guidance spans 1x to 16x sqrt(n); the low end trains fast on
    # a CPU and scans few lists), each with the 39+ training points k-means wants.
    return max(1, min(int(np.sqrt(max(count, 1))), count // 39 or 1))


def build_faiss(kind: str, config: IndexConfig, vectors: np.ndarray, ids: np.ndarray) -> Any:
    """A CPU FAISS index of `kind` over unit vectors (inner product = cosine), searched and
    removed from by the given ids."""
    import faiss

    dim = vectors.shape[1]
    if kind == "flat":
        base = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = config.hnsw_ef_construction
        base.hnsw.efSearch = config.hnsw_ef_search
    elif kind in ("ivf_flat", "ivf_pq"):
        nlist = _nlist(config, len(vectors))
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf_flat":
            base = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = config.pq_m or max(1, dim // 8)
            if dim % m:
                raise ValueError(f"pq_m={m} must divide the embedding dimension {dim}")
            base = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        if len(vectors) == 0:
            raise ValueError(f"an {kind} index needs vectors to train on; ingest some documents first")
        base.train(_training_sample(vectors, nlist))
        base.nprobe = config.ivf_nprobe
    else:
        raise ValueError(f"unknown index type {kind!r}")
    # IVF keeps the caller's ids itself (and its removal would desynchronise an id map, which
    # assumes the inner index compacts on removal as Flat does); Flat and HNSW need the map.
    index = base if kind.startswith("ivf") else faiss.IndexIDMap2(base)
    if len(vectors):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
    return index


def _training_sample(vectors: np.ndarray, nlist: int) -> np.ndarray:
    cap = max(64 * nlist, 10_000)  # k-means quality stops improving well before every vector
    if len(vectors) <= cap:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    pick = np.random.default_rng(0).choice(len(vectors), cap, replace=False)
    return np.ascontiguousarray(vectors[np.sort(pick)], dtype=np.float32)


def search_params(kind: str, config: IndexConfig, selector: Any = None) -> Any:
    import faiss

    if kind == "hnsw":
        return faiss.SearchParametersHNSW(sel=selector, efSearch=config.hnsw_ef_search)
    if kind.startswith("ivf"):
        return faiss.SearchParametersIVF(sel=selector, nprobe=config.ivf_nprobe)
    return faiss.SearchParameters(sel=selector) if selector is not None else None


def to_gpu(index: Any, kind: str, wanted: bool | None) -> tuple[Any, bool]:
    """The index on GPU 0 when faiss-gpu sees one (and config does not say no); HNSW stays on CPU."""
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if wanted is False or kind == "hnsw" or gpus == 0:
        if wanted and gpus == 0:
            logger.warning("index.use_gpu is set but FAISS sees no GPU; searching on the CPU")
        return index, False
    try:
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, index), True
    except Exception as exc:  # an index kind this faiss-gpu cannot clone
        logger.warning("could not move the %s index to the GPU (%s); searching on the CPU", kind, exc)
        return index, False


def filter_sql(filters: dict[str, FilterValue]) -> tuple[str, list[Any]]:
    """A WHERE clause over `chunks.metadata` (JSON): each key must equal the value or one of a
    list's values; a metadata value that is itself a list matches if any element does."""
    clauses, args = [], []
    for key, value in filters.items():
        if not key or not all(c.isalnum() or c in "_-" for c in key):
            raise ValueError(f"filter key {key!r} must be letters, digits, '_' or '-'")
        values = list(value) if isinstance(value, list) else [value]
        if not values:
            raise ValueError(f"filter {key!r} has an empty list of values")
        path = f"$.{key}" if key.replace("_", "").isalnum() else f'$."{key}"'
        marks = ",".join("?" * len(values))
        clauses.append(
            f"(json_extract(metadata, ?) IN ({marks}) OR (json_type(metadata, ?) = 'array' AND "
            f"EXISTS (SELECT 1 FROM json_each(metadata, ?) WHERE value IN ({marks}))))"
        )
        args += [path, *values, path, path, *values]
    return " AND ".join(clauses) or "1", args
