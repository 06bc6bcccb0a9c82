"""Retrieval-augmented generation: chunking, FAISS index store, ingestion, retriever deployment."""
