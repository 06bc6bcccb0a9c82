"""Retrieval-augmented generation through the real stack: the shared app's retriever serves the
bundled handbook (built on its first start), the official OpenAI client asks with `retrieval`,
and answers come back with citations and a grounding score; an index re-ingested while the
service runs is served without a restart."""

from __future__ import annotations

import secrets
import shutil

import httpx
import openai
import pytest

from tierserve.rag.ingest import bundled_corpus
from tierserve.rag.loaders import load_documents

from .conftest import wait_for

pytestmark = pytest.mark.integration

QUESTION = "How do I send a latency budget with my request?"
INDEX = "tierserve-docs"


def ask(client, content: str, stream: bool = False, **body):
    return client.chat.completions.with_raw_response.create(
        model="small",
        messages=[{"role": "user", "content": content}],
        max_tokens=48,
        temperature=0,
        stream=stream,
        extra_body=body,
    )


def check_citations(retrieval: dict, threshold: float = 0.2) -> list[dict]:
    citations = retrieval["citations"]
    scores = [c["score"] for c in citations]
    assert scores == sorted(scores, reverse=True) and all(s >= threshold for s in scores)
    for n, c in enumerate(citations, 1):
        assert c["ref"] == n and c["chunk_id"] == f"{c['doc_id']}#{c['chunk']}"
        assert c["source"] == c["doc_id"] and c["title"] and isinstance(c["cited"], bool)
    return citations


def test_a_chat_with_retrieval_is_answered_from_the_handbook_with_citations(client):
    raw = ask(client, QUESTION, retrieval=True)
    body = raw.parse()
    retrieval = body.model_extra["tierserve"]["retrieval"]
    assert retrieval["index"] == INDEX and retrieval["version"].startswith("v")
    citations = check_citations(retrieval)
    assert 1 <= len(citations) <= 4 and citations[0]["doc_id"] == "sla-budgets.md"
    assert body.choices[0].message.content
    grounding = retrieval["grounding"]
    assert set(grounding) == {"score", "lexical", "sentences", "supported"}
    assert grounding["score"] is None or 0 <= grounding["score"] <= 1
    assert 0 <= grounding["supported"] <= grounding["sentences"]
    # The passages went into the prompt: the same question without retrieval is far shorter.
    plain = ask(client, QUESTION).parse()
    assert body.usage.prompt_tokens > plain.usage.prompt_tokens + 100
    assert "retrieval" not in plain.model_extra["tierserve"]


def test_a_streamed_answer_carries_citations_on_its_last_chunk(client):
    chunks = list(ask(client, "What is speculative decoding with a draft model?", stream=True, retrieval=True).parse())
    marked = [c for c in chunks if c.model_extra.get("tierserve")]
    assert len(marked) == 1 and marked[0] is chunks[-1]
    retrieval = marked[0].model_extra["tierserve"]["retrieval"]
    assert check_citations(retrieval)[0]["doc_id"] == "speculative-decoding.md"
    assert "grounding" in retrieval
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_filters_threshold_and_a_question_no_chunk_matches(client):
    operator_docs = {d.doc_id for d in load_documents(bundled_corpus()) if d.metadata.get("audience") == "operator"}
    # Eight passages make a long prompt: on a slow CPU the router predicts its first token past
    # three times the default class's budget and sheds it, so it asks as `batch` (no budget).
    filtered = {"top_k": 8, "filters": {"audience": "operator"}}
    body = ask(client, QUESTION, retrieval=filtered, sla_class="batch").parse()
    citations = check_citations(body.model_extra["tierserve"]["retrieval"])
    assert citations and {c["doc_id"] for c in citations} <= operator_docs

    # Nothing in the handbook is this close to a bread recipe: no passages, prompt unchanged.
    bread = "What is a good recipe for sourdough bread?"
    body = ask(client, bread, retrieval={"score_threshold": 0.5}).parse()
    retrieval = body.model_extra["tierserve"]["retrieval"]
    assert retrieval["citations"] == [] and retrieval["grounding"] is None
    assert body.usage.prompt_tokens == ask(client, bread).parse().usage.prompt_tokens


