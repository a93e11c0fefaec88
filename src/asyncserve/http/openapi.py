"""The OpenAPI 3.1 description of a service (``http/docs.py`` renders it at ``/docs``).

Each model gets a typed ``POST /v1/models/{name}/predict`` operation whose request and response
schemas come from its declared tensors, so ``/docs`` shows exactly what a row looks like. The
generic Open Inference Protocol (V2) routes are described once, with their shared schemas.

The document says what the server does, and tests/http/test_openapi_fuzz.py holds it to that with
schemathesis: each operation lists every status it can answer (errors as ``{"error", "code"}``),
each schema refuses what the server refuses as malformed (422), and the routes that need an API
key, once the server has keys, say so (bearer or ``X-API-Key``; optional, as a keyless server on
loopback opens every route). Pure functions, no I/O: the HTTP layer serialises the document once
and caches it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from asyncserve._utils import is_count
from asyncserve.model import ModelSpec
from asyncserve.tensors import INTEGER_RANGES, Datatype, Tensor

_ERRORS: dict[int, tuple[str, str]] = {
    400: (
        "BadRequest",
        "The body is not valid JSON, a header is malformed (`X-Request-Timeout`, or a `Host` this server does not "
        "answer to), or the request does not fit the model: its V2 inputs, more rows than one call takes, or a "
        "feature key the model's source has no row for.",
    ),
    401: ("Unauthorized", "The server has API keys, and the request has none or a wrong one."),
    403: ("Forbidden", "The request's API key lacks the scope this route needs."),
    404: ("NotFound", "No such model (or version, or deferred prediction) on this server."),
    405: ("MethodNotAllowed", "The path does not take this method; `Allow` lists those it takes."),
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
_ERROR_HEADERS: dict[int, tuple[str, str, dict[str, Any]]] = {
    401: ("WWW-Authenticate", "How to authenticate: `Bearer`.", {"type": "string"}),
    405: ("Allow", "The methods the path takes.", {"type": "string"}),
    429: ("Retry-After", "Seconds to wait before retrying.", {"type": "integer", "minimum": 1}),
    503: ("Retry-After", "Seconds to wait before retrying.", {"type": "integer", "minimum": 1}),
}
_KEYED = (401, 403, 429)
"""What a route that needs an API key answers besides, once the server has keys."""
_BODY = (413, 415, 422)
_INFERENCE = (*_BODY, 500, 503, 504)
_FORMATS = {Datatype.FP32: "float", Datatype.FP64: "double", Datatype.INT32: "int32", Datatype.INT64: "int64"}
_BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
"""What ``base64.b64decode(value, validate=True)`` takes: padded standard base64."""
_PRIORITY = "The priority lane, 0 (the default) to 9: higher lanes are served first."
_PRIORITY_DIGITS = r"(?:-0+|0*[0-9])"
"""0 to 9 as ``int()`` reads it, after the server checks that it is all digits: "07" and "-0" are taken too."""


def _overflow_limit(dtype: Datatype) -> float:
    # A JSON number is cast to the datatype, rounding to nearest: from halfway past the largest
    # value it becomes infinity, which the server refuses (422); below that it is taken.
    largest = np.finfo(dtype.numpy_dtype).max
    return float(largest) + float(largest - np.nextafter(largest, 0)) / 2


_FLOAT_LIMITS = {dtype: _overflow_limit(dtype) for dtype in (Datatype.FP16, Datatype.FP32)}


def openapi_document(service_name: str, version: str, specs: Sequence[ModelSpec]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a service serving ``specs``.

    Example::

        document = openapi_document("demo", asyncserve.__version__, service.specs)
        assert "/v1/models/iris/predict" in document["paths"]
    """
    served = _served_at_v1(specs)
    schemas: dict[str, Any] = {"Error": _error_schema(), "DeferredPrediction": _deferred_schema(), **_v2_schemas()}
    paths: dict[str, Any] = {}
    for spec in served:
        schemas[f"{spec.name}.Inputs"] = row_schema(spec.inputs)
        schemas[f"{spec.name}.Outputs"] = row_schema(spec.outputs, outputs=True)
        paths[f"/v1/models/{spec.name}/predict"] = {"post": _predict_operation(spec)}
    paths["/v1/predictions/{handle}"] = _deferred_path(specs, served)
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
        "components": {
            "schemas": schemas,
            "responses": _error_responses(),
            "parameters": _parameters(specs),
            "securitySchemes": _security_schemes(),
        },
    }


