"""The building blocks every part of the OpenAPI document shares: errors, operations, parameters.

``openapi.py`` assembles the document from the models' operations (its own) and the generic routes
(``openapi_v2.py``); both build their operations with :func:`operation`, so every one documents the
same error answers and API-key requirements.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from asyncserve.model import ModelSpec

ERRORS: dict[int, tuple[str, str]] = {
    400: (
        "BadRequest",
        "The body is not valid JSON, a header is malformed (`X-Request-Timeout`, or a `Host` this server does not "
        "answer to), or the request does not fit the model: its V2 inputs, more rows than one call takes, or a "
        "feature key the model's source has no row for.",
    ),
    401: ("Unauthorized", "The server has API keys, and the request has none or a wrong one."),
    403: ("Forbidden", "The request's API key lacks the scope this route needs."),
    404: ("NotFound", "No such model (or version, deferred prediction or job) on this server."),
    405: ("MethodNotAllowed", "The path does not take this method; `Allow` lists those it takes."),
    409: (
        "IdempotencyConflict",
        "The idempotency key was used for another job, of another model or with other inputs; send a new key.",
    ),
    413: ("PayloadTooLarge", "The body is larger than the server accepts."),
    415: ("UnsupportedMediaType", "The body's `Content-Type` is not one this route takes (forms and text never are)."),
    422: ("SchemaViolation", "The body breaks this document's schema; the message starts with the field path."),
    429: ("RateLimited", "The API key is over its rate or concurrency limit; retry after `Retry-After`."),
    500: (
        "ModelError",
        "The model failed (`model_error`: the message names the model, never its internals), or the server did "
        "(`internal`: the server's log has the details).",
    ),
    502: ("FeatureUnavailable", "A feature source the model needs failed; the message names the source."),
    503: ("Unavailable", "The model is loading, the server is overloaded or shutting down; retry after `Retry-After`."),
    504: ("DeadlineExceeded", "The request's deadline (`X-Request-Timeout` or the model's timeout) passed."),
}
ERROR_HEADERS: dict[int, tuple[str, str, dict[str, Any]]] = {
    401: ("WWW-Authenticate", "How to authenticate: `Bearer`.", {"type": "string"}),
    405: ("Allow", "The methods the path takes.", {"type": "string"}),
    429: ("Retry-After", "Seconds to wait before retrying.", {"type": "integer", "minimum": 1}),
    503: ("Retry-After", "Seconds to wait before retrying.", {"type": "integer", "minimum": 1}),
}
KEYED = (401, 403, 429)
"""What a route that needs an API key answers besides, once the server has keys."""
BODY = (413, 415, 422)
INFERENCE = (*BODY, 500, 503, 504)
PRIORITY = "The priority lane, 0 (the default) to 9: higher lanes are served first."
PRIORITY_DIGITS = r"(?:-0+|0*[0-9])"
"""0 to 9 as ``int()`` reads it, after the server checks that it is all digits: "07" and "-0" are taken too."""


def degraded_header() -> dict[str, Any]:
    return {
        "description": "The feature sources whose defaults stood in: the answer is usable but degraded.",
        "schema": {"type": "string"},
    }


def build_operation(
    summary: str,
    responses: dict[str, Any],
    errors: Iterable[int],
    *,
    scope: str | None,
    tag: str = "inference protocol",
    **fields: Any,
) -> dict[str, Any]:
    """An operation answering ``responses`` and ``errors``; 400 always (a ``Host`` refused), and the API key's
    answers when the route needs a key with ``scope``."""
    statuses = {400, *errors, *(KEYED if scope is not None else ())}
    operation: dict[str, Any] = {"summary": summary, "tags": [tag], **fields}
    if scope is not None:
        needs = f"Needs an API key with the `{scope}` scope once the server has keys."
        operation["description"] = f"{fields['description']} {needs}" if "description" in fields else needs
        # Either scheme, or none: a server without keys (on loopback) opens every route.
        operation["security"] = [{"bearer": []}, {"apiKey": []}, {}]
    operation["responses"] = {**responses, **error_refs(sorted(statuses))}
    return operation


def security_schemes() -> dict[str, Any]:
    return {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key made by `asyncserve keys new`, as `Authorization: Bearer <key>`.",
        },
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The same key, this way."},
    }


def error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "error": {"type": "string", "description": "What went wrong, and how to fix it."},
            "code": {"type": "string", "description": "A stable machine code, like `schema_violation`."},
        },
        "required": ["error", "code"],
    }


def error_responses() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, (name, description) in ERRORS.items():
        response: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        if status in ERROR_HEADERS:
            header, about, schema = ERROR_HEADERS[status]
            response["headers"] = {header: {"description": about, "required": True, "schema": dict(schema)}}
        responses[name] = response
    return responses


def error_refs(statuses: Sequence[int]) -> dict[str, Any]:
    return {str(status): {"$ref": f"#/components/responses/{ERRORS[status][0]}"} for status in statuses}


def param_ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/parameters/{name}"}


def parameters(specs: Sequence[ModelSpec]) -> dict[str, Any]:
    names = list(dict.fromkeys(spec.name for spec in specs))
    versions = list(dict.fromkeys(spec.version for spec in specs if spec.version is not None))
    return {
        "ModelName": path_parameter("model_name", "The model's name.", names),
        "ModelVersion": path_parameter("model_version", "The model's version.", versions),
        "RequestTimeout": header(
            "X-Request-Timeout",
            "Seconds this request may take; it can shorten the model's timeout, never extend it.",
            {"type": "number", "exclusiveMinimum": 0},
        ),
        # Headers are strings: described as such, with the digits the server takes.
        "Priority": header("X-Priority", PRIORITY, {"type": "string", "pattern": f"^{PRIORITY_DIGITS}$"}),
        "Prefer": header(
            "Prefer",
            "RFC 7240 preferences; `lazy` answers 202 with a handle instead of the prediction.",
            {"type": "string"},
        ),
        "InferenceHeaderContentLength": header(
            "Inference-Header-Content-Length",
            "With binary tensor data: the length in bytes of the JSON header that starts the body.",
            {"type": "string", "pattern": "^[0-9]+$"},
        ),
    }


def path_parameter(name: str, description: str, examples: Sequence[str]) -> dict[str, Any]:
    parameter: dict[str, Any] = {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }
    if examples:  # the served ones; any other is a 404
        parameter["examples"] = {example: {"value": example} for example in examples}
    return parameter


def header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description, "schema": schema}


def json_response(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def object_schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def strings() -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string"}}


def row_or_rows(row: dict[str, Any], max_rows: int | None = None) -> dict[str, Any]:
    """A JSON API body: one row, or a non-empty list of them (at most ``max_rows``)."""
    rows: dict[str, Any] = {"type": "array", "items": row, "minItems": 1}
    if max_rows is not None:
        rows["maxItems"] = max_rows
    return {"oneOf": [row, rows]}
