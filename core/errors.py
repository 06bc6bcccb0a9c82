"""Typed user errors.

A `TierServeError` is the caller's fault or a condition the caller must react to (bad input,
unknown model, prompt too long, service unavailable). It pickles by its positional args, so it
survives the trip out of a Ray Serve replica, and the ingress renders it in the OpenAI error
schema with its own status code. Anything else raised in the pipeline is a bug: it is logged
with the request id and becomes a generic 500.
"""

from __future__ import annotations

from typing import Any


class TierServeError(Exception):
    """Base of all user-facing errors; rendered as `{"error": {message, type, param, code}}`."""

    status_code: int = 400
    error_type: str = "invalid_request_error"
    default_code: str | None = None
    default_retry_after_s: float | None = None

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, retry_after_s: float | None = None
    ):
        super().__init__(message, param, code, retry_after_s)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.retry_after_s = retry_after_s if retry_after_s is not None else self.default_retry_after_s
        """When set, HTTP responses carry `Retry-After` (whole seconds, rounded up)."""

    def __str__(self) -> str:
        return self.message

    def to_openai(self) -> dict[str, Any]:
        """The body of the HTTP error response, in the OpenAI error schema."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(TierServeError):
    """The request is malformed or asks for something the engine refuses."""

    default_code = "invalid_request"


class ContextLengthExceeded(TierServeError):
    """Prompt tokens plus `max_tokens` do not fit the tier's context window."""

    default_code = "context_length_exceeded"


class ModelNotFound(TierServeError):
    """`model` names neither a tier nor `auto`."""

    status_code = 404
    default_code = "model_not_found"


class ServiceUnavailable(TierServeError):
    """The engine behind a tier is dead or not ready; retrying later (or elsewhere) may work."""

    status_code = 503
    error_type = "service_unavailable_error"
    default_code = "engine_unavailable"


def unwrap_error(exc: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError and friends), if any."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            exc = cause
            continue
        break
    return exc


class Overloaded(TierServeError):
    """Every tier that could serve the request is full; retry after `retry_after_s`.

    Raised at once (load shedding), before the request is queued anywhere. Handle callers catch
    this type; HTTP callers get a 429 with a `Retry-After` header."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "overloaded"
    default_retry_after_s = 1.0


class RequestTimeout(TierServeError):
    """The request did not finish (or start) within the configured timeout."""

    status_code = 504
    error_type = "timeout_error"
    default_code = "timeout"


class Unauthenticated(TierServeError):
    """No API key, or one that is unknown, revoked or malformed (401)."""

    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(TierServeError):
    """The API key is valid but may not do this: a tier it may not use, an admin route (403)."""

    status_code = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class RateLimited(TierServeError):
    """A per-key limit is reached (requests or tokens per minute, concurrent streams, or too many
    failed authentications); retry after `retry_after_s` (429)."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"
    default_retry_after_s = 1.0


class QuotaExceeded(TierServeError):
    """The API key spent its budget for the period (429, OpenAI's `insufficient_quota`); it
    renews when the period does (`retry_after_s`)."""

    status_code = 429
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"
