"""What crosses the retriever's boundary: documents and chunks in, queries in, hits out.

Plain slotted dataclasses, like the tier messages: cheap to pickle across a Ray handle call and
free of HTTP shapes. A chunk's id is `<doc_id>#<n>`, stable for as long as the document's text
is, so citations can be checked against the index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from tierserve.core.errors import TierServeError


class IndexUnavailable(TierServeError):
    """The request names an index the store does not have, or one its API key may not read: the
    two answers are the same (404), so a caller learns no index's name from it."""

    status_code = 404
    default_code = "index_not_found"

    @classmethod
    def named(cls, name: str) -> IndexUnavailable:
        return cls(f"no index named {name!r}", "retrieval.index")


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""What SQLite (the chunk table a filter is matched in) can bind as an integer."""


def _bindable(value: Any) -> Any:
    """An integer SQLite cannot bind is refused, not silently made a float."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        raise ValueError("integers must fit in 64 bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


FilterScalar = Annotated[
    Annotated[str, Field(max_length=1024)] | bool | int | float,
    BeforeValidator(_bindable),
]
"""One value a metadata filter compares with: bounded so that the store can bind it."""
FilterValue = FilterScalar | Annotated[list[FilterScalar], Field(min_length=1, max_length=64)]

MAX_INDEX_NAME_CHARS = 128


def check_index_name(name: str) -> str:
    """`name` if it can name an index directory, else `ValueError` saying what a name may hold."""
    if (
        not name
        or len(name) > MAX_INDEX_NAME_CHARS
        or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)
        or name.startswith(".")
    ):
        raise ValueError(
            f"index name {name[:MAX_INDEX_NAME_CHARS]!r} must be 1-{MAX_INDEX_NAME_CHARS} ASCII letters, digits, "
            "'-', '_' or '.', not starting with '.'"
        )
    return name


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


@dataclass(slots=True)
class Embedded:
    """Texts' vectors from the retriever's embedder (`POST /v1/embeddings`)."""

    model: str
    vectors: Any
    """numpy float32, shape (texts, dimension), each row of unit L2 norm."""
    tokens: int
    """The texts' tokens in the embedder's tokenizer, special tokens included."""


class InputTooLong(TierServeError):
    """A text longer than the embedder reads: refused, not silently truncated (400)."""

    default_code = "context_length_exceeded"
