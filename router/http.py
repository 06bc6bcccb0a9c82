"""The OpenAI HTTP surface's plumbing: the FastAPI app the ingress deployment serves, its body
limit, its error responses in the OpenAI schema, and server-sent events.

The routes themselves are the `Ingress` deployment's methods (`tierserve.router.ingress`); what
a request goes through is `tierserve.router.pipeline`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import trace
from pydantic import BaseModel
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierserve.core.errors import TierServeError
from tierserve.router.config import RequestLimits
from tierserve.router.pipeline import new_request_id
from tierserve.router.protocol import body_too_large, validation_error
from tierserve.router.tracing import end_with_status

logger = logging.getLogger("tierserve.ingress")

app = FastAPI(title="tierserve", docs_url="/docs", redoc_url=None)


class BodyLimit:
    """ASGI middleware refusing a request body over `ingress.limits.max_body_bytes` with 413,
    from its `Content-Length` before reading it, else as its chunks arrive."""

    max_body_bytes = RequestLimits().max_body_bytes
    """Set by the `Ingress` constructor (one per replica process) from its config."""

    def __init__(self, asgi: Any):
        self.asgi = asgi

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        limit = BodyLimit.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            error = body_too_large(limit)
            return await error_response(error)(scope, receive, send)
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, body_too_large(limit).message)
            return message

        await self.asgi(scope, counted, send)


app.add_middleware(BodyLimit)

_fastapi_openapi = app.openapi


def _openapi() -> dict[str, Any]:
    """FastAPI's OpenAPI document less its 422 responses: tierserve answers bad input with 400."""
    if app.openapi_schema is None:
        schema = _fastapi_openapi()
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


def request_id(prefix: str) -> str:
    """`<prefix>-<Serve's request id>`, so the id in responses matches Serve's logs."""
    try:
        rid = serve.context._get_serve_request_context().request_id
    except Exception:  # called outside a Serve request
        rid = ""
    return f"{prefix}-{rid}" if rid else new_request_id(prefix)


def error_response(exc: TierServeError, headers: dict[str, str] | None = None) -> JSONResponse:
    if exc.retry_after_s is not None:
        headers = {**(headers or {}), "retry-after": str(max(1, math.ceil(exc.retry_after_s)))}
    return JSONResponse(exc.to_openai(), status_code=exc.status_code, headers=headers)


def internal_error(exc: BaseException, where: str) -> dict[str, Any]:
    rid = request_id("req")
    logger.error("%s failed (request %s): %r", where, rid, exc, exc_info=exc)
    return {
        "error": {
            "message": f"internal server error (request id {rid})",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }


@app.exception_handler(RequestValidationError)
async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(list(exc.errors())))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = TierServeError(str(exc.detail), None, _HTTP_CODES.get(exc.status_code))
    err.status_code = exc.status_code
    return error_response(err, getattr(exc, "headers", None))


@app.exception_handler(TierServeError)
async def _on_user_error(_: Request, exc: TierServeError) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(Exception)
async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(internal_error(exc, f"{request.method} {request.url.path}"), status_code=500)


async def sse(batches: AsyncIterator[list[BaseModel]]) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's framing, one write per batch; a late error becomes a final
    error event."""
    try:
        async for batch in batches:
            yield "".join(f"data: {obj.model_dump_json(exclude_unset=True)}\n\n" for obj in batch)
    except TierServeError as exc:
        yield f"data: {json.dumps(exc.to_openai())}\n\n"
    except Exception as exc:
        yield f"data: {json.dumps(internal_error(exc, 'stream'))}\n\n"
    yield "data: [DONE]\n\n"


async def ending(body: AsyncIterator[Any], span: trace.Span) -> AsyncIterator[Any]:
    """A streamed body that ends the request's span when the stream ends (or the client leaves,
    even before the body is read: it is `primed`), and closes the stream under it."""
    try:
        yield b""  # taken by `primed`
        async for part in body:
            yield part
    finally:
        end_with_status(span, 200)
        await body.aclose()
