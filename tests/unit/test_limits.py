"""Hostile request bodies become a 400 naming the field (or the limit), never another error:
table cases found by trying, then Hypothesis generating request bodies of its own."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tierserve.core.errors import InvalidRequest, TierServeError
from tierserve.router.config import RequestLimits
from tierserve.router.limits import LimitExceeded, check_limits
from tierserve.router.protocol import ChatCompletionRequest, CompletionRequest, validation_error

MSG = [{"role": "user", "content": "hi"}]


def refusal(model: type, body: dict, limits: RequestLimits | None = None) -> InvalidRequest:
    """The 400 the ingress answers `body` with (parse, then limits and cross-field checks)."""
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        return validation_error(exc.errors())
    with pytest.raises(InvalidRequest) as err:
        check_limits(request, limits or RequestLimits())
    return err.value


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"min_tokens": 20, "max_completion_tokens": 10}, "min_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
        ({"stop_token_ids": [2**40]}, "stop_token_ids.0"),
        ({"logit_bias": {"-1": 5}}, "logit_bias.-1"),
        ({"logit_bias": {"the": 5}}, "logit_bias.the"),
        ({"logit_bias": {str(2**40): 5}}, "logit_bias"),
        ({"logit_bias": {"7": 101}}, "logit_bias.7"),
        ({"logit_bias": {"7": math.inf}}, "logit_bias.7"),
        ({"logit_bias": [7]}, "logit_bias"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"temperature": math.nan}, "temperature"),
        ({"slo_ttft_ms": math.inf}, "slo_ttft_ms"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"top_k": 2**70}, "top_k"),
        ({"max_tokens": 2**70}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages.0.content"),
        ({"stop": ["ok", "\ud800"]}, "stop"),
        ({"model": "a\ud800"}, "model"),
        ({"retrieval": {"index": "../x"}}, "retrieval.index"),
        ({"retrieval": {"index": "/etc"}}, "retrieval.index"),
        ({"retrieval": {"filters": {"year": 12345678901234567890123}}}, "retrieval.filters.year"),
        ({"retrieval": {"filters": {"year": [1, 2**64]}}}, "retrieval.filters.year"),
        ({"retrieval": {"filters": {"year": math.inf}}}, "retrieval.filters.year"),
        ({"retrieval": {"filters": {"tags": []}}}, "retrieval.filters.tags"),
        ({"retrieval": {"score_threshold": math.nan}}, "retrieval.score_threshold"),
    ],
)
def test_chat_bad_values_name_the_field(fields, param):
    err = refusal(ChatCompletionRequest, {"model": "auto", "messages": MSG, **fields})
    assert err.param is not None and err.param.startswith(param), (err.param, err.message)
    assert err.status_code == 400


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": [""]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [1, -5]}, "prompt"),
        ({"prompt": "x", "min_tokens": 17}, "min_tokens"),  # max_tokens defaults to 16
        ({"prompt": "\ud800"}, "prompt"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
    ],
)
def test_completion_bad_values_name_the_field(fields, param):
    err = refusal(CompletionRequest, {"model": "auto", **fields})
    assert err.param is not None and err.param.startswith(param), (err.param, err.message)


LIMITS = RequestLimits(
    max_messages=3,
    max_prompt_chars=100,
    max_prompt_token_ids=10,
    max_stop=2,
    max_stop_chars=5,
    max_stop_token_ids=2,
    max_logit_bias=2,
)


@pytest.mark.parametrize(
    "model, fields, limit, param",
    [
        (ChatCompletionRequest, {"messages": MSG * 4}, "max_messages", "messages"),
        (
            ChatCompletionRequest,
            {"messages": [{"role": "user", "content": "x" * 101}]},
            "max_prompt_chars",
            "messages.0",
        ),
        (
            ChatCompletionRequest,
            {"messages": [*MSG, {"role": "system", "content": "y" * 99}]},
            "max_prompt_chars",
            "messages.1",
        ),
        (CompletionRequest, {"prompt": "x" * 101}, "max_prompt_chars", "prompt"),
        (CompletionRequest, {"prompt": list(range(11))}, "max_prompt_token_ids", "prompt"),
        (CompletionRequest, {"prompt": "x", "stop": ["a", "b", "c"]}, "max_stop", "stop"),
        (CompletionRequest, {"prompt": "x", "stop": ["abcdef"]}, "max_stop_chars", "stop.0"),
        (CompletionRequest, {"prompt": "x", "stop_token_ids": [1, 2, 3]}, "max_stop_token_ids", "stop_token_ids"),
        (CompletionRequest, {"prompt": "x", "logit_bias": {"1": 1, "2": 1, "3": 1}}, "max_logit_bias", "logit_bias"),
    ],
)
def test_limits_name_the_limit_and_the_field(model, fields, limit, param):
    body = {"model": "auto", **({} if model is CompletionRequest else {"messages": MSG}), **fields}
    err = refusal(model, body, LIMITS)
    assert isinstance(err, LimitExceeded) and err.code == "limit_exceeded"
    assert f"ingress.limits.{limit}" in err.message and err.param.startswith(param)


def test_requests_within_the_limits_pass():
    check_limits(ChatCompletionRequest(model="auto", messages=MSG * 3, stop=["a", "b"]), LIMITS)
    check_limits(CompletionRequest(model="auto", prompt=list(range(10)), stop_token_ids=[1, 2]), LIMITS)
    biased = CompletionRequest.model_validate({"model": "auto", "prompt": "x", "logit_bias": {"1": -100, "2": 100}})
    check_limits(biased, LIMITS)
    check_limits(CompletionRequest(model="auto", prompt="x", best_of=1), LIMITS)  # what some clients send by default
    assert biased.to_generate("r").sampling.logit_bias == {1: -100.0, 2: 100.0}


# --- generated bodies -------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
FIELDS = [
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "stop",
    "stop_token_ids", "logit_bias", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
    "ignore_eos", "stream", "stream_options", "user", "sla_class", "slo_ttft_ms", "slo_tpot_ms", "retrieval",
    "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "response_format", "echo", "suffix",
]  # fmt: skip
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot"])},
    optional={"content": values | st.text(), "name": values, "tool_calls": values, "tool_call_id": values},
)


def bodies(model: type) -> st.SearchStrategy[dict]:
    base = {"model": st.just("auto")}
    base |= (
        {"messages": st.lists(message, max_size=3) | values}
        if model is ChatCompletionRequest
        else {"prompt": values | st.text()}
    )
    return st.fixed_dictionaries(base, optional={f: values for f in FIELDS if f not in base})


def answer(model: type, body: dict) -> None:
    """What the ingress does with a parsed body before routing: a valid request, or a
    `TierServeError` (a 4xx); any other exception fails the test. A valid one maps onto the
    tier's request and its echoed fields serialise as JSON."""
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        err = validation_error(exc.errors())
        assert err.status_code == 400 and err.message
        return
    try:
        check_limits(request, RequestLimits())
    except TierServeError as err:
        assert 400 <= err.status_code < 500
        return
    request.to_generate("r")
    json.dumps(request.model_dump(mode="json"), allow_nan=False)
    text, _ = request.routing_text()
    text.encode("utf-8")


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(bodies(ChatCompletionRequest))
def test_generated_chat_bodies_are_accepted_or_refused_with_a_4xx(body):
    answer(ChatCompletionRequest, body)


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(bodies(CompletionRequest))
def test_generated_completion_bodies_are_accepted_or_refused_with_a_4xx(body):
    answer(CompletionRequest, body)
