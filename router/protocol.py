"""OpenAI request models, the request limits, and the mapping to a tier's `GenerateRequest`.

Requests are validated here, so that bad input becomes a precise 400 before any tier is asked.
Responses use the `openai` package's own pydantic models, which keeps their shape identical to
what OpenAI clients parse. Unknown request fields are ignored, as OpenAI-compatible servers do;
fields tierserve understands but cannot honour are refused with a 400 naming them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from tierserve.actors.types import GenerateRequest, SamplingOptions, StructuredOutput
from tierserve.core.errors import InvalidRequest
from tierserve.core.types import ChatMessage
from tierserve.rag.config import RetrievalOptions
from tierserve.rag.types import INT64_MAX, INT64_MIN
from tierserve.router.fields import INT32_MAX, REQUEST_CONFIG, Bias, Count, Text, TokenId
from tierserve.router.structured import answer_problem, check_schema
from tierserve.router.tools import MAX_CALL_ID_CHARS, NamedToolChoice, ToolCallIn, ToolDef, check_tools, tool_calling

MAX_N = 16
MAX_LOGPROBS = 20


SLA_CLASS_HEADER = "x-sla-class"
SLO_TTFT_HEADER = "x-slo-ttft-ms"
SLO_TPOT_HEADER = "x-slo-tpot-ms"
"""HTTP headers that set `sla_class`, `slo_ttft_ms` and `slo_tpot_ms` when the body does not."""
MAX_SLA_CLASS_CHARS = 64
MAX_BUDGET_MS = 1e9
"""Bounds of the SLA fields, in the body and in the headers alike."""


def _milliseconds(raw: str, header: str) -> float:
    """A budget header's value: a positive, finite number of milliseconds, at most `MAX_BUDGET_MS`."""
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"header {header} must be a number of milliseconds, got {raw[:32]!r}", header) from None
    if not math.isfinite(value) or not 0 < value <= MAX_BUDGET_MS:
        raise InvalidRequest(
            f"header {header} must be a positive number of milliseconds, at most {MAX_BUDGET_MS:.0f}", header
        )
    return value


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessageIn(BaseModel):
    model_config = REQUEST_CONFIG

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[Annotated[TextPart, Field(discriminator="type")]] | None = None
    name: Text | None = Field(None, max_length=256)
    tool_calls: list[ToolCallIn] | None = None
    """An assistant turn's function calls."""
    tool_call_id: Text | None = Field(None, max_length=MAX_CALL_ID_CHARS)
    """A `tool` turn's: the id of the call whose result it carries."""

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessageIn:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message makes tool calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: a tool message names the call it answers")
        return self

    def to_message(self) -> ChatMessage:
        calls = [call.to_call() for call in self.tool_calls] if self.tool_calls else None
        return ChatMessage(self.role, self.text(), calls, self.tool_call_id)

    def call_text(self) -> str:
        """The arguments of this turn's tool calls, which the prompt carries too."""
        return "".join(call.function.arguments for call in self.tool_calls or ())

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: the schema the answer must be valid against."""

    model_config = REQUEST_CONFIG

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    """A JSON Schema (draft 2020-12 unless its `$schema` says otherwise); none: any JSON object."""
    strict: bool | None = None
    """Accepted for OpenAI's clients; decoding always follows the schema, whatever it says."""


