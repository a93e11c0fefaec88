"""The OpenAPI 3.1 description of a service, and the Swagger UI page that renders it at ``/docs``.

Each model gets a typed ``POST /v1/models/{name}/predict`` operation whose request and response
schemas come from its declared tensors, so ``/docs`` shows exactly what a row looks like. The
generic Open Inference Protocol (V2) routes are described once, with their shared schemas.
Pure functions, no I/O: the HTTP layer serialises the document once and caches it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from asyncserve.model import ModelSpec
from asyncserve.tensors import INTEGER_RANGES, Datatype, Tensor

SWAGGER_UI = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5"
"""Where ``/docs`` loads Swagger UI from (the jsDelivr CDN, as FastAPI does)."""

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "The body is not valid JSON, or a header is malformed."),
    404: ("NotFound", "No such model (or version) on this server."),
    413: ("PayloadTooLarge", "The body is larger than the server accepts."),
    415: ("UnsupportedMediaType", "The body is not `application/json`."),
    422: ("SchemaViolation", "The body does not match the model's inputs; the message starts with the field path."),
    500: ("ModelError", "The model failed; the message names the model, never its internals."),
    503: ("Unavailable", "The model is loading, the server is overloaded or shutting down; retry after `Retry-After`."),
    504: ("DeadlineExceeded", "The request's deadline (`X-Request-Timeout` or the model's timeout) passed."),
}
_PREDICT_ERRORS = (400, 404, 413, 415, 422, 500, 503, 504)
_FORMATS = {Datatype.FP32: "float", Datatype.FP64: "double", Datatype.INT32: "int32", Datatype.INT64: "int64"}


def openapi_document(service_name: str, version: str, specs: Sequence[ModelSpec]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a service serving ``specs``.

    Example::

        document = openapi_document("demo", asyncserve.__version__, service.specs)
        assert "/v1/models/iris/predict" in document["paths"]
    """
    served = _served_at_v1(specs)
    schemas: dict[str, Any] = {"Error": _error_schema(), **_v2_schemas()}
    paths: dict[str, Any] = {}
    for spec in served:
        schemas[f"{spec.name}.Inputs"] = row_schema(spec.inputs)
        schemas[f"{spec.name}.Outputs"] = row_schema(spec.outputs)
        paths[f"/v1/models/{spec.name}/predict"] = {"post": _predict_operation(spec)}
    paths.update(_v2_paths())
    paths.update(_operations_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": service_name, "version": version, "description": _service_description(served)},
        "tags": [
            {"name": "models", "description": "Predict with a model: plain JSON rows in, rows out."},
            {"name": "inference protocol", "description": "The Open Inference Protocol (V2), for any model."},
            {"name": "operations", "description": "Metrics and this description."},
        ],
        "paths": paths,
        "components": {"schemas": schemas, "responses": _error_responses(), "parameters": _parameters()},
    }


def row_schema(tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """The JSON Schema of one row: an object with one required property per tensor."""
    return {
        "type": "object",
        "properties": {name: tensor_schema(tensor) for name, tensor in tensors.items()},
        "required": list(tensors),
        "additionalProperties": False,
    }


def tensor_schema(tensor: Tensor) -> dict[str, Any]:
    """The JSON Schema of one row's value of ``tensor``: an element, or nested lists of them."""
    schema = _element_schema(tensor)
    for length in reversed(tensor.shape):
        bounds = {} if length == -1 else {"minItems": length, "maxItems": length}
        schema = {"type": "array", "items": schema, **bounds}
    return {**schema, "description": _tensor_description(tensor)}


def docs_html(openapi_url: str, title: str) -> str:
    """The Swagger UI page for ``GET /docs``, reading the document at ``openapi_url``."""
    # json.dumps makes a JS string literal; escaping "<" keeps a "</script>" in it from ending the script.
    url = json.dumps(openapi_url).replace("<", "\\u003c")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="{SWAGGER_UI}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{SWAGGER_UI}/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{
  url: {url},
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
}});
</script>
</body>
</html>
"""


# -- models --------------------------------------------------------------------------------------


def _served_at_v1(specs: Sequence[ModelSpec]) -> list[ModelSpec]:
    """The spec each name's /v1 route serves: its highest version, as the registry picks it."""
    best: dict[str, ModelSpec] = {}
    for spec in specs:
        if spec.name not in best or _version_order(spec.version) > _version_order(best[spec.name].version):
            best[spec.name] = spec
    return list(best.values())


def _version_order(version: str | None) -> tuple[int, int, str]:
    # Numeric versions compare as numbers ("10" > "9"); others after them, by text (as in registry).
    if version is None:
        return (0, 0, "")
    return (1, int(version), "") if version.isdigit() else (2, 0, version)


