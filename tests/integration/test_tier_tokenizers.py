"""Tiers that tokenize differently: a service whose tiers are different architectures with
different tokenizers (a tiny Qwen2 with a 320-entry byte-level BPE of its own, `narrow`, and a
tiny Llama with the embedded model's 49,152-entry tokenizer, `wide`).

The router estimates a prompt's length from its characters, before any tier has tokenized it;
each tier then counts with its own tokenizer. These tests hold the service to what a caller
sees: usage counted by the tier that served, a prompt too long for one tier's tokenizer
served by the next, and a clear 400 when the caller named that tier; the same for a prompt
that retrieved passages make too long for the finer tokenizer.
"""

from __future__ import annotations

import httpx
import pytest

from tierserve.actors import fidelity
from tierserve.router.routing import CHARS_PER_TOKEN  # the router's estimate of a prompt's tokens

from .conftest import REPO
from .test_tier_shapes import deploy, tier
from .tiny_models import build_tiny_llama, build_tiny_qwen2

pytestmark = pytest.mark.integration

APP = "tokenizers"
NARROW_CONTEXT = 512
WIDE_CONTEXT = 1024


@pytest.fixture(scope="module")
def service(app, tmp_path_factory):
    from ray import serve
    from transformers import AutoTokenizer

    from tierserve.actors.checkpoints import prepare_embedded

    root = tmp_path_factory.mktemp("tokenizers")
    corpus = [p.read_text() for p in sorted((REPO / "configs" / "rag" / "corpus").glob("*.md"))]
    narrow = build_tiny_qwen2(root / "narrow", corpus, vocab=320, hidden=128, layers=2, seed=0)
    embedded = prepare_embedded("smollm2-135m-instruct", progress=False)
    wide = build_tiny_llama(root / "wide", embedded, hidden=128, layers=2, heads=4, kv_heads=2, seed=1)
    narrow_tier, wide_tier = tier("narrow", narrow), tier("wide", wide)
    narrow_tier["engine"]["max_model_len"] = NARROW_CONTEXT
    wide_tier["engine"]["max_model_len"] = WIDE_CONTEXT
    # Retrieval from the bundled handbook's index, which the shared app's retriever built.
    rag = {"enabled": True, "deployment": {"num_cpus": 0}}
    client, base = deploy(app, APP, [narrow_tier, wide_tier], rag=rag)
    tokenizers = {"narrow": AutoTokenizer.from_pretrained(narrow), "wide": AutoTokenizer.from_pretrained(wide)}
    yield client, base, tokenizers
    serve.delete(APP)


def chat_tokens(tokenizer, content: str) -> int:
    """The prompt tokens of `content` as the only user turn, counted as a tier counts them."""
    return len(fidelity.prompt_token_ids(tokenizer, [content])[0])


def test_each_tier_counts_the_prompt_with_its_own_tokenizer(service):
    client, _, tokenizers = service
    content = "How does tierserve choose a tier for a request?"
    counts = {}
    for name, tokenizer in tokenizers.items():
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0
        )
        assert reply.model_extra["tierserve"]["tier"] == name
        counts[name] = reply.usage.prompt_tokens
        assert counts[name] == chat_tokens(tokenizer, content)
    assert counts["narrow"] != counts["wide"]
    # The small vocabulary cuts the text itself finer (the templates differ too: SmolLM2's adds
    # a system turn, ChatML does not).
    bare = {name: len(t.encode(content, add_special_tokens=False)) for name, t in tokenizers.items()}
    assert bare["narrow"] >= 2 * bare["wide"]


def test_a_prompt_too_long_for_one_tokenizer_goes_to_the_tier_that_takes_it(service):
    client, base, tokenizers = service
    # Text the router's estimate fits into `narrow` but narrow's tokenizer does not.
    paragraph = (REPO / "configs" / "rag" / "corpus" / "model-tiers.md").read_text()
    content = paragraph[: CHARS_PER_TOKEN * (NARROW_CONTEXT - 64)]
    assert len(content) // CHARS_PER_TOKEN + 8 < NARROW_CONTEXT < chat_tokens(tokenizers["narrow"], content)
    assert chat_tokens(tokenizers["wide"], content) + 8 < WIDE_CONTEXT

    body = {"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    routing = r.json()["tierserve"]
    assert routing["tier"] == "wide"
    assert routing["fallback_from"] == [{"tier": "narrow", "error": "context_length_exceeded"}]
    assert r.headers["x-tierserve-fallback-from"] == "narrow"

    # Named, the tier that cannot take it says so: a 400 naming the field, not a 500.
    r = httpx.post(f"{base}/v1/chat/completions", json={**body, "model": "narrow"}, timeout=300)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages", error


def test_retrieved_passages_too_long_for_the_finer_tokenizer_go_to_the_next_tier(service):
    """The router counts each retrieved passage as the chunker's largest (in the embedder's
    tokens, plus 40), which fits two into `narrow`; narrow's own tokenizer cuts them finer, and
    its engine refuses the grounded prompt. `auto` goes on to `wide`; named, `narrow` answers
    400."""
    from tierserve.rag.config import ChunkingConfig

    question = "How are tiers chosen?"
    passages = 2 * (ChunkingConfig().max_tokens + 40)
    assert len(question) // CHARS_PER_TOKEN + passages + 8 < NARROW_CONTEXT
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 8,
        "retrieval": {"top_k": 2, "score_threshold": -1},
    }
    _, base, _ = service
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    routing = r.json()["tierserve"]
    assert len(routing["retrieval"]["citations"]) == 2
    assert routing["tier"] == "wide"
    assert routing["fallback_from"] == [{"tier": "narrow", "error": "context_length_exceeded"}]

    r = httpx.post(f"{base}/v1/chat/completions", json={**body, "model": "narrow"}, timeout=300)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages", error
