"""The OpenAPI 3.1 description of a service (``http/docs.py`` renders it at ``/docs``): the document, and
each model's operations; the generic routes are in ``openapi_v2.py``, the jobs API in ``openapi_jobs.py``, the
shared parts in ``openapi_parts.py``.

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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from asyncserve._utils import is_count
from asyncserve.http import openapi_jobs, openapi_v2
from asyncserve.http.openapi_jobs import JobsDocument
from asyncserve.http.openapi_parts import (
    INFERENCE,
    build_operation,
    degraded_header,
    error_responses,
    error_schema,
    json_response,
    nullable,
    object_schema,
    param_ref,
    parameters,
    path_parameter,
    row_or_rows,
    security_schemes,
)
from asyncserve.model import ModelSpec
from asyncserve.tensors import INTEGER_RANGES, Datatype, Tensor

_FORMATS = {Datatype.FP32: "float", Datatype.FP64: "double", Datatype.INT32: "int32", Datatype.INT64: "int64"}
_BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
"""What ``base64.b64decode(value, validate=True)`` takes: padded standard base64."""


def _overflow_limit(dtype: Datatype) -> float:
    # A JSON number is cast to the datatype, rounding to nearest: from halfway past the largest
    # value it becomes infinity, which the server refuses (422); below that it is taken.
    largest = np.finfo(dtype.numpy_dtype).max
    return float(largest) + float(largest - np.nextafter(largest, 0)) / 2


_FLOAT_LIMITS = {dtype: _overflow_limit(dtype) for dtype in (Datatype.FP16, Datatype.FP32)}


def openapi_document(
    service_name: str, version: str, specs: Sequence[ModelSpec], jobs: JobsDocument | None = None
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a service serving ``specs``, with the jobs API when it has ``jobs``.

    Example::

        document = openapi_document("demo", asyncserve.__version__, service.specs, JobsDocument(10_000, False))
        assert "/v1/models/iris/predict" in document["paths"] and "/v1/jobs" in document["paths"]
    """
    served = _served_at_v1(specs)
    schemas: dict[str, Any] = {
        "Error": error_schema(),
        "DeferredPrediction": _deferred_schema(),
        **openapi_v2.v2_schemas(),
    }
    schemas["ModelList"] = _model_list_schema()
    paths: dict[str, Any] = {"/v1/models": {"get": _model_list_operation()}}
    for spec in served:
        schemas[f"{spec.name}.Inputs"] = row_schema(spec.inputs)
        schemas[f"{spec.name}.Outputs"] = row_schema(spec.outputs, outputs=True)
        paths[f"/v1/models/{spec.name}/predict"] = {"post": _predict_operation(spec, spec.name)}
    for spec in specs:
        if spec.version is not None:
            key = f"{spec.name}.v{spec.version}"
            schemas[f"{key}.Inputs"] = row_schema(spec.inputs)
            schemas[f"{key}.Outputs"] = row_schema(spec.outputs, outputs=True)
            path = f"/v1/models/{spec.name}/versions/{spec.version}/predict"
            paths[path] = {"post": _predict_operation(spec, key, versioned=True)}
    paths["/v1/predictions/{handle}"] = _deferred_path(specs, served)
    paths.update(openapi_v2.v2_paths())
    paths.update(openapi_v2.operations_paths())
    document = {
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
            "responses": error_responses(),
            "parameters": parameters(specs),
            "securitySchemes": security_schemes(),
        },
    }
    if jobs is not None:
        openapi_jobs.add_jobs(document, specs, served, jobs)
    return document


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