def row_schema(tensors: Mapping[str, Tensor], *, outputs: bool = False) -> dict[str, Any]:
    """The JSON Schema of one row: an object with one required property per tensor (see ``tensor_schema``)."""
    return {
        "type": "object",
        "properties": {name: tensor_schema(tensor, output=outputs) for name, tensor in tensors.items()},
        "required": list(tensors),
        "additionalProperties": False,
    }


def tensor_schema(tensor: Tensor, *, output: bool = False) -> dict[str, Any]:
    """The JSON Schema of one row's value of ``tensor``: an element, or nested lists of them.

    An input's numbers are bounded as the server checks them; an output's floats may be null, as the
    server writes NaN and the infinities (JSON has neither).
    """
    schema = _output_element_schema(tensor) if output else _element_schema(tensor)
    for length in reversed(tensor.shape):
        bounds = {} if length == -1 else {"minItems": length, "maxItems": length}
        schema = {"type": "array", "items": schema, **bounds}
    return {**schema, "description": _tensor_description(tensor)}


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
    return (1, int(version), "") if is_count(version) else (2, 0, version)


def _predict_operation(spec: ModelSpec) -> dict[str, Any]:
    rows = {"$ref": f"#/components/schemas/{spec.name}.Inputs"}
    outputs = {"$ref": f"#/components/schemas/{spec.name}.Outputs"}
    # A streaming model's request is not batched, so nothing caps its rows.
    request: dict[str, Any] = {"schema": _row_or_rows(rows, None if spec.streams else spec.max_batch_size)}
    if spec.example is not None:
        # The example may also hold the values of looked-up features (for the warm-up): a request sends inputs only.
        example = {name: value for name, value in spec.example.items() if name in spec.inputs}
        request["examples"] = {
            "row": {"summary": "One row", "value": example},
            "rows": {"summary": "A batch of rows", "value": [example, example]},
        }
    description = (
        "Send one row of inputs as a JSON object, or a batch as a list of them, and get one object of outputs or "
        "a list in the same order. Rows of a batch share each input's shape. "
        f"At most {spec.timeout_s:g} s per request; `X-Request-Timeout` can only shorten it."
    )
    parameters = [_param_ref("RequestTimeout"), _param_ref("Priority")]
    if spec.streams:
        responses = {"200": _streamed_answer(outputs)}
        description += " The model answers in parts, as it yields them."
    else:
        responses = {"200": _whole_answer(spec, outputs), "202": _deferred_response()}
        parameters.append(_param_ref("Prefer"))
        description += (
            f" At most {spec.max_batch_size} rows. With `Prefer: lazy` the answer is a 202 and a handle, and the "
            "prediction runs when the handle is read."
        )
    return _operation(
        f"Predict with {spec.label}",
        responses,
        (*_INFERENCE, *((502,) if spec.features else ())),
        scope="infer",
        tag="models",
        operationId=f"predict_{spec.name}",
        description=description,
        parameters=parameters,
        requestBody={"required": True, "content": {"application/json": request}},
    )


def _whole_answer(spec: ModelSpec, outputs: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": "The outputs: an object for an object, a list for a list.",
        "content": {"application/json": {"schema": _row_or_rows(outputs)}},
    }
    if spec.features:
        answer["headers"] = {"X-Degraded": _degraded_header()}
    return answer


