"""What crosses the retriever's boundary: documents and chunks in, queries in, hits out.

Plain slotted dataclasses, like the tier messages: cheap to pickle across a Ray handle call and
free of HTTP shapes. A chunk's id is `<doc_id>#<n>`, stable for as long as the document's text
is, so citations can be checked against the index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FilterValue = str | int | float | bool | list[str | int | float | bool]


@dataclass(slots=True)
class Document:
    """One source document's text and metadata, before chunking."""

    doc_id: str
    """Stable id: the path relative to the ingested root, or one the caller chooses."""
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    """`source` (path), `title`, `format`, plus anything the caller adds; filters match on these."""


@dataclass(slots=True)
class Chunk:
    """A piece of a document small enough to embed whole."""

    doc_id: str
    index: int
    """Position of the chunk within its document, from 0."""
    text: str
    token_count: int
    metadata: dict[str, Any] = field(default_factory=dict)
    """The document's metadata plus `heading` (the Markdown section path) where there is one."""

    @property
    def chunk_id(self) -> str:
        return f"{self.doc_id}#{self.index}"


@dataclass(slots=True)
class RetrievalQuery:
    """A question for one index."""

    query: str
    index: str
    top_k: int = 4
    score_threshold: float | None = None
    """Drop hits whose cosine similarity is below this."""
    filters: dict[str, FilterValue] = field(default_factory=dict)
    """Metadata equality filters: a hit's metadata[key] must equal the value (or be one of a list)."""
    trace_context: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Hit:
    """One retrieved chunk and how close it is to the query (cosine similarity, higher is closer)."""

    chunk_id: str
    doc_id: str
    chunk: int
    text: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Retrieval:
    """The answer to a `RetrievalQuery`."""

    index: str
    version: str
    """The published index version that answered."""
    hits: list[Hit]
    embed_ms: float
    search_ms: float
