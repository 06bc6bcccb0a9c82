"""Property-based fuzzing of the HTTP API from the ingress's own OpenAPI document (schemathesis).

Schemathesis generates requests for every route, both fitting the document (positive) and
breaking it (negative: wrong types, missing fields, out-of-range numbers), sends them to the
running app, and checks each answer: never a 5xx, only status codes and content types the
document lists, bodies that match its schemas, and every error in OpenAI's error schema. Half of
the generated completions are steered to a real tier with a few tokens, so generated sampling
parameters reach vLLM itself. Seeded (`derandomize`) and bounded here; `bench/fuzz.py` runs
the same test longer with other seeds (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import TIER

pytestmark = [pytest.mark.integration, pytest.mark.disturbing]

EXAMPLES = int(os.environ.get("TIERSERVE_FUZZ_EXAMPLES", "60"))
"""Generated requests per route and mode (bench/fuzz.py sets more)."""
SEED_NAME = os.environ.get("TIERSERVE_FUZZ_SEED", "")
"""Anything but empty turns `derandomize` off in favour of the run's own random seed."""
MAX_TOKENS = 4
ERROR_FIELDS = {"message", "type", "param", "code"}

seen: dict[int, int] = {}
"""Status codes answered, over the whole run (printed at the end, for docs/reliability.md)."""


def _schema():
    """The OpenAPI document the ingress serves at /openapi.json (the same code builds it here;
    `test_the_served_document_is_the_one_fuzzed` checks that they agree)."""
    from tierserve.router.ingress import app as ingress_app

    schema = schemathesis.openapi.from_dict(ingress_app.openapi())
    schema.config.generation.update(
        modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
        max_examples=EXAMPLES,
        deterministic=not SEED_NAME,
    )
    return schema


schema = _schema()


def test_the_served_document_is_the_one_fuzzed(http):
    assert http.get("/openapi.json").json() == schema.raw_schema


def steer(case) -> None:
    """Send every other generated completion (chosen by a hash of its body, so reruns agree) to
    a real tier with at most `MAX_TOKENS` tokens, so that its sampling fields reach the engine
    instead of ending at `model_not_found`."""
    body = case.body
    if case.method != "POST" or not isinstance(body, dict):
        return
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=repr).encode()).digest()
    if digest[0] % 2:
        return
    body["model"] = "auto" if digest[1] % 2 else TIER
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), int) and not isinstance(body.get(field), bool):
            body[field] = max(1, min(body[field], MAX_TOKENS)) if body[field] > 0 else body[field]
    if "max_completion_tokens" not in body:
        body.setdefault("max_tokens", MAX_TOKENS)


def openai_error_schema(response) -> None:
    """Every error body is `{"error": {message, type, param, code}}`."""
    if response.status_code < 400:
        return
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, (response.status_code, body)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@schema.parametrize()
@settings(deadline=None, derandomize=not SEED_NAME, suppress_health_check=list(HealthCheck), print_blob=True)
def test_generated_requests_never_get_a_5xx(app, case):
    steer(case)
    response = case.call(base_url=app.http, timeout=120)
    seen[response.status_code] = seen.get(response.status_code, 0) + 1
    case.validate_response(
        response,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
    )
    openai_error_schema(response)


def test_fuzzing_reached_the_engine_and_the_validation():
    """The run above did both: answers (200) and refusals (4xx), and never a 5xx."""
    if not seen:
        pytest.skip("runs after test_generated_requests_never_get_a_5xx, in the same session")
    print(f"\nfuzz statuses: {dict(sorted(seen.items()))}")
    assert seen.get(200, 0) > 0 and sum(n for s, n in seen.items() if 400 <= s < 500) > 0
    assert not any(s >= 500 for s in seen)