def _streamed_answer(outputs: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": (
            "The parts of the answer, in the order the model yields them; each part holds the outputs of every "
            "row (an object for an object, a list for a list). By `Accept`: `text/event-stream`, one Server-Sent "
            "Event per part, then `event: end` (or `event: error` and the error); `application/x-ndjson`, one "
            "JSON line per part (an error ends it as a line with `error` and `code`); otherwise a JSON array "
            "of the parts, once the last is made."
        ),
        "content": {
            "application/json": {"schema": {"type": "array", "items": _row_or_rows(outputs)}},
            "text/event-stream": {"schema": {"type": "string"}},
            "application/x-ndjson": {"schema": {"type": "string"}},
        },
    }


def _row_or_rows(row: dict[str, Any], max_rows: int | None = None) -> dict[str, Any]:
    rows: dict[str, Any] = {"type": "array", "items": row, "minItems": 1}
    if max_rows is not None:
        rows["maxItems"] = max_rows
    return {"oneOf": [row, rows]}


def _element_schema(tensor: Tensor) -> dict[str, Any]:
    dtype = tensor.dtype
    schema: dict[str, Any] = {"type": dtype.json_type}
    if tensor.binary:
        schema["contentEncoding"] = "base64"
        schema["pattern"] = _BASE64
    if dtype in INTEGER_RANGES:
        schema["minimum"], schema["maximum"] = INTEGER_RANGES[dtype]
    if dtype in _FLOAT_LIMITS:
        schema["exclusiveMinimum"], schema["exclusiveMaximum"] = -_FLOAT_LIMITS[dtype], _FLOAT_LIMITS[dtype]
    if dtype in _FORMATS:
        schema["format"] = _FORMATS[dtype]
    return schema


def _output_element_schema(tensor: Tensor) -> dict[str, Any]:
    schema = _element_schema(tensor)
    if tensor.dtype in (Datatype.FP16, Datatype.FP32, Datatype.FP64):
        schema = {"type": ["number", "null"], **({"format": schema["format"]} if "format" in schema else {})}
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
        f'Inference Protocol (V2) under `/v2`. Errors are `{{"error": message, "code": code}}`. '
        "Once the server has API keys, every route but the health checks and the docs needs one, sent as "
        "`Authorization: Bearer <key>` (or `X-API-Key`), with the scope the route names."
    )


# -- deferred (lazy) predictions -----------------------------------------------------------------


def _deferred_schema() -> dict[str, Any]:
    return _object(
        {
            "id": {"type": "string", "description": "The handle."},
            "model": {"type": "string", "description": "The model (and version) that will predict."},
            "url": {"type": "string", "description": "Where to read the prediction: `GET /v1/predictions/{id}`."},
            "expires_in_s": {"type": "number", "minimum": 0, "description": "Seconds until the handle expires."},
        },
        ["id", "model", "url", "expires_in_s"],
    )


