"""The audit log: one JSON line per request, in its own file (`ingress.auth.audit_log`).

A line says who called (key id and name, client address), what they asked for (entry point,
model), where it went and why (tier, routing reason), what it cost (prompt and completion
tokens, cost, latency, time to first token), what the guards found (counts by entity type and
stage) and how it ended (HTTP status, error code, outcome). It never holds the prompt's or the
answer's text: `prompt_sha256` is an HMAC of the request's messages or prompt under the server
secret (a random per-process salt when auth is off), so equal prompts can be matched in the
log without being readable from it.

HTTP requests are written by the `Gate` middleware (`tierserve.router.http`) when the
response ends, handle calls by the ingress's methods; the pipeline fills in the request's part.
Each line is written and flushed when its request ends (not through Ray Serve's replica log,
which buffers), so a crash loses no finished request's line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import logging.handlers
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("tierserve.audit")
"""The lines, and nothing else: its handler is the audit log's."""
_log = logging.getLogger("tierserve.ingress")


def _setup(destination: str) -> None:
    """The audit logger writes bare JSON lines to `destination` (a file, or `stderr`: the
    process's own, not the one Serve redirects into its buffered log), whatever the root
    logger's level."""
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    if destination == "stderr":
        handler: logging.Handler = logging.StreamHandler(sys.__stderr__)
    else:
        path = os.path.expanduser(destination)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


_SALT = secrets.token_bytes(32)


class Auditor:
    """Writes the lines of one ingress replica."""

    def __init__(
        self,
        destination: str | None,
        secret: bytes | None = None,
        observe: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.enabled = destination is not None
        """None: no lines written (the per-key metrics are still counted)."""
        self.secret = secret or _SALT
        self.observe = observe
        """Told every line's fields, logged or not (the per-key metrics)."""
        if destination is not None:
            _setup(destination)

    def fingerprint(self, body: Any) -> str | None:
        """HMAC-SHA256 of what the caller sent as the prompt (messages, prompt, or embeddings'
        input); None when no
        line is written (it is not computed)."""
        if not self.enabled:
            return None
        text = body.model_dump_json(include={"messages", "prompt", "input"})
        return hmac.new(self.secret, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def close(self, record: AuditRecord) -> None:
        """The request is over: run its closers and write its line, once."""
        if record.written:
            return
        record.written = True
        for close in record.closers:
            try:
                close()
            except Exception:
                _log.exception("closing a request failed")
        fields = record.fields()
        if self.observe is not None:
            try:
                self.observe(fields)
            except Exception:
                _log.exception("counting a request by key failed")
        if self.enabled:
            logger.info(json.dumps(fields, separators=(",", ":")))


@dataclass
class AuditRecord:
    """One request's line, filled in as it goes."""

    route: str
    """The HTTP method and path (`POST /v1/chat/completions`), or the handle method (`handle chat`)."""
    client: str = ""
    started: float = field(default_factory=time.perf_counter)
    key_id: str | None = None
    key_name: str | None = None
    model: str | None = None
    prompt_sha256: str | None = None
    status: int | None = None
    code: str | None = None
    outcome: str | None = None
    prompt_tokens: int | None = None
    """Tokens read, for a request with no pipeline context (embeddings)."""
    ctx: Any = None
    """The pipeline's `RequestContext` of the request, once it has one: tier, usage, guards'
    findings (typed loosely: the audit line is below the pipeline)."""
    closers: list[Callable[[], None]] = field(default_factory=list)
    """Run when the request is over, before its line is written: what it holds is given back
    (its key's place), however it ended."""
    written: bool = False

    def called_by(self, key_id: str | None, name: str) -> None:
        """The caller's key (none when auth is off: no name either)."""
        self.key_id, self.key_name = key_id, name if key_id else None

    def failed(self, status: int, code: str | None) -> None:
        self.status, self.code = status, code

    def fields(self) -> dict[str, Any]:
        """The line's fields (JSON types only)."""
        out: dict[str, Any] = {
            "audit": "tierserve.request",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "route": self.route,
            "client": self.client,
            "key_id": self.key_id,
            "key_name": self.key_name,
            "model": self.model,
            "status": self.status,
            "code": self.code,
            "outcome": self.outcome,
            "latency_ms": round((time.perf_counter() - self.started) * 1e3, 1),
            "prompt_sha256": self.prompt_sha256,
        }
        if self.prompt_tokens is not None:
            out["prompt_tokens"] = self.prompt_tokens
        ctx = self.ctx
        if ctx is not None:
            out["request_id"] = ctx.rid
            if out["outcome"] is None and ctx.outcome is not None:
                out["outcome"] = ctx.outcome.value
            routed = ctx.routed
            if routed is not None:
                ttft = routed.ttft_ms()
                out.update(
                    tier=routed.tier or (routed.decision.first.tier if routed.decision.first else None),
                    reason=routed.reason,
                    sla_class=routed.sla.name,
                    ttft_ms=round(ttft, 1) if ttft is not None else None,
                    prompt_tokens=routed.usage.prompt_tokens if routed.usage else None,
                    completion_tokens=routed.usage.completion_tokens if routed.usage else None,
                    cost=routed.cost,
                    fallback_from=[t for t, _ in routed.tried] or None,
                )
            if ctx.retrieval is not None:
                out["index"] = ctx.retrieval.index
            findings = {
                stage: dict(counts)
                for stage, counts in (
                    ("input", ctx.safety.input),
                    ("retrieved", ctx.safety.retrieved),
                    ("output", ctx.safety.output),
                )
                if counts
            }
            out["guard_findings"] = findings or None
            if ctx.safety.output_blocked:
                out["output_blocked"] = ctx.safety.output_blocked
        return out
