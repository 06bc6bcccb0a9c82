"""Config of retrieval: the embedder, chunking, the index store and the retriever deployment."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tierserve.core.config import DeploymentOptions
from tierserve.rag.types import FilterValue, check_index_name

IndexType = Literal["auto", "flat", "hnsw", "ivf_flat", "ivf_pq"]


class EmbedderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "all-MiniLM-L6-v2"
    """`all-MiniLM-L6-v2` (bundled, offline) or the directory of any sentence-transformers model."""
    batch_size: int = Field(64, ge=1)
    device: str | None = None
    """`cpu`, `cuda`, ...; None: a GPU when one is present."""


class ChunkingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(200, ge=16)
    """Tokens per chunk, in the embedder's tokenizer (MiniLM reads at most 256)."""
    overlap_tokens: int = Field(40, ge=0)
    """Tokens each chunk repeats from the end of the one before."""

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingConfig:
        if self.overlap_tokens >= self.max_tokens:
            raise ValueError("overlap_tokens must be smaller than max_tokens")
        return self


class IndexConfig(BaseModel):
    """Which FAISS index holds the vectors (docs/rag.md compares them)."""

    model_config = ConfigDict(extra="forbid")

    type: IndexType = "auto"
    """`auto`: exact `flat` below `flat_below` chunks, `hnsw` above."""
    flat_below: int = Field(50_000, ge=0)
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_construction: int = Field(80, ge=8)
    hnsw_ef_search: int = Field(256, ge=1)
    """Candidates HNSW keeps while searching: recall for time (docs/benchmarks/rag-benchmark.md)."""
    ivf_nlist: int | None = Field(None, ge=1)
    """Inverted lists; None: about sqrt(chunks)."""
    ivf_nprobe: int = Field(64, ge=1)
    """Lists an IVF search scans: recall for time."""
    pq_m: int | None = Field(None, ge=1)
    """Sub-quantizers of `ivf_pq` (must divide the dimension); None: dimension / 8."""
    pq_rerank: int = Field(4, ge=1)
    """`ivf_pq` fetches top_k times this many candidates and re-scores them exactly from the
    stored vectors; 1: quantised scores only."""
    use_gpu: bool | None = None
    """Search on a GPU (faiss-gpu): None when one is present; `hnsw` always searches on the CPU."""


class RetrievalOptions(BaseModel):
    """What a request asks of retrieval (the `retrieval` request field), or a route's default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    index: str | None = None
    """None: `rag.default_index`."""
    top_k: int | None = Field(None, ge=1, le=50)
    score_threshold: float | None = Field(None, ge=-1, le=1)
    filters: dict[Annotated[str, Field(min_length=1, max_length=128)], FilterValue] = Field(
        default_factory=dict, max_length=16
    )
    """Metadata key → value (or any of a list of values) a chunk must have."""

    @field_validator("index")
    @classmethod
    def _index_name(cls, v: str | None) -> str | None:
        return None if v is None else check_index_name(v)


class BundledCorpus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str = "tierserve-docs"
    build_on_start: bool = True
    """Build the index from the handbook shipped in `configs/rag/corpus/` on start (a no-op when
    the store has it up to date)."""


class RagConfig(BaseModel):
    """Retrieval-augmented generation (docs/rag.md)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    """Run the retriever deployment; requests asking for retrieval get a 400 while it is off."""
    store: str | None = None
    """The index store directory; None: `<model cache>/indexes`."""
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    bundled: BundledCorpus | None = Field(default_factory=BundledCorpus)
    """The corpus the embedded default serves; None: none."""
    default_index: str = "tierserve-docs"
    top_k: int = Field(4, ge=1, le=50)
    score_threshold: float | None = Field(0.2, ge=-1, le=1)
    routes: dict[Literal["chat", "completions"], RetrievalOptions] = Field(default_factory=dict)
    """Retrieval every request on that route gets unless it says `retrieval: false`."""
    reload_interval_s: float = Field(1.0, gt=0)
    """How often the retriever checks the store for a newly published index version."""
    grounding_threshold: float = Field(0.5, ge=-1, le=1)
    """An answer sentence counts as supported when its cosine similarity to some cited chunk reaches this."""
    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.25, max_ongoing_requests=64)
    )