def _deferred_response() -> dict[str, Any]:
    location = {"description": "The handle's URL.", "schema": {"type": "string"}, "required": True}
    return {
        "description": "With `Prefer: lazy`: the inputs are checked, and the prediction runs when the handle is read.",
        "headers": {"Location": location, "Preference-Applied": {"schema": {"const": "lazy"}, "required": True}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/DeferredPrediction"}}},
    }


def _deferred_path(specs: Sequence[ModelSpec], served: Sequence[ModelSpec]) -> dict[str, Any]:
    # A handle of a model's /v1 route answers that version's outputs; one from service.lazy() may be of any version.
    refs = {id(spec): {"$ref": f"#/components/schemas/{spec.name}.Outputs"} for spec in served}
    outputs = [
        _row_or_rows(refs.get(id(spec)) or row_schema(spec.outputs, outputs=True)) for spec in specs if not spec.streams
    ]
    answer = {
        "description": "The outputs, shaped as the request was: an object for an object, a list for a list.",
        "content": {"application/json": {"schema": {"anyOf": outputs} if outputs else {}}},
    }
    handle = _path_parameter("handle", "The handle's id.", ())
    operation = _operation(
        "Read a deferred prediction: it runs on the first read, and later reads share its result.",
        {"200": answer},
        (404, 500, 502, 503, 504),
        scope="infer",
        tag="models",
        operationId="deferred_prediction",
    )
    return {"parameters": [handle], "get": operation}


def _degraded_header() -> dict[str, Any]:
    return {
        "description": "The feature sources whose defaults stood in: the answer is usable but degraded.",
        "schema": {"type": "string"},
    }


# -- shared components ---------------------------------------------------------------------------


def _operation(
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
    statuses = {400, *errors, *(_KEYED if scope is not None else ())}
    operation: dict[str, Any] = {"summary": summary, "tags": [tag], **fields}
    if scope is not None:
        needs = f"Needs an API key with the `{scope}` scope once the server has keys."
        operation["description"] = f"{fields['description']} {needs}" if "description" in fields else needs
        # Either scheme, or none: a server without keys (on loopback) opens every route.
        operation["security"] = [{"bearer": []}, {"apiKey": []}, {}]
    operation["responses"] = {**responses, **_error_refs(sorted(statuses))}
    return operation


def _security_schemes() -> dict[str, Any]:
    return {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key made by `asyncserve keys new`, as `Authorization: Bearer <key>`.",
        },
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The same key, this way."},
    }


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
        if status in _ERROR_HEADERS:
            header, about, schema = _ERROR_HEADERS[status]
            response["headers"] = {header: {"description": about, "required": True, "schema": dict(schema)}}
        responses[name] = response
    return responses


def _error_refs(statuses: Sequence[int]) -> dict[str, Any]:
    return {str(status): {"$ref": f"#/components/responses/{_ERRORS[status][0]}"} for status in statuses}


def _param_ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/parameters/{name}"}


def _parameters(specs: Sequence[ModelSpec]) -> dict[str, Any]:
    names = list(dict.fromkeys(spec.name for spec in specs))
    versions = list(dict.fromkeys(spec.version for spec in specs if spec.version is not None))
    return {
        "ModelName": _path_parameter("model_name", "The model's name.", names),
        "ModelVersion": _path_parameter("model_version", "The model's version.", versions),
        "RequestTimeout": _header(
            "X-Request-Timeout",
            "Seconds this request may take; it can shorten the model's timeout, never extend it.",
            {"type": "number", "exclusiveMinimum": 0},
        ),
        # Headers are strings: described as such, with the digits the server takes.
        "Priority": _header("X-Priority", _PRIORITY, {"type": "string", "pattern": f"^{_PRIORITY_DIGITS}$"}),
        "Prefer": _header(
            "Prefer",
            "RFC 7240 preferences; `lazy` answers 202 with a handle instead of the prediction.",
            {"type": "string"},
        ),
        "InferenceHeaderContentLength": _header(
            "Inference-Header-Content-Length",
            "With binary tensor data: the length in bytes of the JSON header that starts the body.",
            {"type": "string", "pattern": "^[0-9]+$"},
        ),
    }


def _path_parameter(name: str, description: str, examples: Sequence[str]) -> dict[str, Any]:
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


def _header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description, "schema": schema}


# -- the Open Inference Protocol (V2) and operations ---------------------------------------------