class ResponseFormat(BaseModel):
    """`response_format`: free text, any JSON object, or JSON valid against a schema. The JSON
    forms are enforced while decoding (`StructuredOutput`), so the answer parses unless it was
    cut short (`finish_reason: "length"`) or a guard's redaction broke it (`content_filter`)."""

    model_config = REQUEST_CONFIG

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self

    @property
    def answer_schema(self) -> dict[str, Any] | None:
        """The schema the answer must be valid against; None when any JSON (or text) will do."""
        return self.json_schema.schema_ if self.type == "json_schema" and self.json_schema is not None else None

    def check_schema(self) -> None:
        """Raise `InvalidRequest` naming the schema unless decoding can follow it
        (`tierserve.router.structured.check_schema`). Called after the limits
        (`max_schema_chars`) bound its size."""
        if (schema := self.answer_schema) is not None:
            check_schema(schema, "response_format.json_schema.schema")

    def problem(self, answer: str) -> str | None:
        """Why `answer` is not of this form (not JSON, not an object, or invalid against the
        schema); None when it is. Decoding guarantees the form, so this checks an answer the
        guards rewrote."""
        return None if self.type == "text" else answer_problem(answer, self.answer_schema)

    @cached_property
    def schema_json(self) -> str | None:
        """`answer_schema` as compact JSON text: what the tier compiles, and what
        `max_schema_chars` measures."""
        schema = self.answer_schema
        return None if schema is None else json.dumps(schema, separators=(",", ":"))

    def structured(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.schema_json is None:
            return StructuredOutput(json_object=True)
        return StructuredOutput(json_schema=self.schema_json)


class _SamplingFields(BaseModel):
    """Fields shared by chat and text completions, with OpenAI's names and ranges."""

    model_config = REQUEST_CONFIG

    model: Text = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Text | list[Text] | None = None
    stop_token_ids: list[TokenId] | None = None
    logit_bias: dict[TokenId, Bias] | None = None
    """Token id (a JSON object's keys are strings of digits) -> a bias added to its logit."""
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    min_tokens: Count = 0
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: Text | None = Field(None, max_length=256)
    # tierserve's extensions (OpenAI clients send them with `extra_body`); the HTTP headers
    # x-sla-class, x-slo-ttft-ms and x-slo-tpot-ms set the same when the body does not.
    sla_class: Text | None = Field(None, max_length=MAX_SLA_CLASS_CHARS)
    """A named latency budget from the config's `routing.sla_classes`."""
    slo_ttft_ms: float | None = Field(None, gt=0, le=MAX_BUDGET_MS)
    """Time-to-first-token budget in milliseconds (overrides the class's)."""
    slo_tpot_ms: float | None = Field(None, gt=0, le=MAX_BUDGET_MS)
    """Time-per-output-token budget in milliseconds (overrides the class's)."""
    retrieval: bool | RetrievalOptions | None = None
    """Answer from an index's passages (docs/rag.md): `true` for the configured defaults, or
    `{index, top_k, score_threshold, filters}`; `false` turns off the route's default."""

    def with_headers(self, headers: Mapping[str, str]) -> Any:
        """This request with the SLA fields the body left unset taken from the HTTP headers
        (`SLA_CLASS_HEADER`, `SLO_TTFT_HEADER`, `SLO_TPOT_HEADER`); a bad header is a 400 naming it."""
        update: dict[str, Any] = {}
        if self.sla_class is None and (raw := headers.get(SLA_CLASS_HEADER)) is not None:
            if len(raw) > MAX_SLA_CLASS_CHARS:
                raise InvalidRequest(
                    f"header {SLA_CLASS_HEADER} is longer than {MAX_SLA_CLASS_CHARS} characters", SLA_CLASS_HEADER
                )
            update["sla_class"] = raw
        for field, header in (("slo_ttft_ms", SLO_TTFT_HEADER), ("slo_tpot_ms", SLO_TPOT_HEADER)):
            if getattr(self, field) is None and (raw := headers.get(header)) is not None:
                update[field] = _milliseconds(raw, header)
        return self.model_copy(update=update) if update else self

    @field_validator("retrieval", mode="before")
    @classmethod
    def _retrieval_object(cls, v: Any) -> Any:
        """An object is validated as `RetrievalOptions` alone, so its errors name its fields."""
        return RetrievalOptions.model_validate(v) if isinstance(v, dict) else v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if isinstance(v, str):
            v = [v]
        if v is not None and any(not s for s in v):
            raise ValueError("stop sequences must be non-empty")
        return v

    def requested_max_tokens(self) -> int | None:
        raise NotImplementedError

    def check_fields(self) -> None:
        """Checks across fields that pydantic cannot name a field for; raises `InvalidRequest`."""
        max_tokens = self.requested_max_tokens()
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise InvalidRequest(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens"
            )
        if self.response_format is not None:
            self.response_format.check_schema()

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingOptions:
        s = SamplingOptions(max_tokens=max_tokens, n=self.n, seed=self.seed, logprobs=logprobs)
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(s, name, value)
        s.stop = list(self.stop or [])
        s.stop_token_ids = list(self.stop_token_ids or [])
        s.logit_bias = dict(self.logit_bias or {})
        s.min_tokens = self.min_tokens
        s.ignore_eos = self.ignore_eos
        s.structured = self.response_format.structured() if self.response_format is not None else None
        return s


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDef] | None = None
    """Functions the model may call (docs/tools.md); only tiers with `tools` set serve them."""
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = Field(None, json_schema_extra={"deprecated": True})
    """OpenAI's deprecated function calling: refused (send `tools`), never silently ignored."""
    function_call: Any = Field(None, json_schema_extra={"deprecated": True})

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @field_validator("functions", "function_call")
    @classmethod
    def _legacy_function_calling(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None:
            current = "tools" if info.field_name == "functions" else "tool_choice"
            raise ValueError(f"OpenAI's deprecated function calling is not supported; send {current} (docs/tools.md)")
        return v

    def uses_tools(self) -> bool:
        """Whether only a tier that serves tools can take it: it offers functions, or its history
        holds calls or their results (which only a tool chat template renders)."""
        return bool(self.tools) or any(m.tool_calls or m.role == "tool" for m in self.messages)

    def check_fields(self) -> None:
        super().check_fields()
        if self.tool_choice is not None and not self.tools:
            raise InvalidRequest("tool_choice requires tools", "tool_choice")
        if self.tools:
            check_tools(self.tools, self.tool_choice)
            fmt = self.response_format
            if self.tool_choice != "none" and fmt is not None and fmt.type != "text":
                raise InvalidRequest(
                    "response_format cannot be combined with tools the model may call: decoding follows one form; "
                    "send tool_choice 'none', or describe the answer as a function",
                    "response_format",
                )

    def routing_text(self) -> tuple[str, int]:
        """The text complexity is scored on (the conversation, last turn last) and the number
        of user turns."""
        text = "\n".join(m.text() for m in self.messages if m.role in ("user", "system", "developer"))
        return text, sum(1 for m in self.messages if m.role == "user")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_generate(self, request_id: str) -> GenerateRequest:
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        request = GenerateRequest(
            request_id=request_id,
            sampling=self._sampling(max_tokens, logprobs),
            messages=[m.to_message() for m in self.messages],
        )
        if self.tools:
            request.tools, structured = tool_calling(self.tools, self.tool_choice, self.parallel_tool_calls)
            request.sampling.structured = structured or request.sampling.structured
        return request


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions` with one prompt (text or token ids)."""

    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("batched prompts are not supported; send one request per prompt")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    @field_validator("best_of")
    @classmethod
    def _one_of_each(cls, v: int | None) -> int | None:
        if v is not None and v > 1:
            raise ValueError("best_of is not supported; ask for n choices and pick among them")
        return v

    def routing_text(self) -> tuple[str, int]:
        return (self.prompt if isinstance(self.prompt, str) else ""), 1

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def to_generate(self, request_id: str) -> GenerateRequest:
        prompt = self.prompt
        return GenerateRequest(
            request_id=request_id,
            sampling=self._sampling(self.max_tokens, self.logprobs),
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=None if isinstance(prompt, str) else list(prompt),
        )


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`: vectors of one text or a list of texts, from the retriever's
    embedder (the model `GET /v1/models` lists beside the tiers)."""

    model_config = REQUEST_CONFIG

    model: Text = Field(max_length=256)
    input: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    """`base64`: each vector's little-endian float32 bytes (what the `openai` client asks for)."""
    dimensions: int | None = Field(None, ge=1, le=INT32_MAX)
    """Accepted only as the embedder's own dimension: its vectors are not trained to be cut short."""
    user: Text | None = Field(None, max_length=256)

    @field_validator("input")
    @classmethod
    def _texts(cls, v: Any) -> list[str]:
        if isinstance(v, str):
            v = [v]
        if not v:
            raise ValueError("input must not be empty")
        if not all(isinstance(text, str) for text in v):
            raise ValueError(
                "token ids are not accepted: the embedder has its own tokenizer; send text (langchain's "
                "OpenAIEmbeddings: check_embedding_ctx_length=False)"
            )
        if any(not text for text in v):
            raise ValueError("input texts must not be empty")
        return v

    def texts(self) -> list[str]:
        return list(self.input)  # type: ignore[arg-type]  # a list of texts once validated


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error tierserve answers, in OpenAI's schema."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route that answers these error statuses."""
    why = {
        400: "Invalid request: the field is named in `param`",
        401: "No API key, or not a valid one (auth on)",
        403: "The API key may not use this model or route",
        404: "Unknown model or index (or an index the API key may not read)",
        413: "Request body over `ingress.limits.max_body_bytes`",
        429: "Every tier that could serve it is full, a limit of the API key is reached (with `Retry-After`), "
        "or its budget is spent",
        500: "Unexpected error (the message carries the request id)",
        503: "No tier (or the retriever) can serve it now (with `Retry-After`)",
        504: "No first token, or no retriever answer, in time",
    }
    return {status: {"model": ErrorResponse, "description": why[status]} for status in statuses}


def validation_error(errors: list[dict[str, Any]]) -> InvalidRequest:
    """One 400 from pydantic's errors, with its field path as `param`. Of a union's branches,
    the error deepest in the input (then one our own validators raised) says most."""
    first = max(
        enumerate(errors), key=lambda ie: (len(ie[1].get("loc", ())), ie[1].get("type") == "value_error", -ie[0])
    )[1]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # Drop pydantic's union-branch tags (e.g. 'str', 'list[...]') that follow the field path.
    param = ".".join(
        p
        for p in loc
        if not p.startswith(("list[", "function-", "json-or-python["))
        and p not in ("str", "int", "float", "bool", "[key]")
    )
    param = param.strip(".")
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return InvalidRequest(
            f"request body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None, "invalid_json"
        )
    return InvalidRequest(f"{param or 'body'}: {message}" if param else message, param or None)
