"""Traces end to end: a real OTLP/HTTP receiver gets, for each request, the ingress span, the
routing decision, the tier's generation span (GenAI conventions) and one span per token, one
tree across the ingress and tier processes, continuing the client's `traceparent`.

The app here has its own `telemetry` block pointing at the receiver, a retriever (the bundled
handbook), a PII guard on input and output, and two tiers on a tiny random-weight checkpoint
(fast to start): `traced` makes a span per token and speculates with n-gram lookup; `sampled`
makes one per 4 tokens.
"""

from __future__ import annotations

import math
import secrets

import pytest
from openai import OpenAI

from .conftest import run_app
from .tiny_models import build_tiny_llama, tiny_tier

pytestmark = pytest.mark.integration

APP = "traced"
SERVER = 2  # OTLP SpanKind values
ECHO = [{"role": "user", "content": "Repeat exactly: one two three four, one two three four."}]


@pytest.fixture(scope="module")
def traced(app, receiver, tmp_path_factory):
    from ray import serve

    from tierserve.actors.checkpoints import prepare_embedded
    from tierserve.cluster.app import build_application
    from tierserve.cluster.config import parse_config

    tokenizer = prepare_embedded("smollm2-135m-instruct", progress=False)
    target = build_tiny_llama(
        tmp_path_factory.mktemp("tiny") / "target", tokenizer, hidden=64, layers=1, heads=2, kv_heads=2, seed=0
    )
    config = parse_config(
        {
            "name": APP,
            "tiers": [
                tiny_tier("traced", target, speculative={"method": "ngram", "num_speculative_tokens": 3}),
                tiny_tier("sampled", target, token_spans=4),
            ],
            "ingress": {"deployment": {"num_cpus": 0}},
            "rag": {"enabled": True, "deployment": {"num_cpus": 0}},
            "safety": {
                "enabled": True,
                "guards": [{"type": "pii", "actions": {"input": "redact", "output": "redact"}}],
            },
            "telemetry": {"exporter": "otlp", "endpoint": receiver.endpoint, "batch_delay_ms": 100, "token_text": True},
        }
    )
    base = run_app(app, build_application(config), APP)
    yield OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    serve.delete(APP)


def by_name(spans, name):
    return [s for s in spans if s.name == name]