def _v2_schemas() -> dict[str, Any]:
    datatype = {"type": "string", "enum": [str(d) for d in Datatype]}
    shape = {"type": "array", "items": {"type": "integer", "minimum": 0}}
    tensor = {"name": {"type": "string"}, "datatype": datatype, "shape": shape}
    # A model's metadata gives -1 for the rows, and for each dimension of any length.
    declared = {**tensor, "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}}}
    data = {"type": "array", "description": "The values, flattened in row-major order (or nested as `shape`)."}
    # Fields the server reads as absent when null are nullable here.
    return {
        "InferenceRequest": _object(
            {
                "id": _nullable({"type": "string"}),
                "parameters": _nullable(_request_parameters()),
                "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestInput"}},
                "outputs": _nullable({"type": "array", "items": {"$ref": "#/components/schemas/RequestOutput"}}),
            },
            ["inputs"],
        ),
        "RequestInput": _object(
            {**tensor, "parameters": _nullable(_input_parameters()), "data": data},
            ["name", "datatype", "shape", "data"],
        ),
        "RequestOutput": _object({"name": {"type": "string"}, "parameters": _nullable(_output_parameters())}, ["name"]),
        "InferenceResponse": _object(
            {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "parameters": {"type": "object"},
                "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/ResponseOutput"}},
            },
            ["model_name", "outputs"],
        ),
        "ResponseOutput": _object(
            {**tensor, "parameters": {"type": "object"}, "data": data}, ["name", "datatype", "shape"]
        ),
        "TensorMetadata": _object(declared, ["name", "datatype", "shape"]),
        "GenerateResponse": _object(
            {"model_name": {"type": "string"}, "model_version": {"type": "string"}}, ["model_name", "model_version"]
        ),
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


def _request_parameters() -> dict[str, Any]:
    digits = {"type": "string", "pattern": rf"^\s*{_PRIORITY_DIGITS}\s*$"}
    priority = {
        "anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, digits],
        "description": f"{_PRIORITY} An integer, or its digits as a string.",
    }
    binary = _nullable({"type": "boolean", "description": "Send every output as binary data by default."})
    return {"type": "object", "properties": {"priority": priority, "binary_data_output": binary}}


def _input_parameters() -> dict[str, Any]:
    size = {
        "type": ["integer", "null"],
        "minimum": 0,
        "description": "The binary tensor data extension: the input's bytes follow the JSON part of the body "
        "(`Inference-Header-Content-Length`), and `data` is left out.",
    }
    return {"type": "object", "properties": {"binary_data_size": size}}


def _output_parameters() -> dict[str, Any]:
    binary = _nullable({"type": "boolean", "description": "Send this output as binary data."})
    return {"type": "object", "properties": {"binary_data": binary}}


def _v2_paths() -> dict[str, Any]:
    model = [_param_ref("ModelName")]
    versioned = [*model, _param_ref("ModelVersion")]
    metadata = _v2_get("Model metadata: its versions, platform and tensors.", _json_response("OK.", "ModelMetadata"))
    model_ready = _v2_get("200 when the model can take requests.", _state("name", "ready"), (404, 503), scope=None)
    infer = _infer_operation()
    return {
        "/v2": {
            "get": _v2_get(
                "Server metadata: name, version and extensions.", _json_response("OK.", "ServerMetadata"), ()
            )
        },
        "/v2/health/live": {"get": _v2_get("200 while the server process runs.", _state("live"), (), scope=None)},
        "/v2/health/ready": {
            "get": _v2_get("200 when every model is ready, else 503.", _state("ready"), (503,), scope=None)
        },
        "/v2/models/{model_name}": {"parameters": model, "get": metadata},
        "/v2/models/{model_name}/versions/{model_version}": {"parameters": versioned, "get": metadata},
        "/v2/models/{model_name}/ready": {"parameters": model, "get": model_ready},
        "/v2/models/{model_name}/versions/{model_version}/ready": {"parameters": versioned, "get": model_ready},
        "/v2/models/{model_name}/infer": {"parameters": model, "post": infer},
        "/v2/models/{model_name}/versions/{model_version}/infer": {"parameters": versioned, "post": infer},
        "/v2/models/{model_name}/generate": {"parameters": model, "post": _generate_operation(stream=False)},
        "/v2/models/{model_name}/generate_stream": {"parameters": model, "post": _generate_operation(stream=True)},
        "/v2/repository/index": {"post": _index_operation()},
        "/v2/repository/models/{model_name}/load": {
            "parameters": model,
            "post": _repository("Load (or reload) a model.", (404, 415, 500)),
        },
        "/v2/repository/models/{model_name}/unload": {
            "parameters": model,
            "post": _repository("Unload a model.", (404, 415)),
        },
    }


