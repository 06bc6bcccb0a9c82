"""Ingestion with the real embedder and chunker, retrieval relevance on the project's labelled
queries, grounding, the prompt template and how a request's retrieval options resolve. No Ray."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from tierserve.actors.types import GenerateRequest
from tierserve.core.errors import InvalidRequest
from tierserve.core.types import ChatMessage
from tierserve.rag.chunking import Chunker
from tierserve.rag.config import ChunkingConfig, IndexConfig, RagConfig, RetrievalOptions
from tierserve.rag.grounding import grounding, lexical_support, sentences
from tierserve.rag.ingest import bundled_corpus, ingest
from tierserve.rag.loaders import load_documents, load_text
from tierserve.rag.prompt import INSTRUCTION, augment_messages, augment_prompt, cited_numbers
from tierserve.rag.snapshot import IndexMismatch
from tierserve.rag.store import IndexStore
from tierserve.rag.types import Hit
from tierserve.router.protocol import ChatCompletionRequest, CompletionRequest
from tierserve.router.retrieval_step import RetrievalStep, Retrieved, question_of


@pytest.fixture(scope="module")
def embedder():
    from tierserve.core.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="module")
def chunker() -> Chunker:
    return Chunker(ChunkingConfig())


@pytest.fixture(scope="module")
def handbook(tmp_path_factory, embedder, chunker) -> IndexStore:
    store = IndexStore(tmp_path_factory.mktemp("indexes"))
    ingest(load_documents(bundled_corpus()), "handbook", store, embedder, chunker, IndexConfig())
    return store


def relevance_set(split: str) -> list[dict]:
    path = Path(str(resources.files("tierserve.configs").joinpath("rag", "relevance.jsonl")))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == split]


def test_retrieval_relevance_on_held_out_queries(handbook: IndexStore, embedder) -> None:
    """The bundled handbook answers the held-out labelled questions: a relevant page in the top
    4 for most, first for many (measured: hit@4 0.91, MRR 0.78; docs/rag.md)."""
    snapshot = handbook.open("handbook")
    answerable = [r for r in relevance_set("heldout") if r["relevant"]]
    assert len(answerable) >= 30
    reciprocal, hit4 = [], 0
    for row in answerable:
        docs = [h.doc_id for h in snapshot.search(embedder.encode([row["query"]])[0], 10)]
        rank = next((i + 1 for i, d in enumerate(docs) if d in row["relevant"]), None)
        reciprocal.append(1 / rank if rank else 0.0)
        hit4 += rank is not None and rank <= 4
    assert hit4 / len(answerable) >= 0.85
    assert np.mean(reciprocal) >= 0.7


def test_reingesting_skips_unchanged_updates_changed_and_prunes(tmp_path: Path, embedder, chunker) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(bundled_corpus(), corpus)
    store = IndexStore(tmp_path / "indexes")
    first = ingest(load_documents(corpus), "h", store, embedder, chunker, IndexConfig())
    assert len(first.added) == 14 and first.chunks_added == first.chunks_total > 14
    again = ingest(load_documents(corpus), "h", store, embedder, chunker, IndexConfig())
    assert again.version == first.version and again.unchanged == 14 and again.chunks_added == 0

    page = corpus / "glossary.md"
    page.write_text(page.read_text() + "\n\n## Zebra\n\nA zebra deployment answers only on Tuesdays.\n")
    (corpus / "cli.md").unlink()
    updated = ingest(load_documents(corpus), "h", store, embedder, chunker, IndexConfig())
    assert updated.updated == ["glossary.md"] and updated.deleted == [] and updated.unchanged == 12
    assert updated.version != first.version
    snapshot = store.open("h")
    assert "cli.md" in snapshot.documents()  # not pruned without prune=True
    hit = snapshot.search(embedder.encode(["which deployment answers only on Tuesdays?"])[0], 1)[0]
    assert hit.doc_id == "glossary.md" and "Tuesdays" in hit.text

    pruned = ingest(load_documents(corpus), "h", store, embedder, chunker, IndexConfig(), prune=True)
    assert pruned.deleted == ["cli.md"] and pruned.chunks_deleted > 0
    assert "cli.md" not in store.open("h").documents()


def test_duplicate_chunks_are_dropped_across_documents(tmp_path: Path, embedder, chunker) -> None:
    text = "Tierserve sheds load with a 429 and a Retry-After header when every tier is full."
    docs = [load_text("a.txt", text), load_text("b.txt", text), load_text("c.txt", text + " Also 503.")]
    report = ingest(docs, "d", IndexStore(tmp_path), embedder, chunker, IndexConfig())
    assert report.duplicates == 1 and report.chunks_total == 2


def test_an_index_built_with_another_embedder_is_refused(tmp_path: Path, embedder, chunker) -> None:
    from tierserve.core.embedder import Embedder

    store = IndexStore(tmp_path)
    ingest([load_text("a.txt", "some text to index")], "d", store, embedder, chunker, IndexConfig())
    shorter = Embedder(max_seq_length=64)  # other vectors: the signature says so
    with pytest.raises(IndexMismatch, match="--rebuild"):
        ingest([load_text("b.txt", "more text")], "d", store, shorter, chunker, IndexConfig())
    ingest([load_text("b.txt", "more text")], "d", store, shorter, chunker, IndexConfig(), rebuild=True)
    assert store.manifest("d").embedder_signature == shorter.signature
    assert store.manifest("d").documents == 1


def hit(n: int, text: str, **metadata) -> Hit:
    return Hit(f"doc{n}.md#0", f"doc{n}.md", 0, text, 0.5, metadata)


PASSAGES = [
    "The small tier serves short prompts with a 2048-token context and no speculation.",
    "The quality tier uses speculative decoding with a distilled draft model and an 8k context.",
]


def test_grounding_separates_supported_from_unsupported_answers(embedder) -> None:
    def score(answer: str) -> float:
        judged = sentences(answer)
        result = grounding(answer, PASSAGES, embedder.encode(judged), embedder.encode(PASSAGES), 0.5)
        assert result.sentences == len(judged)
        return result.score

    supported = (
        "The quality tier uses speculative decoding with a distilled draft [2]. "
        "The small tier has a 2048-token context [1]."
    )
    unsupported = "Bananas are rich in potassium and grow in tropical climates. Paris is the capital of France."
    assert score(supported) >= 0.9
    assert score(unsupported) <= 0.1
    assert sentences("Yes. [1]") == []
    assert lexical_support(supported, PASSAGES) > 0.7 > 0.2 > lexical_support(unsupported, PASSAGES)
    empty = grounding("Ok.", PASSAGES, embedder.encode([]), embedder.encode(PASSAGES), 0.5)
    assert empty.score is None and empty.sentences == 0


def test_prompt_puts_numbered_passages_before_the_question() -> None:
    hits = [hit(1, "First passage.", title="One"), hit(2, "Second passage.")]
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello"),
        ChatMessage("user", "What is in the passages?"),
    ]
    out = augment_messages(messages, hits)
    assert out[:3] == messages[:3] and messages[3].content == "What is in the passages?"  # input untouched
    text = out[3].content
    assert text.startswith(INSTRUCTION)
    assert text.index("[1] doc1.md#0 (One)\nFirst passage.") < text.index("[2] doc2.md#0\nSecond passage.")
    assert text.endswith("Question: What is in the passages?")
    assert augment_messages(messages, []) is messages
    assert augment_prompt("Q: why?", hits).endswith("Second passage.\n\nQ: why?")
    assert cited_numbers("As [2] says, and [1], [2] again, not [7] or [0].", 2) == [2, 1]


class NoRetriever:
    """Stands in for the retriever's handle where only option resolution runs (never called)."""


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "auto", "messages": [{"role": "user", "content": "What is TTFT?"}], **fields}
    )