def test_a_streamed_chat_is_one_trace_from_the_clients_span_to_every_token(traced, receiver):
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    raw = traced.chat.completions.with_raw_response.create(
        model="traced",
        messages=ECHO,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        extra_headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
    )
    assert raw.headers["x-trace-id"] == trace_id
    assert raw.headers["traceresponse"].startswith(f"00-{trace_id}-")
    chunks = list(raw.parse())
    usage = chunks[-1].usage
    n = usage.completion_tokens
    assert n == 20

    spans = receiver.wait_for(
        trace_id, lambda s: len(by_name(s, "token")) >= n and by_name(s, "POST /v1/chat/completions")
    )
    (http,) = by_name(spans, "POST /v1/chat/completions")
    (route,) = by_name(spans, "route")
    (chat,) = by_name(spans, "chat traced")
    tokens = sorted(by_name(spans, "token"), key=lambda s: s.attributes["tierserve.token.index"])

    # One tree across two processes, under the client's span.
    assert http.parent_span_id == client_span and http.kind == SERVER
    assert route.parent_span_id == http.span_id and chat.parent_span_id == http.span_id
    assert all(t.parent_span_id == chat.span_id for t in tokens)
    assert http.resource["tierserve.component"] == "ingress" and chat.resource["tierserve.component"] == "tier"
    assert chat.resource["tierserve.tier"] == "traced" and chat.resource["service.name"] == "tierserve"
    assert http.resource["process.pid"] != chat.resource["process.pid"]
    assert raw.headers["traceresponse"] == f"00-{trace_id}-{http.span_id}-01"

    assert http.attributes["http.request.method"] == "POST"
    assert http.attributes["http.response.status_code"] == 200 and http.start_ns <= chat.start_ns
    route_attributes = {k: v for k, v in route.attributes.items() if not k.startswith("tierserve.route.predicted")}
    assert route_attributes == {
        "tierserve.route.requested_model": "traced",
        "tierserve.route.tier": "traced",
        "tierserve.route.reason": "named",
        "tierserve.route.candidates": ["traced"],
        "tierserve.route.sla_class": "standard",
        "tierserve.route.priority": 1,
    }
    a = chat.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "tierserve"
    assert a["gen_ai.request.model"] == "traced" and a["gen_ai.request.max_tokens"] == 20
    assert a["gen_ai.request.temperature"] == 0 and a["gen_ai.request.top_p"] == 1
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.usage.input_tokens"] == usage.prompt_tokens and a["gen_ai.usage.output_tokens"] == n
    assert a["tierserve.speculation.method"] == "ngram" and a["tierserve.token_spans"] == n
    assert "first_token" in chat.events

    # A span per token, in order, each from the previous token's arrival to its own.
    assert [t.attributes["tierserve.token.index"] for t in tokens] == list(range(n))
    steps = [t.attributes["tierserve.token.step"] for t in tokens]
    assert steps == sorted(steps) and steps[0] == 1
    for prev, t in zip(tokens, tokens[1:]):
        assert t.start_ns >= prev.start_ns and t.end_ns >= prev.end_ns
        same_step = t.attributes["tierserve.token.step"] == prev.attributes["tierserve.token.step"]
        # Several tokens in one step: every one but the step's last is an accepted draft.
        assert prev.attributes["tierserve.token.speculative"] == same_step
        if same_step:
            assert t.start_ns == t.end_ns and t.attributes["tierserve.token.gap_ms"] == 0
        else:
            assert t.attributes["tierserve.token.gap_ms"] == pytest.approx((t.end_ns - prev.end_ns) / 1e6, abs=1e-3)
    assert not tokens[-1].attributes["tierserve.token.speculative"]
    assert {"tierserve.token.id", "tierserve.token.choice", "tierserve.token.text"} <= set(tokens[0].attributes)


