"""The OpenAPI description of the generic routes: the Open Inference Protocol (V2), and operations.

These do not depend on the models served (but for the examples of their path parameters): the
V2 schemas and paths, the repository extension, ``/metrics``, ``/openapi.json`` and ``/docs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from asyncserve.http.openapi_parts import (
    BODY,
    INFERENCE,
    PRIORITY,
    PRIORITY_DIGITS,
    build_operation,
    degraded_header,
    json_response,
    nullable,
    object_schema,
    param_ref,
    strings,
)
from asyncserve.tensors import Datatype


def v2_schemas() -> dict[str, Any]:
    datatype = {"type": "string", "enum": [str(d) for d in Datatype]}
    shape = {"type": "array", "items": {"type": "integer", "minimum": 0}}
    tensor = {"name": {"type": "string"}, "datatype": datatype, "shape": shape}
    # A model's metadata gives -1 for the rows, and for each dimension of any length.
    declared = {**tensor, "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}}}
    data = {"type": "array", "description": "The values, flattened in row-major order (or nested as `shape`)."}
    # Fields the server reads as absent when null are nullable here.
    return {
        "InferenceRequest": object_schema(
            {
                "id": nullable({"type": "string"}),
                "parameters": nullable(_request_parameters()),
                "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestInput"}},
                "outputs": nullable({"type": "array", "items": {"$ref": "#/components/schemas/RequestOutput"}}),
            },
            ["inputs"],
        ),
        "RequestInput": object_schema(
            {**tensor, "parameters": nullable(_input_parameters()), "data": data},
            ["name", "datatype", "shape", "data"],
        ),
        "RequestOutput": object_schema(
            {"name": {"type": "string"}, "parameters": nullable(_output_parameters())}, ["name"]
        ),
        "InferenceResponse": object_schema(
            {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "parameters": {"type": "object"},
                "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/ResponseOutput"}},
            },
            ["model_name", "outputs"],
        ),
        "ResponseOutput": object_schema(
            {**tensor, "parameters": {"type": "object"}, "data": data}, ["name", "datatype", "shape"]
        ),
        "TensorMetadata": object_schema(declared, ["name", "datatype", "shape"]),
        "GenerateResponse": object_schema(
            {"model_name": {"type": "string"}, "model_version": {"type": "string"}}, ["model_name", "model_version"]
        ),
        "ServerMetadata": object_schema(
            {"name": {"type": "string"}, "version": {"type": "string"}, "extensions": strings()},
            ["name", "version", "extensions"],
        ),
        "ModelMetadata": object_schema(
            {
                "name": {"type": "string"},
                "versions": strings(),
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
                "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
            },
            ["name", "platform", "inputs", "outputs"],
        ),
        "RepositoryIndex": {
            "type": "array",
            "items": object_schema(
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
    digits = {"type": "string", "pattern": rf"^\s*{PRIORITY_DIGITS}\s*$"}
    priority = {
        "anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, digits],
        "description": f"{PRIORITY} An integer, or its digits as a string.",
    }
    binary = nullable({"type": "boolean", "description": "Send every output as binary data by default."})
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
    binary = nullable({"type": "boolean", "description": "Send this output as binary data."})
    return {"type": "object", "properties": {"binary_data": binary}}


def v2_paths() -> dict[str, Any]:
    model = [param_ref("ModelName")]
    versioned = [*model, param_ref("ModelVersion")]
    metadata = _v2_get("Model metadata: its versions, platform and tensors.", json_response("OK.", "ModelMetadata"))
    model_ready = _v2_get("200 when the model can take requests.", _state("name", "ready"), (404, 503), scope=None)
    infer = _infer_operation()
    return {
        "/v2": {
            "get": _v2_get("Server metadata: name, version and extensions.", json_response("OK.", "ServerMetadata"), ())
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
    return build_operation(
        "The models of this server and their states.",
        {"200": json_response("The models.", "RepositoryIndex")},
        BODY,
        scope="admin",
        requestBody={"required": False, "content": {"application/json": {"schema": body}}},
    )


def _repository(summary: str, errors: Sequence[int]) -> dict[str, Any]:
    done = {"description": "Done.", "content": {"application/json": {"schema": {"type": "object"}}}}
    return build_operation(summary, {"200": done}, errors, scope="admin")


def _infer_operation() -> dict[str, Any]:
    binary = {
        "type": "string",
        "contentMediaType": "application/octet-stream",
        "description": "The binary tensor data extension: a JSON InferenceRequest of `Inference-Header-Content-Length` "
        "bytes, then the raw tensors of the inputs whose `parameters.binary_data_size` is set.",
    }
    answer = json_response("The outputs.", "InferenceResponse")
    answer["content"]["application/octet-stream"] = {"schema": binary}
    answer["headers"] = {
        "Inference-Header-Content-Length": {
            "description": "With binary outputs (`application/octet-stream`): the length of the JSON part.",
            "schema": {"type": "integer", "minimum": 0},
        },
        "X-Degraded": degraded_header(),
    }
    return build_operation(
        "Run inference with the Open Inference Protocol (V2).",
        {"200": answer},
        (*INFERENCE, 404, 502),
        scope="infer",
        parameters=[param_ref("RequestTimeout"), param_ref("InferenceHeaderContentLength")],
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
        ok = json_response("The outputs, by name, after the model's name and version.", "GenerateResponse")
    return build_operation(
        summary,
        {"200": ok},
        (*INFERENCE, 404, 502),
        scope="infer",
        parameters=[param_ref("RequestTimeout")],
        requestBody={"required": True, "content": {"application/json": {"schema": body}}},
    )


def operations_paths() -> dict[str, Any]:
    metrics = {"description": "Prometheus metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}
    document = {"description": "This document.", "content": {"application/json": {"schema": {"type": "object"}}}}
    page = {"description": "Swagger UI.", "content": {"text/html": {"schema": {"type": "string"}}}}
    return {
        "/metrics": {
            "get": build_operation("Prometheus metrics.", {"200": metrics}, (), scope="metrics", tag="operations")
        },
        "/openapi.json": {
            "get": build_operation("This OpenAPI document.", {"200": document}, (), scope=None, tag="operations")
        },
        "/docs": {"get": build_operation("This document, rendered.", {"200": page}, (), scope=None, tag="operations")},
        **_dashboard_paths(),
    }


def _dashboard_paths() -> dict[str, Any]:
    page = {"description": "The dashboard.", "content": {"text/html": {"schema": {"type": "string"}}}}
    numbers = {"type": "object", "additionalProperties": {"type": "number"}}
    model = object_schema(
        {
            "label": {"type": "string"}, "name": {"type": "string"}, "version": nullable({"type": "string"}),
            "state": {"enum": ["LOADING", "READY", "UNAVAILABLE"]}, "reason": {"type": "string"},
            "inputs": {"type": "array"}, "outputs": {"type": "array"}, "stats": {"type": "object"},
        },
        ["label", "name", "state", "reason", "inputs", "outputs", "stats"],
    )  # fmt: skip
    counts = object_schema({"counts": {"type": "object", "additionalProperties": {"type": "integer"}}}, [])
    summary = object_schema(
        {
            "service": {"type": "string"}, "version": {"type": "string"}, "time": {"type": "number"},
            "server": numbers, "workers": {"type": "array", "items": numbers},
            "models": {"type": "array", "items": model}, "jobs": nullable(counts),
        },
        ["service", "server", "workers", "models", "jobs"],
    )  # fmt: skip
    ok = {"description": "OK.", "content": {"application/json": {"schema": summary}}}
    about = (
        "What the dashboard shows: each model's state and recent throughput, latency (p50, p99), batch size, queue "
        "depth and shed requests; the event loop's lag, requests in flight, executor use, each worker; job counts."
    )
    return {
        "/ui": {
            "get": build_operation("A live dashboard of the server.", {"200": page}, (), scope=None, tag="operations")
        },
        "/ui/summary": {"get": build_operation(about, {"200": ok}, (), scope="metrics", tag="operations")},
    }


def _v2_get(
    summary: str, ok: dict[str, Any], errors: Sequence[int] = (404,), *, scope: str | None = "infer"
) -> dict[str, Any]:
    return build_operation(summary, {"200": ok}, errors, scope=scope)


def _state(*fields: str) -> dict[str, Any]:
    """A health answer: ``{"live": true}``, ``{"ready": true}`` or ``{"name": ..., "ready": true}``."""
    properties = {name: {"type": "string"} if name == "name" else {"const": True} for name in fields}
    return {"description": "OK.", "content": {"application/json": {"schema": object_schema(properties, list(fields))}}}