def test_retrieval_options_resolve_from_request_route_and_config() -> None:
    config = RagConfig(
        enabled=True,
        default_index="handbook",
        top_k=4,
        score_threshold=0.2,
        routes={"chat": RetrievalOptions(top_k=6, filters={"audience": "user"})},
    )
    step = RetrievalStep(config, NoRetriever())
    # The chat route's default applies unless the request turns it off.
    assert step.options(chat(), "chat") == RetrievalOptions(
        index="handbook", top_k=6, score_threshold=0.2, filters={"audience": "user"}
    )
    assert step.options(chat(retrieval=False), "chat") is None
    assert step.options(chat(), "completions") is None
    # A request's own fields win over the route's.
    assert step.options(chat(retrieval={"index": "other", "top_k": 2, "filters": {}}), "chat") == RetrievalOptions(
        index="other", top_k=2, score_threshold=0.2, filters={}
    )
    prompt = CompletionRequest.model_validate({"model": "auto", "prompt": "TTFT?", "retrieval": True})
    assert step.options(prompt, "completions") == RetrievalOptions(index="handbook", top_k=4, score_threshold=0.2)
    assert question_of(prompt) == "TTFT?" and question_of(chat()) == "What is TTFT?"
    with pytest.raises(InvalidRequest, match="token ids"):
        question_of(CompletionRequest.model_validate({"model": "auto", "prompt": [1, 2], "retrieval": True}))
    off = RetrievalStep(RagConfig(enabled=False), None)
    assert off.options(chat(), "chat") is None
    with pytest.raises(InvalidRequest, match="not enabled") as refused:
        off.options(chat(retrieval=True), "chat")
    assert refused.value.code == "retrieval_disabled"


def test_augmenting_a_request_keeps_the_callers_copy_and_reports_citations() -> None:
    hits = [hit(1, "Alpha."), hit(2, "Beta.")]
    from tierserve.rag.types import Retrieval

    retrieved = Retrieved(RetrievalOptions(index="h", top_k=2), Retrieval("h", "v1", hits, 1.0, 1.0))
    request = GenerateRequest("r1", messages=[ChatMessage("user", "Which?")])
    augmented = RetrievalStep.augment(request, retrieved)
    assert request.messages[0].content == "Which?" and "Alpha." in augmented.messages[0].content
    completion = RetrievalStep.augment(GenerateRequest("r2", prompt="Which?"), retrieved)
    assert completion.prompt.endswith("Which?") and "Beta." in completion.prompt
    retrieved.answer = "Beta it is [2]."
    citations = retrieved.citations()
    assert [(c["ref"], c["chunk_id"], c["cited"]) for c in citations] == [
        (1, "doc1.md#0", False),
        (2, "doc2.md#0", True),
    ]
    assert retrieved.extension()["version"] == "v1"


def test_metric_instruments_are_valid_for_ray() -> None:
    """Ray checks names, tags and bucket bounds when an instrument is made: make them here."""
    from tierserve.rag.metrics import GroundingMetrics, RetrieverMetrics

    retriever, answers = RetrieverMetrics(), GroundingMetrics()
    retriever.observe("handbook", 0.004, 0.001, 0)
    answers.score.observe(0.7, {"index": "handbook", "tier": "small"})
    assert retriever.hits.boundaries[0] == 0.5
