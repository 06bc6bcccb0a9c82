"""Tool calling without Ray: the request fields and their 400s, the schema decoding follows for
`required` and named calls, the tier's reading of calls from text (vLLM's real `hermes`
parser), and the output guard on a call's arguments (real Presidio)."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator
from opentelemetry import trace
from pydantic import ValidationError

from tierserve.actors.config import ToolsConfig
from tierserve.actors.tools import CallReader, ToolSupport
from tierserve.actors.types import TokenChunk, ToolCalling
from tierserve.core.errors import InvalidRequest
from tierserve.core.types import ToolCall
from tierserve.router.config import RequestLimits
from tierserve.router.limits import check_limits
from tierserve.router.protocol import ChatCompletionRequest, validation_error
from tierserve.router.safety_step import SafetyReport, SafetyStep
from tierserve.router.tiers import TierDirectory, TierEntry
from tierserve.router.tools import call_schema, function_schemas
from tierserve.safety.config import PiiGuardConfig, SafetyConfig

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
EMAIL_TOOL = {"type": "function", "function": {"name": "send_email", "parameters": {"type": "object"}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


def request(**fields) -> ChatCompletionRequest:
    body = ChatCompletionRequest.model_validate({"model": "auto", "messages": USER, "tools": [WEATHER], **fields})
    body.check_fields()
    return body


def refusal(**fields) -> InvalidRequest:
    try:
        request(**fields)
    except ValidationError as exc:
        return validation_error(exc.errors())
    except InvalidRequest as exc:
        return exc
    raise AssertionError("accepted")


def test_bad_tool_fields_are_400s_naming_the_field():
    assert refusal(tool_choice="required", tools=None).param == "tool_choice"
    assert refusal(tool_choice={"type": "function", "function": {"name": "nope"}}).param == "tool_choice.function.name"
    assert refusal(tools=[WEATHER, WEATHER]).param == "tools.1.function.name"
    assert refusal(tools=[{"type": "function", "function": {"name": "has space"}}]).param == "tools.0.function.name"
    assert refusal(tools=[{"type": "retrieval"}]).param == "tools.0.type"
    unenforced = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}
    error = refusal(tools=[unenforced])
    assert error.param == "tools.0.function.parameters" and error.code == "unsupported_schema"
    scalar = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    assert refusal(tools=[scalar]).param == "tools.0.function.parameters"
    assert refusal(response_format={"type": "json_object"}).param == "response_format"
    request(response_format={"type": "json_object"}, tool_choice="none")  # no call: one form
    assert refusal(messages=[{"role": "tool", "content": "18C"}]).param == "messages.0"
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    error = refusal(messages=[{"role": "user", "content": "x", "tool_calls": [call]}])
    assert error.param == "messages.0" and "only an assistant message" in error.message
    bad_id = [{"role": "assistant", "tool_calls": [{**call, "id": "x" * 257}]}]
    assert refusal(messages=bad_id).param == "messages.0.tool_calls.0.id"


def test_tools_have_limits():
    limits = RequestLimits(max_tools=1, max_tools_chars=300)
    check_limits(request(), limits)
    with pytest.raises(InvalidRequest, match="max_tools ") as over:
        check_limits(request(tools=[WEATHER, EMAIL_TOOL]), limits)
    assert over.value.param == "tools"
    long = {**WEATHER, "function": {**WEATHER["function"], "description": "x" * 400}}
    with pytest.raises(InvalidRequest, match="max_tools_chars") as over:
        check_limits(request(tools=[long]), limits)
    assert over.value.param == "tools"
    # A history's call arguments count with the messages' characters.
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "x" * 300}}
    history = [*USER, {"role": "assistant", "tool_calls": [call]}]
    with pytest.raises(InvalidRequest, match="max_prompt_chars"):
        check_limits(request(messages=history), RequestLimits(max_prompt_chars=200))


def test_required_and_named_calls_are_decoded_to_a_schema_and_auto_is_free():
    tier = request(tool_choice="required", tools=[WEATHER, EMAIL_TOOL]).to_generate("r")
    assert tier.tools.choice == "required" and tier.sampling.structured is not None
    schema = json.loads(tier.sampling.structured.json_schema)
    valid = Draft202012Validator(schema)
    assert valid.is_valid([{"name": "get_weather", "parameters": {"city": "Paris"}}])
    assert valid.is_valid(
        [{"name": "get_weather", "parameters": {"city": "A"}}, {"name": "send_email", "parameters": {}}]
    )
    assert not valid.is_valid([])  # required: at least one call
    assert not valid.is_valid([{"name": "get_weather", "parameters": {}}])  # the function's own schema holds
    assert not valid.is_valid([{"name": "other", "parameters": {}}])
    single = json.loads(
        request(tool_choice="required", parallel_tool_calls=False).to_generate("r").sampling.structured.json_schema
    )
    assert single["maxItems"] == 1
    named = request(tool_choice={"type": "function", "function": {"name": "get_weather"}}).to_generate("r")
    assert named.tools.choice == "function" and named.tools.function == "get_weather"
    assert json.loads(named.sampling.structured.json_schema) == WEATHER["function"]["parameters"]
    auto = request().to_generate("r")
    assert auto.tools.choice == "auto" and auto.sampling.structured is None
    assert auto.tools.tools == [WEATHER]


def test_definitions_move_to_the_top_of_a_required_schema():
    def tool(name, defs):
        parameters = {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": defs}
        return {"type": "function", "function": {"name": name, "parameters": parameters}}

    body = request(tools=[tool("a", {"P": {"type": "integer"}}), tool("b", {"P": {"type": "integer"}})])
    schema = call_schema(body.tools, None, True)
    assert schema["$defs"] == {"P": {"type": "integer"}}
    assert Draft202012Validator(schema).is_valid([{"name": "a", "parameters": {"p": 3}}])
    assert not Draft202012Validator(schema).is_valid([{"name": "a", "parameters": {"p": "x"}}])
    clash = request(tools=[tool("a", {"P": {"type": "integer"}}), tool("b", {"P": {"type": "string"}})])
    with pytest.raises(InvalidRequest) as error:
        clash.tool_choice = "required"
        clash.to_generate("r")
    assert error.value.param == "tools.1.function.parameters"


def test_history_calls_reach_the_tier():
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [
        *USER,
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
    ]
    body = request(messages=history)
    assert body.uses_tools() and not ChatCompletionRequest(model="auto", messages=USER).uses_tools()
    messages = body.to_generate("r").messages
    assert messages[1].tool_calls == [ToolCall("c1", "get_weather", '{"city": "Paris"}')]
    assert messages[2].tool_call_id == "c1" and messages[2].content == "18C"


def test_only_tiers_with_tools_take_requests_with_tools():
    directory = TierDirectory([TierEntry("small", tools=True), TierEntry("big")])
    assert directory.serving_tools(None, None) == {"small"}
    with pytest.raises(InvalidRequest) as error:
        directory.serving_tools(None, "big")
    assert error.value.param == "tools" and "small" in error.value.message
    with pytest.raises(InvalidRequest, match="no tier"):
        directory.serving_tools({"big"}, None)


class _Tokenizer:
    """What vLLM's hermes parser needs of a tokenizer here: to be given one (it reads no vocabulary)."""

    def get_vocab(self) -> dict[str, int]:
        return {}


