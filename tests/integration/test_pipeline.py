"""The request pipeline without Ray Serve: `Pipeline` over a real vLLM engine in this process.

The ingress deployment is a thin shell over `tierserve.router.pipeline.Pipeline`. Here the same
pipeline, built from configs/local.yaml as the ingress builds it (limits, the router, the guards
of the embedded config), serves requests from the `small` tier's engine started in this
process; the only thing the ingress adds is the handle call, which `start_tier` replaces with
the tier's own batching over the engine (`batch_stream`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierserve.actors.deployment import batch_stream
from tierserve.actors.fidelity import tier_engine
from tierserve.cluster.config import load_config, model_cache_dir
from tierserve.core.telemetry import tracer
from tierserve.rag.config import RagConfig
from tierserve.router.limits import LimitExceeded
from tierserve.router.metrics import IngressMetrics
from tierserve.router.pipeline import Pipeline
from tierserve.router.protocol import ChatCompletionRequest, CompletionRequest
from tierserve.router.responses import ChatStreamFormatter, CompletionStreamFormatter
from tierserve.router.retrieval_step import RetrievalStep
from tierserve.router.routing import Router
from tierserve.router.safety_step import SafetyStep
from tierserve.router.tiers import TierDirectory, TierEntry

REPO = Path(__file__).resolve().parents[2]
TIER = "small"


async def test_the_pipeline_serves_a_real_engine_without_serve():
    config = load_config(REPO / "configs" / "local.yaml")
    tier = next(t for t in config.tiers if t.name == TIER)
    cache = model_cache_dir(config)
    started: list[str] = []

    async with tier_engine(tier) as engine:

        async def start_tier(name, request, span):
            started.append(name)
            async for batch in batch_stream(engine.generate(request)):
                yield batch

        router = Router(config.routing, [TIER], TIER, cache, {TIER: 1})
        pipeline = Pipeline(
            config=config.ingress,
            directory=TierDirectory([TierEntry(TIER)], TIER),
            router=router,
            retrieval=RetrievalStep(RagConfig(enabled=False), None),
            safety=SafetyStep(config.safety, cache / "safety"),
            metrics=IngressMetrics(),
            start_tier=start_tier,
        )
        question = {"role": "user", "content": "What is the capital of France?"}

        # Streaming: OpenAI chunks, the last with the `tierserve` field; the context says
        # where the request ran.
        body = ChatCompletionRequest(model="auto", messages=[question], max_tokens=12, temperature=0, stream=True)
        with tracer().start_as_current_span("test") as span:
            ctx, stream = await pipeline.stream(body, ChatStreamFormatter, span)
            chunks = [item async for items in stream for item in items]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Paris" in text
        assert chunks[-1].tierserve["tier"] == TIER
        assert ctx.routed.tier == TIER and ctx.headers()["x-tierserve-tier"] == TIER
        assert ctx.rid.startswith("chatcmpl-") and all(c.id == ctx.rid for c in chunks)
        assert router.states.snapshot()[0].in_flight == 0  # the request's place is given back

        # Whole: the input guard redacts the e-mail address before the tier sees it, and the
        # response's `tierserve.safety` field counts what it did.
        mail = {"role": "user", "content": "Write one short sentence to jane.doe@example.com about lunch."}
        body = ChatCompletionRequest(model=TIER, messages=[mail], max_tokens=16, temperature=0)
        with tracer().start_as_current_span("test") as span:
            ctx, whole = await pipeline.whole(body, ChatStreamFormatter, span)
        assert whole.choices[0].message.content
        assert "jane.doe@example.com" not in whole.choices[0].message.content
        assert ctx.safety.input["EMAIL_ADDRESS"] == 1
        assert whole.tierserve["safety"]["input"] == {"EMAIL_ADDRESS": 1}

        # A completion, whole.
        body = CompletionRequest(model=TIER, prompt="The capital of France is", max_tokens=4, temperature=0)
        with tracer().start_as_current_span("test") as span:
            ctx, whole = await pipeline.whole(body, CompletionStreamFormatter, span)
        assert whole.id.startswith("cmpl-") and whole.choices[0].text
        assert ctx.entry == "completion" and whole.usage.completion_tokens == 4

        # A request over a limit is refused before anything is spent on it: no tier is started.
        before = len(started)
        too_many = [question] * (config.ingress.limits.max_messages + 1)
        body = ChatCompletionRequest(model=TIER, messages=too_many, max_tokens=4)
        with tracer().start_as_current_span("test") as span, pytest.raises(LimitExceeded) as refused:
            await pipeline.whole(body, ChatStreamFormatter, span)
        assert refused.value.param == "messages" and len(started) == before
    assert started == [TIER, TIER, TIER]
