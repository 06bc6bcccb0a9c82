"""JSON Schema checks for `response_format`: whether the tiers' decoding can follow a schema,
and whether an answer (one the guards rewrote) is still valid against it.

Plain functions on the schema as parsed JSON, used by the request models
(`tierserve.router.protocol.ResponseFormat`) and the output guard step. Schemas are checked with
the `jsonschema` package against their draft's meta-schema (2020-12 unless `$schema` says
otherwise); keywords the decoding backends ignore are refused (docs/structured-outputs.md).
"""

from __future__ import annotations

import json
from typing import Any

from tierserve.core.errors import InvalidRequest

UNENFORCED_KEYWORDS = frozenset(
    {
        "not", "allOf", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
        "minProperties", "maxProperties", "patternProperties", "unevaluatedProperties", "unevaluatedItems",
        "$dynamicRef", "$recursiveRef",
    }
)  # fmt: skip
"""JSON Schema keywords the tiers' decoding (vLLM's xgrammar and guidance backends) ignores or
fails on, measured: a schema using one is refused, so that every answer decoded is valid
against the schema it was asked for. OpenAI's strict mode does not take them either."""
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
"""Keywords whose value maps names to subschemas (the names are not keywords)."""
_SCHEMA_VALUES = ("items", "additionalProperties", "contains", "propertyNames")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")


def _unenforced(schema: dict[str, Any]) -> tuple[str, str] | None:
    """The first (path, keyword) in `schema` that decoding cannot enforce: an
    `UNENFORCED_KEYWORDS` keyword, or a `$ref` outside the schema (nothing is fetched)."""
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        for keyword in node:
            if keyword in UNENFORCED_KEYWORDS:
                return path, keyword
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return path, f"$ref {ref[:64]}"
        for keyword in _SCHEMA_MAPS:
            if isinstance(children := node.get(keyword), dict):
                stack.extend((child, f"{path}/{keyword}/{name}".lstrip("/")) for name, child in children.items())
        for keyword in _SCHEMA_VALUES:
            stack.append((node.get(keyword), f"{path}/{keyword}".lstrip("/")))
        for keyword in _SCHEMA_LISTS:
            if isinstance(children := node.get(keyword), list):
                stack.extend((child, f"{path}/{keyword}/{i}".lstrip("/")) for i, child in enumerate(children))
    return None


MAX_SCHEMA_NESTING = 32
"""Levels of objects and arrays a `response_format` schema may nest (OpenAI allows 10 levels of
schema nesting; vLLM refuses past 64, and grammar compilation grows steeply with depth)."""


def _nesting(value: Any) -> int:
    """How deep objects and arrays nest in `value` (iteratively: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_SCHEMA_NESTING:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_schema(schema: dict[str, Any], param: str) -> None:
    """Raise `InvalidRequest` (naming `param`) unless `schema` is a JSON Schema that decoding can
    follow: nested at most `MAX_SCHEMA_NESTING` deep, encodable text, finite numbers, valid
    against its draft's meta-schema, and no keyword in `UNENFORCED_KEYWORDS`."""
    if _nesting(schema) > MAX_SCHEMA_NESTING:
        raise InvalidRequest(f"{param}: objects and arrays nest more than {MAX_SCHEMA_NESTING} levels deep", param)
    try:
        json.dumps(schema, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{param}: contains an unpaired UTF-16 surrogate", param) from None
    except ValueError:
        raise InvalidRequest(f"{param}: numbers must be finite", param) from None
    from jsonschema import exceptions, validators

    try:
        validators.validator_for(schema, default=validators.Draft202012Validator).check_schema(schema)
    except exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise InvalidRequest(
            f"{param}: not a valid JSON Schema{f' at {where}' if where else ''}: {exc.message}", param
        ) from None
    if (found := _unenforced(schema)) is not None:
        where, keyword = found
        raise InvalidRequest(
            f"{param}: {keyword!r}{f' at {where}' if where else ''} is not supported: decoding cannot enforce it "
            f"(supported: docs/structured-outputs.md)",
            param,
            "unsupported_schema",
        )


def answer_problem(answer: str, schema: dict[str, Any] | None) -> str | None:
    """Why `answer` is not JSON valid against `schema` (None: any JSON object); None when it is."""
    try:
        value = json.loads(answer)
    except ValueError as exc:
        return f"not JSON ({exc.msg} at character {exc.pos})"
    if schema is None:
        return None if isinstance(value, dict) else "not a JSON object"
    from jsonschema import validators

    validator = validators.validator_for(schema, default=validators.Draft202012Validator)(schema)
    error = next(validator.iter_errors(value), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"not valid against the schema{f' at {where}' if where else ''}: {error.message}"