def read(calling: ToolCalling, *parts: str, finish: str = "stop") -> tuple[list[str], TokenChunk]:
    support = ToolSupport.__new__(ToolSupport)
    support.parser_class, support.tokenizer = ToolsConfig().parser_class(), _Tokenizer()
    reader: CallReader = support.readers(calling, 1)[0]
    chunks = [
        reader.read(TokenChunk(0, part, [i], i + 1, finish_reason=finish if i == len(parts) - 1 else None))
        for i, part in enumerate(parts)
    ]
    return [c.text for c in chunks], chunks[-1]


def test_auto_streams_the_text_and_returns_the_calls_whole_at_the_end():
    calling = ToolCalling([WEATHER], "auto")
    texts, last = read(
        calling,
        "Let me ",
        "check.",
        "<tool_",
        'call>\n{"name": "get_weather", ',
        '"arguments": {"city": "Paris"}}\n</tool_call>',
    )
    assert "".join(texts) == "Let me check." and texts[0] == "Let me "  # streamed before the call
    assert last.finish_reason == "tool_calls" and len(last.tool_calls) == 1
    assert last.tool_calls[0].name == "get_weather" and json.loads(last.tool_calls[0].arguments) == {"city": "Paris"}
    # No call: the whole text, as it was written.
    texts, last = read(calling, "It is ", "sunny <tool", " maybe")
    assert "".join(texts) == "It is sunny <tool maybe" and last.tool_calls is None and last.finish_reason == "stop"
    # A call the parser cannot read is text too: nothing the model wrote is lost.
    texts, last = read(calling, 'Here: <tool_call>{"name": broken', "</tool_call>")
    assert "".join(texts) == 'Here: <tool_call>{"name": broken</tool_call>' and last.tool_calls is None


