"""The OpenAI HTTP surface's plumbing: the FastAPI app the ingress deployment serves, its gate
(API keys, the admin scope, the audit line), its body limit, its error responses in the OpenAI
schema, and server-sent events.

The routes themselves are the `Ingress` deployment's methods (`tierserve.router.ingress`); what
a request goes through is `tierserve.router.pipeline`.
"""

from __future__ import annotations

import contextlib
import ipaddress
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

from tierserve.core.errors import InvalidRequest, TierServeError
from tierserve.router.access import ANONYMOUS, Access, Principal
from tierserve.router.audit import Auditor, AuditRecord
from tierserve.router.config import RequestLimits
from tierserve.router.limits import body_too_large
from tierserve.router.pipeline import new_request_id
from tierserve.router.protocol import validation_error
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

ADMIN_ROUTES = ("/v1/tiers", "/v1/indexes", "/docs", "/openapi.json")
"""Routes (and what lies under them) that need the admin scope when auth is on."""
OPEN_ROUTES = ("/health",)
"""Routes anyone may call; what they tell depends on the key (`/health`: up or down only)."""


def route_path(scope: dict[str, Any]) -> str:
    """The request's path under the application's route prefix."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def bearer(scope: dict[str, Any]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if any."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class Gate:
    """ASGI middleware in front of every route (outside the body limit): who is calling, whether
    they may call this route, and the request's audit line when its response ends.

    With auth on, every route but `OPEN_ROUTES` needs a valid API key (401 with
    `WWW-Authenticate: Bearer` otherwise, before the body is read) and `ADMIN_ROUTES` the admin
    scope (403); an unknown path needs a key too, so the anonymous learn no route. The caller's
    `Principal` and the `AuditRecord` go to the route in `request.state` (`principal_of`,
    `audit_of`)."""

    access: Access | None = None
    auditor: Auditor | None = None
    """Both set by the `Ingress` constructor (one per replica process)."""

    def __init__(self, asgi: Any):
        self.asgi = asgi

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        access, auditor = Gate.access, Gate.auditor
        if scope["type"] != "http" or access is None or auditor is None:
            return await self.asgi(scope, receive, send)
        path = route_path(scope)
        client = client_address(scope, access.config.trusted_proxies)
        record = AuditRecord(f"{scope.get('method', '')} {path}", client)
        state = scope.setdefault("state", {})
        state["audit"] = record

        async def sent(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        try:
            try:
                principal = self._principal(access, scope, path, client)
            except TierServeError as exc:
                record.failed(exc.status_code, exc.code)
                headers = {"www-authenticate": "Bearer"} if exc.status_code == 401 else None
                return await error_response(exc, headers)(scope, receive, sent)
            if principal is not None:
                record.called_by(principal.key_id, principal.name)
            state["principal"] = principal
            await self.asgi(scope, receive, sent)
        except Exception:
            record.failed(500, "internal_error")  # FastAPI's handler of the unexpected runs outside
            raise
        finally:
            auditor.close(record)

    @staticmethod
    def _principal(access: Access, scope: dict[str, Any], path: str, client: str) -> Principal | None:
        token = bearer(scope)
        if path in OPEN_ROUTES:
            if not access.enabled:
                return ANONYMOUS
            try:
                return access.authenticate(token, client) if token else None
            except TierServeError:
                return None
        principal = access.authenticate(token, client)
        if any(path == r or path.startswith(r + "/") for r in ADMIN_ROUTES):
            principal.require_admin(path)
        return principal


app.add_middleware(Gate)


def principal_of(request: Request) -> Principal | None:
    """The caller the `Gate` let in (`ANONYMOUS` when auth is off); None: nobody known (an open
    route without a valid key), which gets nothing more than the anonymous."""
    return getattr(request.state, "principal", None)


def client_address(scope: dict[str, Any], trusted: list[Any]) -> str:
    """The caller's address: the TCP peer, or when the peer is one of the `trusted` proxies (IP
    networks), the last address in `X-Forwarded-For` that is not (what a client sends there
    itself is only believed past a proxy it cannot be)."""
    peer = (scope.get("client") or ("",))[0] or ""
    if not trusted or not _within(peer, trusted):
        return peer
    forwarded = [
        part.strip()
        for name, value in scope.get("headers") or ()
        if name == b"x-forwarded-for"
        for part in value.decode("latin-1").split(",")
    ]
    for address in reversed(forwarded):
        if not _within(address, trusted):
            return address
    return peer


def _within(address: str, networks: list[Any]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def audit_of(request: Request) -> AuditRecord:
    """The request's audit line (a detached one when no `Gate` made it)."""
    record = getattr(request.state, "audit", None)
    return record if record is not None else AuditRecord(f"{request.method} {request.url.path}")


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


def refused(request: Request, exc: TierServeError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The error response for a request, its code noted on the request's audit line."""
    audit_of(request).failed(exc.status_code, exc.code)
    return error_response(exc, headers)


def _reads_as_json(content_type: str) -> bool:
    """Whether FastAPI parses a body of this type as JSON: none given, application/json or
    application/*+json. It reads any other as bytes, on purpose here too: a browser must ask
    CORS before it may send one of these, not before a form or text/plain."""
    main, _, sub = content_type.partition(";")[0].strip().lower().partition("/")
    return not content_type or (main == "application" and (sub == "json" or sub.endswith("+json")))


@app.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    about_body = any(tuple(e.get("loc", ()))[:1] == ("body",) for e in exc.errors())
    if about_body and not _reads_as_json(content_type):  # `curl -d` sends application/x-www-form-urlencoded
        message = f"the request body must be JSON sent as Content-Type: application/json, not {content_type[:100]!r}"
        return refused(request, InvalidRequest(message, None, "invalid_content_type"))
    return refused(request, validation_error(list(exc.errors())))


_HTTP_CODES = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
"""Starlette's errors as OpenAI codes (FastAPI's only 400 is a body its JSON decoder failed on
in a way other than a syntax error, such as nesting too deep)."""


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = TierServeError(str(exc.detail), None, _HTTP_CODES.get(exc.status_code))
    err.status_code = exc.status_code
    return refused(request, err, getattr(exc, "headers", None))


@app.exception_handler(TierServeError)
async def _on_user_error(request: Request, exc: TierServeError) -> JSONResponse:
    return refused(request, exc)


@app.exception_handler(Exception)
async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    audit_of(request).failed(500, "internal_error")
    return JSONResponse(internal_error(exc, f"{request.method} {request.url.path}"), status_code=500)


async def sse(batches: AsyncIterator[list[BaseModel]]) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's framing, one write per batch; a late error becomes a final
    error event. Closing it closes `batches` (and so the tier's stream) at once."""
    try:
        async with contextlib.aclosing(batches) as source:
            async for batch in source:
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