def _index_operation() -> dict[str, Any]:
    only_ready = {"type": "boolean", "description": "List only the models that are ready."}
    body = {"type": "object", "properties": {"ready": only_ready}}
    return _operation(
        "The models of this server and their states.",
        {"200": _json_response("The models.", "RepositoryIndex")},
        _BODY,
        scope="admin",
        requestBody={"required": False, "content": {"application/json": {"schema": body}}},
    )


def _repository(summary: str, errors: Sequence[int]) -> dict[str, Any]:
    done = {"description": "Done.", "content": {"application/json": {"schema": {"type": "object"}}}}
    return _operation(summary, {"200": done}, errors, scope="admin")


def _infer_operation() -> dict[str, Any]:
    binary = {
        "type": "string",
        "contentMediaType": "application/octet-stream",
        "description": "The binary tensor data extension: a JSON InferenceRequest of `Inference-Header-Content-Length` "
        "bytes, then the raw tensors of the inputs whose `parameters.binary_data_size` is set.",
    }
    answer = _json_response("The outputs.", "InferenceResponse")
    answer["content"]["application/octet-stream"] = {"schema": binary}
    answer["headers"] = {
        "Inference-Header-Content-Length": {
            "description": "With binary outputs (`application/octet-stream`): the length of the JSON part.",
            "schema": {"type": "integer", "minimum": 0},
        },
        "X-Degraded": _degraded_header(),
    }
    return _operation(
        "Run inference with the Open Inference Protocol (V2).",
        {"200": answer},
        (*_INFERENCE, 404, 502),
        scope="infer",
        parameters=[_param_ref("RequestTimeout"), _param_ref("InferenceHeaderContentLength")],
        requestBody={
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
                "application/octet-stream": {"schema": binary},
            },
        },
    )


def _generate_operation(*, stream: bool) -> dict[str, Any]:
    body = {
        "type": "object",
        "properties": {"parameters": {"type": "object"}},
        "description": "The model's inputs by name, one row as the JSON API takes it, and optional `parameters`.",
    }
    if stream:
        summary = "The generate extension, streamed: one Server-Sent Event per part of the answer."
        ok = {
            "description": "`data: <GenerateResponse>` per part (a model that does not stream has one); "
            'an error in the middle is `data: {"error", "code"}`.',
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    else:
        summary = "The generate extension: one row in, the outputs out (a streaming model's last part)."
        ok = _json_response("The outputs, by name, after the model's name and version.", "GenerateResponse")
    return _operation(
        summary,
        {"200": ok},
        (*_INFERENCE, 404, 502),
        scope="infer",
        parameters=[_param_ref("RequestTimeout")],
        requestBody={"required": True, "content": {"application/json": {"schema": body}}},
    )


def _operations_paths() -> dict[str, Any]:
    metrics = {"description": "Prometheus metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}
    document = {"description": "This document.", "content": {"application/json": {"schema": {"type": "object"}}}}
    page = {"description": "Swagger UI.", "content": {"text/html": {"schema": {"type": "string"}}}}
    return {
        "/metrics": {"get": _operation("Prometheus metrics.", {"200": metrics}, (), scope="metrics", tag="operations")},
        "/openapi.json": {
            "get": _operation("This OpenAPI document.", {"200": document}, (), scope=None, tag="operations")
        },
        "/docs": {"get": _operation("This document, rendered.", {"200": page}, (), scope=None, tag="operations")},
    }


def _v2_get(
    summary: str, ok: dict[str, Any], errors: Sequence[int] = (404,), *, scope: str | None = "infer"
) -> dict[str, Any]:
    return _operation(summary, {"200": ok}, errors, scope=scope)


def _state(*fields: str) -> dict[str, Any]:
    """A health answer: ``{"live": true}``, ``{"ready": true}`` or ``{"name": ..., "ready": true}``."""
    properties = {name: {"type": "string"} if name == "name" else {"const": True} for name in fields}
    return {"description": "OK.", "content": {"application/json": {"schema": _object(properties, list(fields))}}}


def _json_response(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _strings() -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string"}}