def test_required_and_named_answers_become_calls():
    texts, last = read(
        ToolCalling([WEATHER], "required"), '[{"name": "get_weather", ', '"parameters": {"city": "Oslo"}}]'
    )
    assert "".join(texts) == "" and last.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in last.tool_calls] == [("get_weather", {"city": "Oslo"})]
    texts, last = read(ToolCalling([WEATHER], "function", "get_weather"), '{"city": ', '"Rome"}')
    assert last.finish_reason == "stop" and json.loads(last.tool_calls[0].arguments) == {"city": "Rome"}
    assert last.tool_calls[0].id.startswith("chatcmpl-tool-")
    # Cut short: no call can be read, so the text goes out as it is, with `length`.
    texts, last = read(ToolCalling([WEATHER], "function", "get_weather"), '{"city": ', '"Ro', finish="length")
    assert "".join(texts) == '{"city": "Ro' and last.tool_calls is None and last.finish_reason == "length"


async def test_personal_data_in_call_arguments_is_redacted_inside_the_json():
    safety = SafetyStep(SafetyConfig(enabled=True, guards=[PiiGuardConfig()]), None)
    schema = {"type": "object", "properties": {"to": {"type": "string"}, "card": {"type": "integer"}}}
    functions = function_schemas(
        request(tools=[{"type": "function", "function": {"name": "mail", "parameters": schema}}]).tools
    )

    async def guarded(arguments: str) -> tuple[TokenChunk, SafetyReport]:
        async def tier():
            yield [TokenChunk(0, "", [1], 1, finish_reason="tool_calls", tool_calls=[ToolCall("c", "mail", arguments)])]

        report = SafetyReport()
        chunks = [c async for b in safety.guard_output(tier(), report, trace.INVALID_SPAN, None, functions) for c in b]
        return chunks[-1], report

    last, report = await guarded('{"to": "write to jane.doe@example.com please"}')
    assert json.loads(last.tool_calls[0].arguments) == {"to": "write to <EMAIL_ADDRESS> please"}
    assert last.finish_reason == "tool_calls" and report.output["EMAIL_ADDRESS"] == 1
    # A card number as a JSON number is a string once redacted: invalid against the schema, so
    # the call does not go out and the choice ends filtered.
    last, report = await guarded('{"card": 4111111111111111}')
    assert last.tool_calls is None and last.finish_reason == "content_filter"
    assert report.output_blocked.startswith("the redacted arguments of mail are not valid")
    # Arguments that are not JSON are checked as one text.
    last, _ = await guarded("mail jane.doe@example.com")
    assert last.tool_calls[0].arguments == "mail <EMAIL_ADDRESS>"
