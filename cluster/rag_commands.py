"""`tierserve rag ...`: ingest, delete, list and query retrieval indexes from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tierserve.cluster.config import AppConfig, load_config, model_cache_dir


def _rag_setup(args: argparse.Namespace) -> tuple[AppConfig, Path]:
    """The config (for its `rag` block) and the index store directory: --store, else
    `rag.store`, else `<model cache>/indexes`."""
    from tierserve.rag.retriever import default_store

    config = load_config(args.config, check_engine=False)
    if args.store:
        return config, Path(args.store).expanduser()
    return config, default_store(config.rag, model_cache_dir(config, args.cache_dir))


def _key_values(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def cmd_rag_ingest(args: argparse.Namespace) -> int:
    """Chunk, embed and publish documents into an index; the running service picks the new
    version up within `rag.reload_interval_s`."""
    from tierserve.core.embedder import Embedder
    from tierserve.rag.chunking import Chunker
    from tierserve.rag.ingest import ingest
    from tierserve.rag.loaders import load_documents
    from tierserve.rag.store import IndexStore

    config, store_dir = _rag_setup(args)
    rag = config.rag
    index_config = rag.index.model_copy(update={"type": args.type}) if args.type else rag.index
    extra = _key_values(args.meta, "--meta")
    documents, skipped = [], []
    for path in args.paths:
        for doc in load_documents(Path(path), args.prefix or "", on_skip=skipped.append):
            doc.metadata.update(extra)
            documents.append(doc)
    if not documents:
        raise ValueError(f"no documents to ingest in {', '.join(args.paths)} (txt, md, html and pdf are read)")
    print(f"{len(documents)} documents from {', '.join(args.paths)}; loading the embedder", flush=True)
    embedder = Embedder(rag.embedder.model, rag.embedder.device, rag.embedder.batch_size)
    chunker = Chunker(rag.chunking, rag.embedder.model)
    report = ingest(
        documents,
        args.index,
        IndexStore(store_dir),
        embedder,
        chunker,
        index_config,
        prune=args.prune,
        rebuild=args.rebuild,
        progress=True,
        skipped=skipped,
    )
    print(report.summary())
    if skipped:
        print(f"skipped {len(skipped)} file(s) of other formats: {', '.join(skipped[:10])}")
    print(f"store: {store_dir}")
    return 0


def cmd_rag_delete(args: argparse.Namespace) -> int:
    from tierserve.rag.config import IndexConfig
    from tierserve.rag.store import IndexStore

    _, store_dir = _rag_setup(args)
    store = IndexStore(store_dir)
    manifest = store.manifest(args.index)
    with store.writer(
        args.index,
        manifest.embedder,
        manifest.embedder_signature,
        manifest.dimension,
        IndexConfig(**manifest.index_config),
    ) as writer:
        missing = sorted(set(args.doc_ids) - set(writer.documents()))
        if missing:
            raise ValueError(f"index {args.index!r} has no document(s) {', '.join(missing)}")
        removed = writer.delete_documents(args.doc_ids)
    print(f"index {args.index!r} version {writer.version}: {len(args.doc_ids)} document(s), {removed} chunks removed")
    return 0


def cmd_rag_list(args: argparse.Namespace) -> int:
    from tierserve.rag.store import IndexStore

    _, store_dir = _rag_setup(args)
    store = IndexStore(store_dir)
    names = store.names()
    print(f"store: {store_dir}" + ("" if names else " (no indexes)"))
    for name in names:
        m = store.manifest(name)
        print(
            f"{name}  version {m.version}  {m.documents} documents, {m.chunks} chunks, {m.index_type}, "
            f"embedder {m.embedder_signature} ({m.dimension}d)"
        )
    return 0


def cmd_rag_query(args: argparse.Namespace) -> int:
    """Search an index from the command line, as the retriever would."""
    from tierserve.core.embedder import Embedder
    from tierserve.rag.store import IndexStore

    config, store_dir = _rag_setup(args)
    snapshot = IndexStore(store_dir).open(args.index)
    embedder = Embedder(config.rag.embedder.model, config.rag.embedder.device)
    snapshot.manifest.check_embedder(embedder.signature, embedder.dimension)
    hits = snapshot.search(
        embedder.encode([args.query])[0], args.top_k, args.threshold, _key_values(args.filter, "--filter")
    )
    for n, hit in enumerate(hits, 1):
        text = " ".join(hit.text.split())
        print(f"[{n}] {hit.score:.3f}  {hit.chunk_id}\n    {text[:200]}{'...' if len(text) > 200 else ''}")
    if not hits:
        print("no chunks matched")
    return 0


def add_rag_commands(sub: Any) -> None:
    """The `rag` command group, on the top-level parser's subparsers `sub`."""
    g = sub.add_parser("rag", help="retrieval indexes").add_subparsers(dest="rag_command", required=True)

    def store_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", help="tierserve YAML whose `rag` block applies (default: the embedded one)")
        q.add_argument("--store", help="index store directory (default: rag.store, else <model cache>/indexes)")
        q.add_argument("--cache-dir")

    gi = g.add_parser("ingest", help="chunk, embed and publish documents (txt, md, html, pdf) into an index")
    gi.add_argument("paths", nargs="+", help="files or directories")
    gi.add_argument("--index", required=True, help="index name")
    gi.add_argument("--prune", action="store_true", help="delete documents no longer among the paths")
    gi.add_argument("--rebuild", action="store_true", help="start the index afresh (e.g. to change embedders)")
    gi.add_argument("--type", choices=["auto", "flat", "hnsw", "ivf_flat", "ivf_pq"], help="override rag.index.type")
    gi.add_argument("--prefix", help="prepend to every document id (e.g. 'handbook/')")
    gi.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata on every document; repeat")
    store_options(gi)
    gi.set_defaults(func=cmd_rag_ingest)
    gd = g.add_parser("delete", help="delete documents from an index by id")
    gd.add_argument("doc_ids", nargs="+")
    gd.add_argument("--index", required=True)
    store_options(gd)
    gd.set_defaults(func=cmd_rag_delete)
    gl = g.add_parser("list", help="indexes in the store")
    store_options(gl)
    gl.set_defaults(func=cmd_rag_list)
    gq = g.add_parser("query", help="search an index")
    gq.add_argument("query")
    gq.add_argument("--index", default="tierserve-docs")
    gq.add_argument("--top-k", type=int, default=4)
    gq.add_argument("--threshold", type=float, help="minimum cosine similarity")
    gq.add_argument("--filter", action="append", metavar="KEY=VALUE", help="metadata equality; repeat")
    store_options(gq)
    gq.set_defaults(func=cmd_rag_query)
