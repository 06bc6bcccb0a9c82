"""Retrieval-augmented generation: embedder, FAISS index store, ingestion, retriever deployment."""
