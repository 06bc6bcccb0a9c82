"""`POST /v1/embeddings` through the real stack: the retriever's sentence-transformers model
behind the official `openai` client (base64, its default), plain HTTP (float), the handle API
and langchain-openai's `OpenAIEmbeddings`; refusals name the field."""

from __future__ import annotations

import numpy as np
import openai
import pytest

pytestmark = pytest.mark.integration

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["The capital of France is Paris.", "Rivers flow to the sea.", "Paris is France's capital city."]


@pytest.fixture(scope="module")
def embedder():
    from tierserve.core.embedder import Embedder

    return Embedder(MODEL, "cpu")


def test_the_openai_client_gets_the_embedders_vectors(client, embedder):
    result = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64 and decodes it
    vectors = np.array([d.embedding for d in sorted(result.data, key=lambda d: d.index)], dtype=np.float32)
    assert vectors.shape == (3, embedder.dimension) and result.model == MODEL
    np.testing.assert_allclose(vectors, embedder.encode(TEXTS), atol=1e-5)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[2] > vectors[0] @ vectors[1]  # meaning, not noise
    assert result.usage.prompt_tokens == result.usage.total_tokens == sum(embedder.token_counts(TEXTS))


def test_float_encoding_one_text_and_the_model_list(http, client):
    body = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[0], "encoding_format": "float"}).json()
    (item,) = body["data"]
    assert body["object"] == "list" and item["object"] == "embedding" and item["index"] == 0
    assert all(isinstance(x, float) for x in item["embedding"]) and len(item["embedding"]) == 384
    assert MODEL in {m.id for m in client.models.list()}


def test_embeddings_through_the_handle_api(app, ingress_handle, embedder):
    from tierserve.router.client import TierServeClient

    result = ingress_handle.embeddings.remote({"model": MODEL, "input": TEXTS[:2]}).result()
    np.testing.assert_allclose([d.embedding for d in result.data], embedder.encode(TEXTS[:2]), atol=1e-5)
    typed = TierServeClient(app.name).embeddings(model=MODEL, input=TEXTS[:2])
    assert [d.embedding for d in typed.data] == [d.embedding for d in result.data]


@pytest.mark.parametrize(
    "fields, status, param, text",
    [
        ({"dimensions": 128}, 400, "dimensions", "cannot shorten"),
        ({"input": [[101, 2023]]}, 400, "input", "token ids are not accepted"),
        ({"input": []}, 400, "input", "must not be empty"),
        ({"input": ["fine", "word " * 400]}, 400, "input.1", "reads at most 256"),
        ({"input": ["x"] * 2049}, 400, "input", "max_embedding_inputs"),
        ({"encoding_format": "int8"}, 400, "encoding_format", "float"),
        ({"model": "text-embedding-3-small"}, 404, "model", MODEL),
    ],
)
def test_refusals_name_the_field(http, fields, status, param, text):
    r = http.post("/v1/embeddings", json={"model": MODEL, "input": "hello", **fields})
    error = r.json()["error"]
    assert r.status_code == status and error["param"] == param and text in error["message"], error


def test_langchain_openai_embeddings(app, embedder):
    """An agent framework's embeddings client, as users configure it for OpenAI-compatible servers."""
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(
        model=MODEL, base_url=app.openai_base, api_key="unused", check_embedding_ctx_length=False, max_retries=0
    )
    np.testing.assert_allclose(lc.embed_documents(TEXTS), embedder.encode(TEXTS), atol=1e-5)
    np.testing.assert_allclose(lc.embed_query(TEXTS[0]), embedder.encode(TEXTS[:1])[0], atol=1e-5)


def test_an_unknown_embedding_model_through_the_client(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="auto", input="hello")