def _predict_operation(spec: ModelSpec) -> dict[str, Any]:
    rows = {"$ref": f"#/components/schemas/{spec.name}.Inputs"}
    outputs = {"$ref": f"#/components/schemas/{spec.name}.Outputs"}
    request: dict[str, Any] = {"schema": _row_or_rows(rows)}
    if spec.example is not None:
        example = dict(spec.example)
        request["examples"] = {
            "row": {"summary": "One row", "value": example},
            "rows": {"summary": "A batch of rows", "value": [example, example]},
        }
    return {
        "operationId": f"predict_{spec.name}",
        "summary": f"Predict with {spec.label}",
        "description": (
            f"Send one row of inputs as a JSON object, or a batch as a list of them, and get one object "
            f"of outputs or a list in the same order. Rows of a batch share each input's shape. "
            f"At most {spec.timeout_s:g} s per request; `X-Request-Timeout` can only shorten it."
        ),
        "tags": ["models"],
        "parameters": [{"$ref": "#/components/parameters/RequestTimeout"}],
        "requestBody": {"required": True, "content": {"application/json": request}},
        "responses": {
            "200": {
                "description": "The outputs: an object for an object, a list for a list.",
                "content": {"application/json": {"schema": _row_or_rows(outputs)}},
            },
            **_error_refs(_PREDICT_ERRORS),
        },
    }


def _row_or_rows(row: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [row, {"type": "array", "items": row, "minItems": 1}]}


def _element_schema(tensor: Tensor) -> dict[str, Any]:
    dtype = tensor.dtype
    schema: dict[str, Any] = {"type": dtype.json_type}
    if tensor.binary:
        schema["contentEncoding"] = "base64"
    if dtype in INTEGER_RANGES:
        schema["minimum"], schema["maximum"] = INTEGER_RANGES[dtype]
    if dtype in _FORMATS:
        schema["format"] = _FORMATS[dtype]
    return schema


def _tensor_description(tensor: Tensor) -> str:
    shape = "one value" if not tensor.shape else f"shape {list(tensor.shape)}"
    text = f"{tensor.dtype}, {shape} per row"
    if -1 in tensor.shape:
        text += " (-1: any length, the same for every row of a batch)"
    if tensor.binary:
        text += ", base64-encoded bytes"
    return f"{text}. {tensor.description}" if tensor.description else f"{text}."


def _service_description(specs: Sequence[ModelSpec]) -> str:
    names = ", ".join(f"`{spec.label}`" for spec in specs) or "none"
    return (
        f"Models: {names}. Use `POST /v1/models/{{name}}/predict` with plain JSON rows, or the Open "
        f'Inference Protocol (V2) under `/v2`. Errors are `{{"error": message, "code": code}}`.'
    )


# -- shared components ---------------------------------------------------------------------------


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "error": {"type": "string", "description": "What went wrong, and how to fix it."},
            "code": {"type": "string", "description": "A stable machine code, like `schema_violation`."},
        },
        "required": ["error", "code"],
    }


def _error_responses() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, (name, description) in _ERRORS.items():
        response: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        if status == 503:
            retry = {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
            response["headers"] = {"Retry-After": retry}
        responses[name] = response
    return responses


def _error_refs(statuses: Sequence[int]) -> dict[str, Any]:
    return {str(status): {"$ref": f"#/components/responses/{_ERRORS[status][0]}"} for status in statuses}


def _parameters() -> dict[str, Any]:
    def path(name: str, description: str) -> dict[str, Any]:
        return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}

    timeout = {"type": "number", "exclusiveMinimum": 0}
    return {
        "ModelName": path("model_name", "The model's name."),
        "ModelVersion": path("model_version", "The model's version."),
        "RequestTimeout": {
            "name": "X-Request-Timeout",
            "in": "header",
            "required": False,
            "description": "Seconds this request may take; it can shorten the model's timeout, never extend it.",
            "schema": timeout,
        },
        "InferenceHeaderContentLength": {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "description": "With binary tensor data: the length in bytes of the JSON header that starts the body.",
            "schema": {"type": "integer", "minimum": 0},
        },
    }


# -- the Open Inference Protocol (V2) and operations ---------------------------------------------


