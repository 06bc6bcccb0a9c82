"""OpenAI request validation and the mapping onto a tier's GenerateRequest."""

import json

import pytest
from pydantic import ValidationError

from tierserve.actors.types import StructuredOutput
from tierserve.core.errors import InvalidRequest
from tierserve.router.config import RequestLimits
from tierserve.router.limits import check_limits
from tierserve.router.protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat, validation_error
from tierserve.router.structured import MAX_SCHEMA_NESTING

MSG = [{"role": "user", "content": "hi"}]


def test_chat_sampling_names_pass_through():
    req = ChatCompletionRequest(
        model="auto",
        messages=MSG,
        max_tokens=7,
        temperature=0.2,
        top_p=0.9,
        top_k=5,
        n=2,
        seed=11,
        stop="\n",
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logprobs=True,
        top_logprobs=3,
    )
    gen = req.to_generate("r1")
    s = gen.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.n, s.seed) == (7, 0.2, 0.9, 5, 2, 11)
    assert s.stop == ["\n"] and s.presence_penalty == 0.5 and s.frequency_penalty == 0.25
    assert s.logprobs == 3
    assert gen.request_id == "r1" and gen.messages[0].role == "user" and gen.messages[0].content == "hi"


def test_chat_defaults_and_aliases():
    s = ChatCompletionRequest(model="auto", messages=MSG).to_generate("r").sampling
    assert s.max_tokens is None and s.temperature == 1.0 and s.logprobs is None and s.n == 1
    # newer clients send max_completion_tokens; it wins over the deprecated max_tokens
    s = (
        ChatCompletionRequest(model="auto", messages=MSG, max_tokens=9, max_completion_tokens=4)
        .to_generate("r")
        .sampling
    )
    assert s.max_tokens == 4
    # logprobs without top_logprobs: the sampled token's logprob only
    assert ChatCompletionRequest(model="a", messages=MSG, logprobs=True).to_generate("r").sampling.logprobs == 0


def test_chat_text_parts_are_joined():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert ChatCompletionRequest(model="a", messages=parts).to_generate("r").messages[0].content == "ab"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": 3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"stop": [""]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_chat_field_errors_name_the_field(fields, param):
    body = {"model": "auto", "messages": MSG, **fields}
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate(body)
    error = validation_error(err.value.errors())
    assert isinstance(error, InvalidRequest) and error.status_code == 400
    assert error.param is not None and error.param.startswith(param)
    assert error.to_openai()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "fields, text",
    [
        ({"top_logprobs": 2}, "top_logprobs requires logprobs"),
    ],
)
def test_chat_unsupported_features_are_refused(fields, text):
    with pytest.raises(ValidationError, match=text):
        ChatCompletionRequest.model_validate({"model": "auto", "messages": MSG, **fields})


def test_a_tool_without_its_function_is_refused_naming_the_field():
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate({"model": "auto", "messages": MSG, "tools": [{"type": "function"}]})
    assert validation_error(err.value.errors()).param == "tools.0.function"


def test_unknown_fields_are_ignored():
    req = ChatCompletionRequest.model_validate({"model": "auto", "messages": MSG, "parallel_tool_calls": False})
    assert req.model == "auto"


def test_completion_prompt_shapes():
    assert CompletionRequest(model="a", prompt="x").to_generate("r").prompt == "x"
    assert CompletionRequest(model="a", prompt=["x"]).to_generate("r").prompt == "x"
    gen = CompletionRequest(model="a", prompt=[1, 2, 3]).to_generate("r")
    assert gen.prompt is None and gen.prompt_token_ids == [1, 2, 3]
    assert CompletionRequest(model="a", prompt=[[4, 5]]).to_generate("r").prompt_token_ids == [4, 5]
    # OpenAI's default for text completions is 16 tokens
    assert CompletionRequest(model="a", prompt="x").to_generate("r").sampling.max_tokens == 16
    assert CompletionRequest(model="a", prompt="x", logprobs=2).to_generate("r").sampling.logprobs == 2


@pytest.mark.parametrize(
    "fields, text",
    [
        ({"prompt": ["a", "b"]}, "batched prompts are not supported"),
        ({"prompt": []}, "prompt must not be empty"),
        ({"prompt": "a", "echo": True}, "echo is not supported"),
        ({"prompt": "a", "suffix": "z"}, "suffix is not supported"),
    ],
)
def test_completion_refusals(fields, text):
    with pytest.raises(ValidationError, match=text):
        CompletionRequest.model_validate({"model": "a", **fields})


def test_malformed_json_error():
    errors = [
        {"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error", "ctx": {"error": "Expecting value"}}
    ]
    error = validation_error(errors)
    assert error.code == "invalid_json" and "not valid JSON" in error.message