def test_a_completion_with_retrieval_cites_too(client):
    body = client.completions.create(
        model="small",
        prompt="Question: which HTTP status does tierserve return when every tier is full?\nAnswer:",
        max_tokens=24,
        temperature=0,
        extra_body={"retrieval": {"top_k": 3}},
    )
    citations = check_citations(body.model_extra["tierserve"]["retrieval"])
    assert "fallback-shedding.md" in {c["doc_id"] for c in citations}


def test_bad_retrieval_requests_are_clear_errors(client):
    with pytest.raises(openai.NotFoundError) as missing:
        ask(client, QUESTION, retrieval={"index": "no-such-index"})
    error = missing.value.body
    assert error["code"] == "index_not_found" and error["param"] == "retrieval.index"
    assert INDEX not in error["message"]  # no index is named to a caller who asked for another
    with pytest.raises(openai.BadRequestError) as bad:
        ask(client, QUESTION, retrieval={"top_k": 0})
    assert bad.value.body["param"] == "retrieval.top_k"
    with pytest.raises(openai.BadRequestError) as bad:
        ask(client, QUESTION, retrieval={"filters": {"bad key'": "x"}})
    assert bad.value.body["param"] == "retrieval.filters"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="small", prompt=[1, 2, 3], max_tokens=2, extra_body={"retrieval": True})
    assert bad.value.body["param"] == "prompt"


def test_handle_calls_and_the_index_listing(app, http, ingress_handle):
    whole = ingress_handle.chat.remote(
        {"model": "small", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "retrieval": True}
    ).result(timeout_s=120)
    assert whole.tierserve["retrieval"]["citations"][0]["doc_id"] == "sla-budgets.md"
    listing = http.get("/v1/indexes").json()["data"]
    (docs,) = [i for i in listing if i["index"] == INDEX]
    assert docs["documents"] == 14 and docs["chunks"] > 14 and docs["served_version"] == docs["version"]
    assert docs["embedder"] == "all-MiniLM-L6-v2" and docs["dimension"] == 384


def test_reingesting_while_serving_publishes_without_a_restart(client, tmp_path):
    """`tierserve rag ingest` into the service's store: the next queries see the new version."""
    from tierserve.cluster.config import load_config
    from tierserve.core.config import default_cache_dir
    from tierserve.rag.retriever import default_store

    store_dir = default_store(load_config(check_engine=False).rag, default_cache_dir())
    index = f"test-reload-{secrets.token_hex(4)}"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    page = corpus / "orion.md"
    page.write_text("# Orion\n\nThe Orion cluster's maintenance window is on Tuesdays at 02:00 UTC.\n")
    question = "When is the Orion cluster's maintenance window?"

    def ingest() -> None:
        from tierserve.cluster.cli import main

        assert main(["rag", "ingest", str(corpus), "--index", index, "--store", str(store_dir)]) == 0

    try:
        ingest()
        first = ask(client, question, retrieval={"index": index}).parse().model_extra["tierserve"]["retrieval"]
        assert [c["doc_id"] for c in first["citations"]] == ["orion.md"]

        page.write_text("# Orion\n\nThe Orion cluster's maintenance window moved to Thursdays at 04:00 UTC.\n")
        ingest()

        def served():
            retrieval = ask(client, question, retrieval={"index": index}).parse().model_extra["tierserve"]["retrieval"]
            return retrieval if retrieval["version"] != first["version"] else None

        second = wait_for(served, timeout=30, interval=0.5)
        assert second, "the service kept answering from the old version"
        assert second["citations"][0]["doc_id"] == "orion.md"
    finally:
        shutil.rmtree(store_dir / index, ignore_errors=True)


def test_retrieval_metrics_are_exported(app, client):
    ask(client, QUESTION, retrieval=True)

    def series():
        text = httpx.get(app.metrics, timeout=10).text
        names = (
            "ray_tierserve_retrieval_seconds_bucket",
            "ray_tierserve_retrieval_hits_bucket",
            "ray_tierserve_grounding_score_bucket",
        )
        return all(any(line.startswith(n) and f'index="{INDEX}"' in line for line in text.splitlines()) for n in names)

    assert wait_for(series, timeout=30, interval=1), "retrieval metrics never reached the metrics endpoint"
