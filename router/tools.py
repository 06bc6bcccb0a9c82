"""Tool calling in a chat request: the tools offered, how the model may call them, and the
calls coming back in the history.

The request models here are the `tools`, `tool_choice` and assistant `tool_calls` of OpenAI's
chat API. `ToolChoice` turns them into the tier's `ToolCalling`: `required` and a named
function are enforced while decoding, with a JSON Schema built from the tools' parameters
(`call_schema`, the form vLLM's server uses: a list of `{name, parameters}`, or the named
function's arguments alone), so their arguments are always valid; `auto` is read from the
model's text by the tier's tool-call parser. Plain code, tested without Ray.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from tierserve.actors.types import StructuredOutput, ToolCalling
from tierserve.core.errors import InvalidRequest
from tierserve.core.types import ToolCall
from tierserve.router.fields import REQUEST_CONFIG, Text
from tierserve.router.structured import answer_problem, check_schema
from tierserve.safety.chain import GuardChain
from tierserve.safety.types import Finding

FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
"""OpenAI's rule for a function's name: letters, digits, `_` and `-`, at most 64."""
MAX_CALL_ID_CHARS = 256


class FunctionDef(BaseModel):
    model_config = REQUEST_CONFIG

    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    """A JSON Schema of the arguments (an object); none: no arguments."""
    strict: bool | None = None
    """Accepted for OpenAI's clients: `required` and named calls always follow the schema."""


class ToolDef(BaseModel):
    """One entry of `tools`: a function the model may call."""

    model_config = REQUEST_CONFIG

    type: Literal["function"]
    function: FunctionDef


class _FunctionName(BaseModel):
    model_config = REQUEST_CONFIG

    name: FunctionName


class NamedToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`: call this function."""

    model_config = REQUEST_CONFIG

    type: Literal["function"]
    function: _FunctionName


class CalledFunction(BaseModel):
    model_config = REQUEST_CONFIG

    name: FunctionName
    arguments: Text
    """The arguments as JSON text, as the model wrote them."""


class ToolCallIn(BaseModel):
    """An assistant message's `tool_calls` entry: a call the model made earlier."""

    model_config = REQUEST_CONFIG

    id: Text = Field(min_length=1, max_length=MAX_CALL_ID_CHARS)
    type: Literal["function"] = "function"
    function: CalledFunction

    def to_call(self) -> ToolCall:
        return ToolCall(self.id, self.function.name, self.function.arguments)


def _parameters(function: FunctionDef) -> dict[str, Any]:
    """A function's arguments schema; none (or empty) takes an object with no arguments."""
    return function.parameters or {"type": "object", "properties": {}}


def call_schema(tools: list[ToolDef], function: str | None, parallel: bool) -> dict[str, Any]:
    """The JSON Schema decoding follows for a call it must make: the named `function`'s
    arguments, or (None: `required`) a list of `{name, parameters}` of the `tools`, one item
    when calls may not run in `parallel`. Each function's `$defs` move to the top, where the
    `#/$defs/...` references they are the target of still find them."""
    if function is not None:
        return _parameters(next(t.function for t in tools if t.function.name == function))
    defs: dict[str, Any] = {}
    choices = []
    for i, tool in enumerate(tools):
        parameters = dict(_parameters(tool.function))
        for name, schema in (parameters.pop("$defs", None) or {}).items():
            if defs.setdefault(name, schema) != schema:
                raise InvalidRequest(
                    f"tools: two functions define $defs/{name} differently; with tool_choice 'required' "
                    "their definitions share one namespace",
                    f"tools.{i}.function.parameters",
                )
        choices.append(
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [tool.function.name]}, "parameters": parameters},
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": choices}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def check_tools(tools: list[ToolDef], choice: str | NamedToolChoice | None) -> None:
    """Raise `InvalidRequest` naming the field unless the tools and the choice make sense
    together: distinct names, parameters that are JSON Schemas of an object decoding can
    follow, and a named choice among the tools."""
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if name in seen:
            raise InvalidRequest(f"tools: two functions are named {name!r}", f"tools.{i}.function.name")
        seen.add(name)
        if tool.function.parameters is not None:
            param = f"tools.{i}.function.parameters"
            check_schema(tool.function.parameters, param)
            if tool.function.parameters.get("type", "object") != "object":
                raise InvalidRequest(f"{param}: a function's arguments are an object (type 'object')", param)
    if isinstance(choice, NamedToolChoice) and choice.function.name not in seen:
        raise InvalidRequest(
            f"tool_choice names the function {choice.function.name!r}, which is not among the tools",
            "tool_choice.function.name",
        )


def tool_calling(
    tools: list[ToolDef], choice: str | NamedToolChoice | None, parallel: bool | None
) -> tuple[ToolCalling, StructuredOutput | None]:
    """What the tier needs (`ToolCalling`), and the form decoding must follow when the model
    must call (`required`, a named function); `auto` (the default) leaves decoding free."""
    offered = [tool.model_dump(exclude_none=True) for tool in tools]
    parallel = parallel is not False
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        schema = call_schema(tools, name, parallel)
        return ToolCalling(offered, "function", name, parallel), StructuredOutput(json_schema=_compact(schema))
    if choice == "required":
        schema = call_schema(tools, None, parallel)
        return ToolCalling(offered, "required", None, parallel), StructuredOutput(json_schema=_compact(schema))
    return ToolCalling(offered, choice or "auto", None, parallel), None


def _compact(schema: dict[str, Any]) -> str:
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def function_schemas(tools: list[ToolDef] | None) -> dict[str, dict[str, Any]]:
    """Each offered function's arguments schema, by name (what a guarded call is checked against)."""
    return {tool.function.name: _parameters(tool.function) for tool in tools or ()}


def guard_call(
    call: ToolCall, chain: GuardChain, schema: dict[str, Any] | None
) -> tuple[ToolCall, list[Finding], str | None]:
    """A call's arguments through the output guards. Each string and number inside the JSON is
    checked on its own, so a redaction lands inside a string (a redacted number becomes one) and
    the JSON stays JSON; arguments that are not JSON are checked as one text. Returns the guarded
    call, what was found, and why it must not go out, None if it may: a guard blocked it, or the
    redacted arguments are no longer valid against the function's `schema` although the model's
    were."""
    findings: list[Finding] = []
    blocked: list[str] = []

    def check(text: str) -> str:
        verdict = chain.check(text, "output")
        findings.extend(verdict.findings)
        if verdict.blocked:
            blocked.append(verdict.reason or "a guard refused the call's arguments")
        return verdict.text

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return check(node)
        if isinstance(node, (int, float)) and not isinstance(node, bool):  # a card number, a phone number
            text = json.dumps(node)
            redacted = check(text)
            return node if redacted == text else redacted
        if isinstance(node, list):
            return [walk(item) for item in node]
        if isinstance(node, dict):
            return {key: walk(item) for key, item in node.items()}
        return node

    try:
        guarded = json.dumps(walk(json.loads(call.arguments)), ensure_ascii=False)
    except (ValueError, RecursionError):  # not JSON (a free-form `auto` call), or nested past reading
        findings.clear()
        blocked.clear()
        guarded = check(call.arguments)
    if blocked:
        return call, findings, blocked[0]
    if not findings:
        return call, findings, None
    if schema is not None and (problem := answer_problem(guarded, schema)) is not None:
        if answer_problem(call.arguments, schema) is None:
            return call, findings, f"the redacted arguments of {call.name} are {problem}"
    return dataclasses.replace(call, arguments=guarded), findings, None