def test_a_request_without_traceparent_starts_its_own_trace_and_sampling_thins_token_spans(traced, receiver):
    raw = traced.completions.with_raw_response.create(
        model="sampled", prompt="one two three", max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    trace_id = raw.headers["x-trace-id"]
    completion = raw.parse()
    n = completion.usage.completion_tokens
    spans = receiver.wait_for(
        trace_id, lambda s: by_name(s, "text_completion sampled") and by_name(s, "POST /v1/completions")
    )
    (http,) = by_name(spans, "POST /v1/completions")
    (generation,) = by_name(spans, "text_completion sampled")
    assert http.parent_span_id == "" and generation.parent_span_id == http.span_id
    tokens = by_name(spans, "token")
    assert sorted(t.attributes["tierserve.token.index"] for t in tokens) == list(range(0, n, 4))
    assert generation.attributes["tierserve.token_spans"] == math.ceil(n / 4)
    assert generation.attributes["gen_ai.operation.name"] == "text_completion"
    assert "tierserve.speculation.method" not in generation.attributes


def test_an_error_before_the_first_token_is_on_the_span_and_still_returns_the_trace_id(traced, receiver):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        traced.chat.completions.create(model="traced", messages=ECHO, max_tokens=10_000)
    trace_id = caught.value.response.headers["x-trace-id"]
    spans = receiver.wait_for(trace_id, lambda s: by_name(s, "POST /v1/chat/completions"))
    (http,) = by_name(spans, "POST /v1/chat/completions")
    assert http.attributes["http.response.status_code"] == 400
    assert http.attributes["error.type"] == "context_length_exceeded"


def test_handle_calls_are_traced_too(traced, receiver):
    from ray import serve

    handle = serve.get_app_handle(APP)
    reply = handle.chat.remote({"model": "traced", "messages": ECHO, "max_tokens": 5}).result(timeout_s=120)
    assert reply.choices[0].message.content is not None

    root = receiver.wait_for_span("tierserve.chat")
    spans = receiver.wait_for(root.trace_id, lambda s: len(by_name(s, "token")) >= 5 and by_name(s, "chat traced"))
    (chat,) = by_name(spans, "chat traced")
    assert chat.parent_span_id == root.span_id and root.parent_span_id == ""


def test_retrieval_is_a_span_in_the_request_tree_across_the_retriever_process(traced, receiver):
    raw = traced.chat.completions.with_raw_response.create(
        model="traced",
        messages=[{"role": "user", "content": "What does the x-sla-class header do?"}],
        max_tokens=4,
        extra_body={"retrieval": {"top_k": 2}},
    )
    citations = raw.parse().model_extra["tierserve"]["retrieval"]["citations"]
    spans = receiver.wait_for(
        raw.headers["x-trace-id"],
        lambda s: (
            by_name(s, "chat traced")
            and by_name(s, "embeddings all-MiniLM-L6-v2")
            and by_name(s, "POST /v1/chat/completions")
        ),
    )
    (http,) = by_name(spans, "POST /v1/chat/completions")
    (retrieval,) = by_name(spans, "retrieval tierserve-docs")
    (search,) = by_name(spans, "tierserve.retriever.search")
    (embedding,) = by_name(spans, "embeddings all-MiniLM-L6-v2")
    (chat,) = by_name(spans, "chat traced")
    assert retrieval.parent_span_id == http.span_id and chat.parent_span_id == http.span_id
    assert search.parent_span_id == retrieval.span_id and embedding.parent_span_id == search.span_id
    assert search.resource["tierserve.component"] == "retriever"
    assert search.resource["process.pid"] != http.resource["process.pid"]
    assert retrieval.end_ns <= chat.start_ns
    a = retrieval.attributes
    assert a["gen_ai.operation.name"] == "retrieval" and a["gen_ai.data_source.id"] == "tierserve-docs"
    assert a["tierserve.retrieval.top_k"] == 2 and a["tierserve.retrieval.hits"] == len(citations)
    assert list(a["tierserve.retrieval.chunk_ids"]) == [c["chunk_id"] for c in citations]
    assert a["tierserve.retrieval.embed_ms"] > 0 and search.attributes["tierserve.retrieval.version"]
    assert embedding.attributes["gen_ai.operation.name"] == "embeddings"


def test_guards_are_spans_with_what_they_found_but_never_the_text(traced, receiver):
    raw = traced.chat.completions.with_raw_response.create(
        model="traced",
        messages=[{"role": "user", "content": "Mail the report to jane.doe@example.com please."}],
        max_tokens=4,
    )
    assert raw.parse().model_extra["tierserve"]["safety"]["input"] == {"EMAIL_ADDRESS": 1}
    spans = receiver.wait_for(
        raw.headers["x-trace-id"],
        lambda s: by_name(s, "apply_guardrail output") and by_name(s, "POST /v1/chat/completions"),
    )
    (http,) = by_name(spans, "POST /v1/chat/completions")
    (guard_in,) = by_name(spans, "apply_guardrail input")
    (guard_out,) = by_name(spans, "apply_guardrail output")
    assert guard_in.parent_span_id == http.span_id and guard_out.parent_span_id == http.span_id
    a = guard_in.attributes
    assert a["gen_ai.operation.name"] == "apply_guardrail" and a["tierserve.guard.stage"] == "input"
    assert a["tierserve.guard.action"] == "redact" and list(a["tierserve.guard.entities"]) == ["EMAIL_ADDRESS"]
    assert a["tierserve.guard.findings"] == 1 and a["tierserve.guard.texts"] == 1
    assert guard_out.attributes["tierserve.guard.stage"] == "output"
    assert not any("jane.doe" in str(v) for span in spans for v in span.attributes.values())