def _v2_schemas() -> dict[str, Any]:
    datatype = {"type": "string", "enum": [str(d) for d in Datatype]}
    shape = {"type": "array", "items": {"type": "integer"}}
    parameters = {"type": "object", "additionalProperties": True}
    tensor = {"name": {"type": "string"}, "datatype": datatype, "shape": shape}
    data = {"type": "array", "description": "The values, flattened in row-major order (or nested as `shape`)."}
    return {
        "InferenceRequest": _object(
            {
                "id": {"type": "string"},
                "parameters": parameters,
                "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestInput"}},
                "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestOutput"}},
            },
            ["inputs"],
        ),
        "RequestInput": _object({**tensor, "parameters": parameters, "data": data}, ["name", "datatype", "shape"]),
        "RequestOutput": _object({"name": {"type": "string"}, "parameters": parameters}, ["name"]),
        "InferenceResponse": _object(
            {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "parameters": parameters,
                "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/ResponseOutput"}},
            },
            ["model_name", "outputs"],
        ),
        "ResponseOutput": _object({**tensor, "parameters": parameters, "data": data}, ["name", "datatype", "shape"]),
        "TensorMetadata": _object(tensor, ["name", "datatype", "shape"]),
        "ServerMetadata": _object(
            {"name": {"type": "string"}, "version": {"type": "string"}, "extensions": _strings()},
            ["name", "version", "extensions"],
        ),
        "ModelMetadata": _object(
            {
                "name": {"type": "string"},
                "versions": _strings(),
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
                "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
            },
            ["name", "platform", "inputs", "outputs"],
        ),
        "RepositoryIndex": {
            "type": "array",
            "items": _object(
                {
                    "name": {"type": "string"},
                    "version": {"type": "string"},
                    "state": {"type": "string", "enum": ["LOADING", "READY", "UNAVAILABLE"]},
                    "reason": {"type": "string"},
                },
                ["name", "state"],
            ),
        },
    }


def _v2_paths() -> dict[str, Any]:
    model = [{"$ref": "#/components/parameters/ModelName"}]
    versioned = [*model, {"$ref": "#/components/parameters/ModelVersion"}]
    metadata = _get("Model metadata: its versions, platform and tensors.", "ModelMetadata", (404,))
    ready = _get("200 when the model can take requests.", None, (404, 503))
    infer = _infer_operation()
    return {
        "/v2": {"get": _get("Server metadata: name, version and protocol extensions.", "ServerMetadata", ())},
        "/v2/health/live": {"get": _get("200 while the server process runs.", None, ())},
        "/v2/health/ready": {"get": _get("200 when every model is ready, else 503.", None, (503,))},
        "/v2/models/{model_name}": {"parameters": model, "get": metadata},
        "/v2/models/{model_name}/versions/{model_version}": {"parameters": versioned, "get": metadata},
        "/v2/models/{model_name}/ready": {"parameters": model, "get": ready},
        "/v2/models/{model_name}/versions/{model_version}/ready": {"parameters": versioned, "get": ready},
        "/v2/models/{model_name}/infer": {"parameters": model, "post": infer},
        "/v2/models/{model_name}/versions/{model_version}/infer": {"parameters": versioned, "post": infer},
        "/v2/repository/index": {
            "post": {
                "summary": "The models of this server and their states.",
                "tags": ["inference protocol"],
                "requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {"200": _json_response("The models.", "RepositoryIndex")},
            }
        },
        "/v2/repository/models/{model_name}/load": {
            "parameters": model,
            "post": _repository("Load (or reload) a model."),
        },
        "/v2/repository/models/{model_name}/unload": {"parameters": model, "post": _repository("Unload a model.")},
    }


def _repository(summary: str) -> dict[str, Any]:
    done = {"description": "Done.", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {"summary": summary, "tags": ["inference protocol"], "responses": {"200": done, **_error_refs((404, 500))}}


def _infer_operation() -> dict[str, Any]:
    binary = {
        "type": "string",
        "contentMediaType": "application/octet-stream",
        "description": "The binary tensor data extension: a JSON InferenceRequest of `Inference-Header-Content-Length` "
        "bytes, then the raw tensors of the inputs whose `parameters.binary_data_size` is set.",
    }
    return {
        "summary": "Run inference with the Open Inference Protocol (V2).",
        "tags": ["inference protocol"],
        "parameters": [
            {"$ref": "#/components/parameters/RequestTimeout"},
            {"$ref": "#/components/parameters/InferenceHeaderContentLength"},
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
                "application/octet-stream": {"schema": binary},
            },
        },
        "responses": {
            "200": _json_response("The outputs.", "InferenceResponse"),
            **_error_refs(_PREDICT_ERRORS),
        },
    }


def _operations_paths() -> dict[str, Any]:
    metrics = {"description": "Prometheus metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}
    document = {"description": "This document.", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "/metrics": {"get": {"summary": "Prometheus metrics.", "tags": ["operations"], "responses": {"200": metrics}}},
        "/openapi.json": {
            "get": {"summary": "This OpenAPI document.", "tags": ["operations"], "responses": {"200": document}}
        },
    }


def _get(summary: str, schema: str | None, errors: Sequence[int]) -> dict[str, Any]:
    ok = _json_response("OK.", schema) if schema else {"description": "OK."}
    return {"summary": summary, "tags": ["inference protocol"], "responses": {"200": ok, **_error_refs(errors)}}


def _json_response(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


def _strings() -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string"}}
