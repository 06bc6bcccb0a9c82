"""Request limits (OWASP LLM10, unbounded consumption): what one request may ask for. The
pipeline calls `check_limits` on every parsed request before routing, guards, retrieval or
tokenization spend anything on it; the body's size is checked earlier still, as it arrives
(`tierserve.router.http.BodyLimit`). Each refusal names the limit (its config key under
`ingress.limits`) and the field that broke it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tierserve.core.errors import InvalidRequest, TierServeError
from tierserve.router.config import RequestLimits
from tierserve.router.protocol import EmbeddingRequest


class LimitExceeded(InvalidRequest):
    """A request over one of `ingress.limits` (400)."""

    default_code = "limit_exceeded"


class BodyTooLarge(TierServeError):
    """An HTTP body over `ingress.limits.max_body_bytes` (413)."""

    status_code = 413
    default_code = "request_too_large"


def body_too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"the request body is over ingress.limits.max_body_bytes ({limit} bytes)")


def _over(what: str, count: int, limit: int, key: str, param: str) -> LimitExceeded:
    return LimitExceeded(f"{what} is {count}, over ingress.limits.{key} ({limit})", param)


def _check_chars(texts: Iterable[str], limits: RequestLimits, what: str, param: str) -> None:
    """`max_prompt_chars` over several texts together; `param` (a format with the text's index)
    names the text that crossed it."""
    chars = 0
    for i, text in enumerate(texts):
        chars += len(text)
        if chars > limits.max_prompt_chars:
            raise _over(what, chars, limits.max_prompt_chars, "max_prompt_chars", param.format(i))


def check_limits(body: Any, limits: RequestLimits) -> None:
    """Raise `LimitExceeded` for the first limit `body` (a chat, completion or embeddings
    request) breaks, then its cross-field checks (`check_fields`)."""
    if isinstance(body, EmbeddingRequest):
        texts = body.texts()
        most = limits.max_embedding_inputs
        if len(texts) > most:
            raise _over("the number of inputs", len(texts), most, "max_embedding_inputs", "input")
        _check_chars(texts, limits, "the inputs' length in characters", "input.{}")
        return
    messages = getattr(body, "messages", None)
    if messages is not None:
        if len(messages) > limits.max_messages:
            raise _over("the number of messages", len(messages), limits.max_messages, "max_messages", "messages")
        texts = (message.text() + message.call_text() for message in messages)
        _check_chars(texts, limits, "the messages' length in characters", "messages.{}.content")
        tools = body.tools or []
        if len(tools) > limits.max_tools:
            raise _over("the number of tools", len(tools), limits.max_tools, "max_tools", "tools")
        chars = sum(len(tool.model_dump_json(exclude_none=True)) for tool in tools)
        if chars > limits.max_tools_chars:
            raise _over("the tools' length in characters", chars, limits.max_tools_chars, "max_tools_chars", "tools")
    else:
        prompt = body.prompt
        if isinstance(prompt, str) and len(prompt) > limits.max_prompt_chars:
            raise _over(
                "the prompt's length in characters", len(prompt), limits.max_prompt_chars, "max_prompt_chars", "prompt"
            )
        if isinstance(prompt, list) and len(prompt) > limits.max_prompt_token_ids:
            raise _over(
                "the prompt's length in token ids",
                len(prompt),
                limits.max_prompt_token_ids,
                "max_prompt_token_ids",
                "prompt",
            )
    fmt = body.response_format
    if fmt is not None and fmt.schema_json is not None:
        chars = len(fmt.schema_json)
        if chars > limits.max_schema_chars:
            raise _over(
                "the JSON Schema's length in characters",
                chars,
                limits.max_schema_chars,
                "max_schema_chars",
                "response_format.json_schema.schema",
            )
    stop = body.stop or []
    if len(stop) > limits.max_stop:
        raise _over("the number of stop sequences", len(stop), limits.max_stop, "max_stop", "stop")
    for i, sequence in enumerate(stop):
        if len(sequence) > limits.max_stop_chars:
            raise _over("a stop sequence's length", len(sequence), limits.max_stop_chars, "max_stop_chars", f"stop.{i}")
    ids = body.stop_token_ids or []
    if len(ids) > limits.max_stop_token_ids:
        raise _over(
            "the number of stop_token_ids", len(ids), limits.max_stop_token_ids, "max_stop_token_ids", "stop_token_ids"
        )
    biased = len(body.logit_bias or {})
    if biased > limits.max_logit_bias:
        raise _over("the number of tokens in logit_bias", biased, limits.max_logit_bias, "max_logit_bias", "logit_bias")
    body.check_fields()
