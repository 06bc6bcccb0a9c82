"""A tier's refusals in the caller's terms: a prompt over the context window, and the errors
vLLM raises about a request, as 400s naming the field."""

from __future__ import annotations

from tierserve.core.errors import ContextLengthExceeded, InvalidRequest


def context_error(
    prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str
) -> ContextLengthExceeded | None:
    """The error for a prompt (plus requested completion) that does not fit, else None."""
    if prompt_tokens >= max_model_len:
        return ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_tokens} tokens, leaving no room for a completion. Please shorten the prompt.",
            param,
        )
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        return ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
            "completion). Please reduce the length of the prompt or of max_tokens.",
            "max_tokens",
        )
    return None


STRUCTURED_PARAM = "response_format"
"""The request field an error about the answer's form (a schema vLLM cannot compile) names."""


def request_error(exc: BaseException, structured: bool = False) -> InvalidRequest | None:
    """The 400 for an error vLLM raises about the request, wherever it raises it (sampling
    parameters, tokenizer, the engine's `add_request`): its `VLLMClientError`s
    (`VLLMValidationError` names the parameter) and the plain `ValueError`s some of its checks
    still raise; None for anything else (a bug, or a dead engine). On a request with a
    structured output, an error naming no parameter is about its grammar (`STRUCTURED_PARAM`):
    vLLM checks the schema when the request is added."""
    from vllm.exceptions import VLLMClientError

    if isinstance(exc, (VLLMClientError, ValueError, OverflowError)):
        param = getattr(exc, "parameter", None) or (STRUCTURED_PARAM if structured else None)
        return InvalidRequest(str(exc), param)
    return None