def test_headers_set_the_sla_fields_the_body_left_unset():
    body = ChatCompletionRequest(model="auto", messages=[{"role": "user", "content": "hi"}], slo_ttft_ms=500)
    headers = {"x-sla-class": "interactive", "x-slo-ttft-ms": "9000", "x-slo-tpot-ms": "80.5"}
    applied = body.with_headers(headers)
    assert (applied.sla_class, applied.slo_ttft_ms, applied.slo_tpot_ms) == ("interactive", 500, 80.5)
    assert body.slo_tpot_ms is None  # a copy; the body wins where it set a field
    assert body.with_headers({}) is body


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-slo-ttft-ms", "fast"),
        ("x-slo-ttft-ms", "0"),
        ("x-slo-tpot-ms", "-3"),
        ("x-slo-tpot-ms", "nan"),
        ("x-slo-ttft-ms", "1e999"),
        ("x-slo-ttft-ms", "2e9"),
        ("x-sla-class", "x" * 65),
    ],
)
def test_a_bad_budget_header_is_a_400_naming_it(header, value):
    body = CompletionRequest(model="auto", prompt="hi")
    with pytest.raises(InvalidRequest) as caught:
        body.with_headers({header: value})
    assert caught.value.param == header and caught.value.status_code == 400


CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer", "minimum": 0}},
    "required": ["city"],
    "additionalProperties": False,
}


def json_schema(schema: object, **extra: object) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, **extra}}


def test_response_formats_map_onto_the_tiers_structured_output():
    def structured(fmt: dict | None, model: type = ChatCompletionRequest) -> StructuredOutput | None:
        body = {"model": "auto", "response_format": fmt}
        body |= {"messages": MSG} if model is ChatCompletionRequest else {"prompt": "x"}
        request = model.model_validate(body)
        check_limits(request, RequestLimits())
        return request.to_generate("r").sampling.structured

    assert structured(None) is None and structured({"type": "text"}) is None
    assert structured({"type": "json_object"}) == StructuredOutput(json_object=True)
    assert structured(json_schema(CITY, strict=True)) == StructuredOutput(
        json_schema=json.dumps(CITY, separators=(",", ":"))
    )
    assert structured(json_schema(CITY), CompletionRequest).json_schema is not None  # completions too
    assert structured({"type": "json_schema", "json_schema": {"name": "any"}}) == StructuredOutput(json_object=True)
    # A property may be named like a keyword decoding cannot enforce.
    named = {"type": "object", "properties": {"not": {"type": "string"}, "if": {"$ref": "#/$defs/a"}}}
    assert structured(json_schema(named | {"$defs": {"a": {"type": "integer"}}})).json_schema is not None


def deep(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    "fmt, param, text",
    [
        ({"type": "xml"}, "response_format.type", "json_schema"),
        ({"type": "json_schema"}, "response_format", "json_schema is required"),
        ({"type": "json_schema", "json_schema": {"name": "a b"}}, "response_format.json_schema.name", "pattern"),
        (json_schema({"type": "strin"}), "response_format.json_schema.schema", "not a valid JSON Schema at type"),
        (json_schema({"properties": {"a": {"minimum": "x"}}}), "response_format.json_schema.schema", "properties/a"),
        (json_schema({"maximum": float("inf")}), "response_format.json_schema.schema", "finite"),
        (json_schema({"description": "\ud800"}), "response_format.json_schema.schema", "surrogate"),
        (json_schema(deep(MAX_SCHEMA_NESTING)), "response_format.json_schema.schema", "nest more than"),
        (json_schema({"description": "x" * 40_000}), "response_format.json_schema.schema", "max_schema_chars"),
        (json_schema([1, 2]), "response_format.json_schema.schema", "dictionary"),
        # Keywords decoding would ignore (measured on the tiers' backends) are refused, not ignored.
        (json_schema({"type": "string", "not": {"const": "Paris"}}), "response_format.json_schema.schema", "'not'"),
        (json_schema({"anyOf": [{"minProperties": 3}]}), "response_format.json_schema.schema", "at anyOf/0"),
        (json_schema({"$ref": "https://example.com/s.json"}), "response_format.json_schema.schema", "$ref https"),
    ],
)
def test_bad_response_formats_are_400s_naming_the_field(fmt, param, text):
    body = {"model": "auto", "messages": MSG, "response_format": fmt}
    try:
        request = ChatCompletionRequest.model_validate(body)
        check_limits(request, RequestLimits())
    except ValidationError as exc:
        error = validation_error(exc.errors())
    except InvalidRequest as exc:
        error = exc
    else:
        pytest.fail("accepted")
    assert error.status_code == 400 and error.param == param and text in error.message, error.message


def test_an_answer_is_checked_against_its_form():
    city = ResponseFormat.model_validate(json_schema(CITY))
    assert city.problem('{"city": "Paris", "population": 2100000}') is None
    assert city.problem('{"city": "<LOCATION>"}') is None  # a redaction inside a string keeps the form
    assert "not JSON" in city.problem('{"city": "Paris", "population": <PHONE_NUMBER>}')
    assert "at population" in city.problem('{"city": "Paris", "population": "<PHONE_NUMBER>"}')
    assert "Additional properties" in city.problem('{"city": "Paris", "mayor": "x"}')
    anything = ResponseFormat(type="json_object")
    assert anything.problem('{"a": [1, 2]}') is None and anything.problem("[1, 2]") == "not a JSON object"
    assert ResponseFormat(type="text").problem("free text") is None