def _predict_operation(spec: ModelSpec, key: str, *, versioned: bool = False) -> dict[str, Any]:
    """``POST`` rows to ``spec``: at its version's own path when ``versioned``, else at its name's (the highest)."""
    rows = {"$ref": f"#/components/schemas/{key}.Inputs"}
    outputs = {"$ref": f"#/components/schemas/{key}.Outputs"}
    # A streaming model's request is not batched, so nothing caps its rows.
    request: dict[str, Any] = {"schema": row_or_rows(rows, None if spec.streams else spec.max_batch_size)}
    if spec.example is not None:
        # The example may also hold the values of looked-up features (for the warm-up): a request sends inputs only.
        example = {name: value for name, value in spec.example.items() if name in spec.inputs}
        request["examples"] = {
            "row": {"summary": "One row", "value": example},
            "rows": {"summary": "A batch of rows", "value": [example, example]},
        }
    which = f"Version {spec.version} of {spec.name!r}, whatever others it has. " if versioned else ""
    if not versioned and spec.version is not None:
        which = f"The highest version of {spec.name!r} ({spec.version}); `/versions/{{version}}/predict` for another. "
    description = which + (
        "Send one row of inputs as a JSON object, or a batch as a list of them, and get one object of outputs or "
        "a list in the same order. Rows of a batch share each input's shape. "
        f"At most {spec.timeout_s:g} s per request; `X-Request-Timeout` can only shorten it."
    )
    parameters = [param_ref("RequestTimeout"), param_ref("Priority")]
    if spec.streams:
        responses = {"200": _streamed_answer(outputs)}
        description += " The model answers in parts, as it yields them."
    else:
        responses = {"200": _whole_answer(spec, outputs), "202": _deferred_response()}
        parameters.append(param_ref("Prefer"))
        description += (
            f" At most {spec.max_batch_size} rows. With `Prefer: lazy` the answer is a 202 and a handle, and the "
            "prediction runs when the handle is read."
        )
    return build_operation(
        f"Predict with {spec.label}",
        responses,
        (*INFERENCE, *((502,) if spec.features else ())),
        scope="infer",
        tag="models",
        operationId=f"predict_{spec.name}_version_{spec.version}" if versioned else f"predict_{spec.name}",
        description=description,
        parameters=parameters,
        requestBody={"required": True, "content": {"application/json": request}},
    )


def _whole_answer(spec: ModelSpec, outputs: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": "The outputs: an object for an object, a list for a list.",
        "content": {"application/json": {"schema": row_or_rows(outputs)}},
    }
    if spec.features:
        answer["headers"] = {"X-Degraded": degraded_header()}
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
            "application/json": {"schema": {"type": "array", "items": row_or_rows(outputs)}},
            "text/event-stream": {"schema": {"type": "string"}},
            "application/x-ndjson": {"schema": {"type": "string"}},
        },
    }


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


# -- the list of models --------------------------------------------------------------------------


def _model_list_operation() -> dict[str, Any]:
    return build_operation(
        "The models of this server: every version, its readiness, and the schemas of its rows.",
        {"200": json_response("The models, by name; the versions of each, highest first.", "ModelList")},
        (),
        scope="infer",
        tag="models",
        operationId="list_models",
    )


def _model_list_schema() -> dict[str, Any]:
    string = {"type": "string"}
    version = object_schema(
        {
            "version": {**nullable(string), "description": "Null for a model without versions."},
            "state": {"type": "string", "enum": ["LOADING", "READY", "UNAVAILABLE"]},
            "ready": {"type": "boolean"},
            "reason": {**nullable(string), "description": "Why it is not ready: its load error, or `unloaded`."},
            "predict": {**string, "description": "Where to POST rows to this version (the JSON API)."},
            "streams": {"type": "boolean", "description": "Whether it answers in parts."},
            "inputs": {"type": "object", "description": "The JSON Schema of one row of inputs."},
            "outputs": {"type": "object", "description": "The JSON Schema of one row of outputs."},
        },
        ["version", "state", "ready", "reason", "predict", "streams", "inputs", "outputs"],
    )
    model = object_schema(
        {
            "name": string,
            "latest": {**nullable(string), "description": "The version `/v1/models/{name}/predict` serves."},
            "versions": {"type": "array", "items": version},
        },
        ["name", "latest", "versions"],
    )
    return object_schema({"models": {"type": "array", "items": model}}, ["models"])


# -- deferred (lazy) predictions -----------------------------------------------------------------


def _deferred_schema() -> dict[str, Any]:
    return object_schema(
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
        row_or_rows(refs.get(id(spec)) or row_schema(spec.outputs, outputs=True)) for spec in specs if not spec.streams
    ]
    answer = {
        "description": "The outputs, shaped as the request was: an object for an object, a list for a list.",
        "content": {"application/json": {"schema": {"anyOf": outputs} if outputs else {}}},
    }
    handle = path_parameter("handle", "The handle's id.", ())
    operation = build_operation(
        "Read a deferred prediction: it runs on the first read, and later reads share its result.",
        {"200": answer},
        (404, 500, 502, 503, 504),
        scope="infer",
        tag="models",
        operationId="deferred_prediction",
    )
    return {"parameters": [handle], "get": operation}
