"""The same pipeline through Python DeploymentHandle calls."""

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from tierserve.core.errors import ContextLengthExceeded, ModelNotFound, TierServeError, unwrap_error
from tierserve.router.client import TierServeClient
from tierserve.router.protocol import ChatCompletionRequest

from .conftest import MODELS, TIER, TIERS

pytestmark = pytest.mark.integration

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_through_handle_matches_http(ingress_handle, client):
    req = ChatCompletionRequest(model="auto", messages=CAPITAL, max_tokens=16, temperature=0)
    result = ingress_handle.chat.remote(req).result()
    assert isinstance(result, ChatCompletion) and result.model == TIER
    http = client.chat.completions.create(model="auto", messages=CAPITAL, max_tokens=16, temperature=0)
    assert result.choices[0].message.content == http.choices[0].message.content


def test_plain_dict_requests_are_accepted(ingress_handle):
    result = ingress_handle.complete.remote({"model": "auto", "prompt": "The sky is", "max_tokens": 4}).result()
    assert isinstance(result, Completion) and result.usage.completion_tokens <= 4


def test_streaming_through_handle(ingress_handle):
    req = {"model": "auto", "messages": CAPITAL, "max_tokens": 16, "temperature": 0}
    chunks = list(ingress_handle.options(stream=True).chat_stream.remote(req))
    assert chunks and all(isinstance(c, ChatCompletionChunk) for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = ingress_handle.chat.remote(req).result()
    assert text == whole.choices[0].message.content


def test_models_and_health_through_handle(ingress_handle):
    assert [m.id for m in ingress_handle.list_models.remote().result()] == MODELS
    assert ingress_handle.health.remote().result() == {t: "ok" for t in TIERS}


@pytest.mark.parametrize(
    "request_body, error_type",
    [
        ({"model": "nope", "messages": CAPITAL}, ModelNotFound),
        ({"model": "auto", "messages": CAPITAL, "max_tokens": 100000}, ContextLengthExceeded),
    ],
)
def test_user_errors_keep_their_type(ingress_handle, request_body, error_type):
    with pytest.raises(Exception) as err:
        ingress_handle.chat.remote(request_body).result()
    cause = unwrap_error(err.value)
    assert isinstance(cause, error_type) and isinstance(cause, TierServeError)
    with pytest.raises(Exception) as err:
        list(ingress_handle.options(stream=True).chat_stream.remote(request_body))
    assert isinstance(unwrap_error(err.value), error_type)


def test_typed_client(app):
    client = TierServeClient(app.name)
    reply = client.chat(model="auto", messages=CAPITAL, max_tokens=8, temperature=0)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat_stream(model="auto", messages=CAPITAL, max_tokens=8, temperature=0)
    )
    assert streamed == reply.choices[0].message.content
    assert [m.id for m in client.models()] == MODELS and client.health() == {t: "ok" for t in TIERS}
    with pytest.raises(ValidationError):
        client.chat(model="auto", messages=[])


async def test_typed_client_async(app):
    client = TierServeClient(app.name)
    whole = await client.acomplete(model="auto", prompt="The sky is", max_tokens=6, temperature=0)
    parts = [
        c.choices[0].text
        async for c in client.acomplete_stream(model="auto", prompt="The sky is", max_tokens=6, temperature=0)
        if c.choices
    ]
    assert "".join(parts) == whole.choices[0].text
    reply = await client.achat(model="auto", messages=CAPITAL, max_tokens=4)
    assert reply.usage.completion_tokens <= 4
    assert [c async for c in client.achat_stream(model="auto", messages=CAPITAL, max_tokens=4)]


def test_tier_reports_itself(tier_handle):
    info = tier_handle.info.remote().result()
    assert info.name == TIER and info.max_model_len == 2048 and info.model.startswith("embedded:")
    stats = tier_handle.stats.remote().result()
    assert stats.started >= stats.finished + stats.aborted + stats.failed and stats.running >= 0
