"""The OpenAPI document: typed predict operations per model, the V2 routes, and the /docs page."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import jsonschema
import numpy as np
import numpy.typing as npt
import orjson
import pytest

from asyncserve import demo
from asyncserve.http.jsonapi import decode_rows
from asyncserve.http.openapi import openapi_document, row_schema, tensor_schema
from asyncserve.http.openapi_jobs import JobsDocument
from asyncserve.model import Model, describe
from asyncserve.tensors import Datatype, Tensor


class Iris(Model):
    name = "iris"
    version = "2"
    inputs: ClassVar[Mapping[str, Tensor]] = {
        "features": Tensor("FP32", shape=(4,), description="Sepal and petal sizes in cm.")
    }
    outputs: ClassVar[Mapping[str, Tensor]] = {"label": Tensor("BYTES"), "probabilities": Tensor("FP32", shape=(3,))}
    example: ClassVar[Mapping[str, Any]] = {"features": [5.1, 3.5, 1.4, 0.2]}

    def predict(self, features: npt.NDArray[Any]) -> dict[str, Any]:
        return {"label": np.array(["setosa"] * len(features), dtype=object), "probabilities": features[:, :3]}


class IrisV10(Iris):
    version = "10"
    inputs: ClassVar[Mapping[str, Tensor]] = {"features": Tensor("FP64", shape=(4,))}


class Thumbnail(Model):
    name = "thumbnail"
    inputs: ClassVar[Mapping[str, Tensor]] = {
        "image": Tensor("BYTES", binary=True),
        "size": Tensor("UINT16", shape=(2,)),
    }
    outputs: ClassVar[Mapping[str, Tensor]] = {"image": Tensor("BYTES", binary=True)}

    def predict(self, image: npt.NDArray[Any], size: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return image


class Words(Model):
    name = "words"
    inputs: ClassVar[Mapping[str, Tensor]] = {"text": Tensor("BYTES")}
    outputs: ClassVar[Mapping[str, Tensor]] = {"word": Tensor("BYTES")}

    def predict(self, text: npt.NDArray[Any]) -> Iterator[dict[str, Any]]:
        for word in str(text[0]).split():
            yield {"word": [word]}


IRIS = describe(Iris())
THUMBNAIL = describe(Thumbnail())
JOBS = JobsDocument(max_batch=500, webhooks=False)
KEY_STATUSES = ["401", "403", "429"]
PREDICT_STATUSES = sorted(["200", "202", "400", *KEY_STATUSES, "413", "415", "422", "500", "503", "504"])
INFER_STATUSES = sorted(["200", "400", *KEY_STATUSES, "404", "413", "415", "422", "500", "502", "503", "504"])
OPEN_ROUTES = [
    "/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}/ready", "/openapi.json", "/docs", "/ui",
]  # fmt: skip


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi_document("demo", "1.2.3", [IRIS, THUMBNAIL], JOBS)


def follow(document: dict[str, Any], node: Any) -> Any:
    """Follow a local ``$ref`` (if any) to what it names."""
    while isinstance(node, dict) and "$ref" in node:
        pointer = node["$ref"]
        assert pointer.startswith("#/"), pointer
        node = document
        for part in pointer[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in ("get", "post", "delete"):
            if method in item:
                yield path, method, item, item[method]


# -- the document --------------------------------------------------------------------------------


def test_the_document_is_openapi_3_1_for_the_service(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "demo"
    assert document["info"]["version"] == "1.2.3"
    assert "`iris:2`" in document["info"]["description"]


def test_the_document_is_json(document: dict[str, Any]) -> None:
    assert orjson.loads(orjson.dumps(document)) == document


def test_each_call_builds_a_fresh_document() -> None:
    first = openapi_document("demo", "1", [IRIS])
    first["paths"].clear()
    first["components"]["schemas"]["Error"]["required"].append("x")
    second = openapi_document("demo", "1", [IRIS])
    assert "/v1/models/iris/predict" in second["paths"]
    assert second["components"]["schemas"]["Error"]["required"] == ["error", "code"]


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    refs = [node["$ref"] for node in walk(document) if "$ref" in node]
    assert refs
    for ref in refs:
        assert follow(document, {"$ref": ref}) is not None


def test_every_path_parameter_is_declared(document: dict[str, Any]) -> None:
    for path, _, item, operation in operations(document):
        declared = [follow(document, p) for p in item.get("parameters", []) + operation.get("parameters", [])]
        in_path = {p["name"] for p in declared if p["in"] == "path"}
        assert in_path == set(re.findall(r"{(\w+)}", path)), path
        assert all(p["required"] for p in declared if p["in"] == "path")


def test_every_operation_answers_and_operation_ids_are_unique(document: dict[str, Any]) -> None:
    ids = [operation["operationId"] for *_, operation in operations(document) if "operationId" in operation]
    assert len(ids) == len(set(ids))
    for _, _, _, operation in operations(document):
        assert {"200", "202"} & set(operation["responses"])  # a batch of jobs is only ever accepted (202)
        assert operation["summary"]


def test_component_names_are_valid(document: dict[str, Any]) -> None:
    for kind in ("schemas", "responses", "parameters"):
        for name in document["components"][kind]:
            assert re.fullmatch(r"[A-Za-z0-9._-]+", name), name


# -- predict operations --------------------------------------------------------------------------


def test_each_model_gets_a_typed_predict_operation(document: dict[str, Any]) -> None:
    operation = document["paths"]["/v1/models/iris/predict"]["post"]
    assert operation["operationId"] == "predict_iris"
    assert document["paths"]["/v1/models/thumbnail/predict"]["post"]["operationId"] == "predict_thumbnail"
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    row, rows = schema["oneOf"]
    assert follow(document, row) == row_schema(IRIS.inputs)
    assert rows == {"type": "array", "items": row, "minItems": 1, "maxItems": IRIS.max_batch_size}
    answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert follow(document, answer["oneOf"][0]) == row_schema(IRIS.outputs, outputs=True)
    assert answer["oneOf"][1]["type"] == "array"


def test_examples_come_from_the_model_and_decode(document: dict[str, Any]) -> None:
    media = document["paths"]["/v1/models/iris/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert media["examples"]["row"]["value"] == {"features": [5.1, 3.5, 1.4, 0.2]}
    columns, as_list = decode_rows(orjson.dumps(media["examples"]["rows"]["value"]), IRIS)
    assert as_list is True
    assert columns["features"].shape == (2, 4)


def test_a_model_without_example_has_no_examples(document: dict[str, Any]) -> None:
    media = document["paths"]["/v1/models/thumbnail/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert "examples" not in media


def test_predict_documents_every_error_with_the_error_schema(document: dict[str, Any]) -> None:
    responses = document["paths"]["/v1/models/iris/predict"]["post"]["responses"]
    assert sorted(responses) == PREDICT_STATUSES
    for status in PREDICT_STATUSES[2:]:
        response = follow(document, responses[status])
        assert response["description"]
        assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert follow(document, responses["503"])["headers"]["Retry-After"]["required"] is True
    assert "Retry-After" in follow(document, responses["429"])["headers"]
    assert "WWW-Authenticate" in follow(document, responses["401"])["headers"]
    assert document["components"]["schemas"]["Error"] == {
        "type": "object",
        "properties": {
            "error": {"type": "string", "description": "What went wrong, and how to fix it."},
            "code": {"type": "string", "description": "A stable machine code, like `schema_violation`."},
        },
        "required": ["error", "code"],
    }


def test_predict_takes_the_timeout_priority_and_prefer_headers(document: dict[str, Any]) -> None:
    operation = document["paths"]["/v1/models/iris/predict"]["post"]
    parameters = [follow(document, p) for p in operation["parameters"]]
    assert [p["name"] for p in parameters] == ["X-Request-Timeout", "X-Priority", "Prefer"]
    assert all(p["in"] == "header" and not p["required"] for p in parameters)


@pytest.mark.parametrize(("value", "taken"), [("0", True), ("9", True), ("07", True), ("-0", True), ("10", False),
                                              ("-1", False), ("1.0", False), ("", False), ("x", False)])  # fmt: skip
def test_the_priority_header_takes_what_the_server_takes(document: dict[str, Any], value: str, taken: bool) -> None:
    pattern = document["components"]["parameters"]["Priority"]["schema"]["pattern"]
    assert (re.search(pattern, value) is not None) is taken


def test_predict_with_prefer_lazy_answers_a_handle(document: dict[str, Any]) -> None:
    deferred = document["paths"]["/v1/models/iris/predict"]["post"]["responses"]["202"]
    assert set(deferred["headers"]) == {"Location", "Preference-Applied"}
    handle = follow(document, deferred["content"]["application/json"]["schema"])
    assert handle["required"] == ["id", "model", "url", "expires_in_s"]
    read = document["paths"]["/v1/predictions/{handle}"]["get"]
    outputs = read["responses"]["200"]["content"]["application/json"]["schema"]["anyOf"]
    assert len(outputs) == 2  # iris and thumbnail
    assert "404" in read["responses"]


def test_the_v1_route_documents_the_highest_version() -> None:
    v10 = describe(IrisV10())
    for specs in ([IRIS, v10], [v10, IRIS]):
        document = openapi_document("demo", "1", specs)
        schema = document["components"]["schemas"]["iris.Inputs"]
        assert schema["properties"]["features"]["items"]["format"] == "double"
        assert sorted(p for p in document["paths"] if p.startswith("/v1/models/")) == [
            "/v1/models/iris/predict",
            "/v1/models/iris/versions/10/predict",
            "/v1/models/iris/versions/2/predict",
        ]
        versioned = document["paths"]["/v1/models/iris/versions/2/predict"]["post"]["requestBody"]
        assert versioned["content"]["application/json"]["schema"]["oneOf"][0]["$ref"].endswith("/iris.v2.Inputs")


def test_a_service_without_models_still_has_the_generic_routes() -> None:
    document = openapi_document("empty", "1", [])
    assert not [p for p in document["paths"] if p.startswith("/v1/models/")]
    assert "/v2/health/ready" in document["paths"]


# -- generic routes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/v2", "get"),
        ("/v2/health/live", "get"),
        ("/v2/health/ready", "get"),
        ("/v2/models/{model_name}", "get"),
        ("/v2/models/{model_name}/versions/{model_version}", "get"),
        ("/v2/models/{model_name}/ready", "get"),
        ("/v2/models/{model_name}/versions/{model_version}/ready", "get"),
        ("/v2/models/{model_name}/infer", "post"),
        ("/v2/models/{model_name}/versions/{model_version}/infer", "post"),
        ("/v2/models/{model_name}/generate", "post"),
        ("/v2/models/{model_name}/generate_stream", "post"),
        ("/v2/repository/index", "post"),
        ("/v2/repository/models/{model_name}/load", "post"),
        ("/v2/repository/models/{model_name}/unload", "post"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/ui", "get"),
        ("/ui/summary", "get"),
    ],
)
def test_the_generic_routes_are_documented(document: dict[str, Any], path: str, method: str) -> None:
    assert method in document["paths"][path]


def test_v2_infer_uses_the_inference_schemas(document: dict[str, Any]) -> None:
    operation = document["paths"]["/v2/models/{model_name}/infer"]["post"]
    request = follow(document, operation["requestBody"]["content"]["application/json"]["schema"])
    assert request["required"] == ["inputs"]
    item = follow(document, request["properties"]["inputs"]["items"])
    assert item["properties"]["datatype"]["enum"] == [str(d) for d in Datatype]
    response = follow(document, operation["responses"]["200"]["content"]["application/json"]["schema"])
    assert response["required"] == ["model_name", "outputs"]
    assert "application/octet-stream" in operation["requestBody"]["content"]
    # With jobs, `Prefer: respond-async` makes the request a job (202), and its idempotency key may conflict (409).
    assert sorted(operation["responses"]) == sorted([*INFER_STATUSES, "202", "409"])
    assert "application/octet-stream" in operation["responses"]["200"]["content"]


def test_metrics_are_plain_text(document: dict[str, Any]) -> None:
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def test_v2_inputs_require_their_data(document: dict[str, Any]) -> None:
    item = document["components"]["schemas"]["RequestInput"]
    assert item["required"] == ["name", "datatype", "shape", "data"]
    assert item["properties"]["shape"]["items"] == {"type": "integer", "minimum": 0}
    # A model's metadata gives -1 for the rows.
    assert document["components"]["schemas"]["TensorMetadata"]["properties"]["shape"]["items"]["minimum"] == -1


def test_the_repository_index_documents_its_body_and_its_errors(document: dict[str, Any]) -> None:
    operation = document["paths"]["/v2/repository/index"]["post"]
    assert operation["requestBody"]["required"] is False
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["ready"]["type"] == "boolean"
    assert sorted(operation["responses"]) == sorted(["200", "400", *KEY_STATUSES, "413", "415", "422"])


def test_every_operation_documents_a_refused_host(document: dict[str, Any]) -> None:
    for _, _, _, operation in operations(document):
        assert "400" in operation["responses"]


def test_routes_that_need_a_key_say_so_and_health_checks_do_not(document: dict[str, Any]) -> None:
    for path, _, _, operation in operations(document):
        if path in OPEN_ROUTES or path == "/v2/models/{model_name}/versions/{model_version}/ready":
            assert "security" not in operation, path
            assert "401" not in operation["responses"], path
        else:
            # Optional ({}): a server without keys opens every route.
            assert operation["security"] == [{"bearer": []}, {"apiKey": []}, {}], path
            assert {"401", "403", "429"} <= set(operation["responses"]), path
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": schemes["bearer"]["description"]}
    assert schemes["apiKey"]["name"] == "X-API-Key"


def test_405_is_described_with_its_allow_header(document: dict[str, Any]) -> None:
    response = document["components"]["responses"]["MethodNotAllowed"]
    assert response["headers"]["Allow"]["required"] is True


def test_path_parameters_give_the_served_models_as_examples(document: dict[str, Any]) -> None:
    parameters = document["components"]["parameters"]
    assert list(parameters["ModelName"]["examples"]) == ["iris", "thumbnail"]
    assert parameters["ModelVersion"]["examples"] == {"2": {"value": "2"}}


def test_a_streaming_model_answers_its_parts_as_json_events_or_lines() -> None:
    document = openapi_document("demo", "1", [describe(Words())])
    operation = document["paths"]["/v1/models/words/predict"]["post"]
    assert sorted(operation["responses"]) == sorted(set(PREDICT_STATUSES) - {"202"})
    answer = operation["responses"]["200"]["content"]
    assert list(answer) == ["application/json", "text/event-stream", "application/x-ndjson"]
    parts = answer["application/json"]["schema"]
    assert parts["type"] == "array"
    assert follow(document, parts["items"]["oneOf"][0]) == row_schema(describe(Words()).outputs, outputs=True)
    assert [follow(document, p)["name"] for p in operation["parameters"]] == ["X-Request-Timeout", "X-Priority"]
    # Nothing batches a stream's rows, so nothing caps them; and a stream is never deferred.
    rows = operation["requestBody"]["content"]["application/json"]["schema"]["oneOf"][1]
    assert "maxItems" not in rows
    assert document["paths"]["/v1/predictions/{handle}"]["get"]["responses"]["200"]["content"]["application/json"] == {
        "schema": {}
    }


def test_generate_answers_the_outputs_by_name_and_generate_stream_events(document: dict[str, Any]) -> None:
    generate = document["paths"]["/v2/models/{model_name}/generate"]["post"]
    answer = follow(document, generate["responses"]["200"]["content"]["application/json"]["schema"])
    assert answer["required"] == ["model_name", "model_version"]
    stream = document["paths"]["/v2/models/{model_name}/generate_stream"]["post"]
    assert list(stream["responses"]["200"]["content"]) == ["text/event-stream"]
    for operation in (generate, stream):
        assert sorted(operation["responses"]) == INFER_STATUSES


def test_a_model_with_features_documents_its_inputs_and_its_feature_errors() -> None:
    churn = describe(demo.ChurnModel())
    document = openapi_document("demo", "1", [churn])
    operation = document["paths"]["/v1/models/churn/predict"]["post"]
    # The model's example also holds feature values (for its warm-up); a request sends its inputs only.
    examples = operation["requestBody"]["content"]["application/json"]["examples"]
    assert examples["row"]["value"] == {"customer_id": demo.CHURN_EXAMPLE}
    assert "502" in operation["responses"]
    assert "X-Degraded" in operation["responses"]["200"]["headers"]


# -- tensor schemas ------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", list(Datatype))
def test_every_datatype_has_its_json_type(datatype: Datatype) -> None:
    schema = tensor_schema(Tensor(datatype))
    expected = {"BOOL": "boolean", "BYTES": "string", "FP16": "number", "FP32": "number", "FP64": "number"}
    assert schema["type"] == expected.get(str(datatype), "integer")
    if schema["type"] == "integer":
        info = np.iinfo(datatype.numpy_dtype)
        assert (schema["minimum"], schema["maximum"]) == (int(info.min), int(info.max))
    else:
        assert "minimum" not in schema
    assert schema["description"] == f"{datatype}, one value per row."


@pytest.mark.parametrize(("datatype", "limit"), [("FP16", 65520.0), ("FP32", 2.0**128 - 2.0**103)])
def test_floats_are_bounded_where_they_would_overflow(datatype: str, limit: float) -> None:
    schema = tensor_schema(Tensor(datatype))
    assert (schema["exclusiveMinimum"], schema["exclusiveMaximum"]) == (-limit, limit)
    # The first number refused is the first that the cast makes infinite.
    dtype = Datatype(datatype).numpy_dtype.type
    with np.errstate(over="ignore"):
        assert np.isinf(dtype(limit))
        assert np.isfinite(dtype(np.nextafter(limit, 0)))


def test_output_floats_may_be_null() -> None:
    schema = tensor_schema(Tensor("FP32", shape=(2,)), output=True)
    assert schema["items"] == {"type": ["number", "null"], "format": "float"}
    assert tensor_schema(Tensor("INT8"), output=True)["type"] == "integer"


def test_binary_bytes_are_base64_strings() -> None:
    schema = tensor_schema(Tensor("BYTES", binary=True))
    assert schema["type"] == "string"
    assert schema["contentEncoding"] == "base64"
    assert [re.search(schema["pattern"], v) is not None for v in ("", "YQ==", "YWI=", "YWJj", "YQ", "Y Q==")] == [
        True,
        True,
        True,
        True,
        False,
        False,
    ]
    assert "base64" in schema["description"]
    assert "contentEncoding" not in tensor_schema(Tensor("BYTES"))


def test_shapes_become_nested_arrays_with_bounds() -> None:
    schema = tensor_schema(Tensor("INT8", shape=(2, 3)))
    assert schema["type"] == "array"
    assert (schema["minItems"], schema["maxItems"]) == (2, 2)
    inner = schema["items"]
    assert (inner["type"], inner["minItems"], inner["maxItems"]) == ("array", 3, 3)
    assert inner["items"] == {"type": "integer", "minimum": -128, "maximum": 127}
    assert "description" not in inner


def test_any_length_dimensions_have_no_bounds() -> None:
    schema = tensor_schema(Tensor("FP32", shape=(-1, 2)))
    assert "minItems" not in schema
    assert "maxItems" not in schema
    assert schema["items"]["minItems"] == 2
    assert "-1: any length" in schema["description"]


def test_descriptions_name_datatype_shape_and_the_declared_description() -> None:
    schema = tensor_schema(Tensor("FP32", shape=(4,), description="Sepal and petal sizes in cm."))
    assert schema["description"] == "FP32, shape [4] per row. Sepal and petal sizes in cm."


def test_a_row_requires_every_tensor_and_nothing_else() -> None:
    schema = row_schema(THUMBNAIL.inputs)
    assert schema["type"] == "object"
    assert schema["required"] == ["image", "size"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["size"]["items"]["maximum"] == 65535


# -- the jobs API --------------------------------------------------------------------------------

STATUSES = ["queued", "running", "succeeded", "failed", "cancelled", "expired"]
JOB_ROUTES = [
    ("/v1/jobs", "post", "submit_job", ["200", "202", "404", "409", "413", "415", "422", "503"]),
    ("/v1/jobs/batch", "post", "submit_jobs", ["202", "404", "409", "413", "415", "422", "503"]),
    ("/v1/jobs", "get", "list_jobs", ["200"]),
    ("/v1/jobs/{job_id}", "get", "get_job", ["200", "404"]),
    ("/v1/jobs/{job_id}", "delete", "cancel_job", ["200", "404"]),
    ("/v1/jobs/{job_id}/events", "get", "job_events", ["200", "404"]),
]


def submission_validator(document: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """Validates a job's body against the document's ``JobSubmission`` (its references resolved in the document)."""
    return jsonschema.Draft202012Validator({**document, "$ref": "#/components/schemas/JobSubmission"})


@pytest.mark.parametrize(("path", "method", "operation_id", "statuses"), JOB_ROUTES)
def test_the_jobs_routes_are_documented_with_the_jobs_scope_and_their_errors(
    document: dict[str, Any], path: str, method: str, operation_id: str, statuses: list[str]
) -> None:
    operation = document["paths"][path][method]
    assert operation["operationId"] == operation_id
    assert operation["tags"] == ["jobs"]
    assert operation["security"] == [{"bearer": []}, {"apiKey": []}, {}]
    assert "`jobs` scope" in operation["description"]
    assert sorted(operation["responses"]) == sorted([*statuses, "400", *KEY_STATUSES])
    conflict = follow(document, operation["responses"].get("409", {}))
    assert not conflict or "idempotency key" in conflict["description"]


def test_a_submission_answers_the_job_and_where_it_is(document: dict[str, Any]) -> None:
    operation = document["paths"]["/v1/jobs"]["post"]
    for status in ("200", "202"):
        answer = operation["responses"][status]
        assert answer["headers"]["Location"]["required"] is True
        job = follow(document, answer["content"]["application/json"]["schema"])
        assert {"id", "status", "result", "error", "links"} <= set(job["required"])
        assert "lease_owner" not in job["properties"]  # the broker's internals are not shown
        assert job["properties"]["status"]["enum"] == STATUSES
    header = follow(document, operation["parameters"][0])
    assert (header["name"], header["in"], header["required"]) == ("Idempotency-Key", "header", False)
    assert (header["schema"]["minLength"], header["schema"]["maxLength"]) == (1, 2048)


def test_an_idempotency_key_is_printable_as_the_server_checks_it_in_latin_1(document: dict[str, Any]) -> None:
    key = jsonschema.Draft202012Validator(document["components"]["parameters"]["IdempotencyKey"]["schema"])
    latin_1 = [chr(code) for code in range(256)]
    assert [key.is_valid(char) for char in latin_1] == [char.isprintable() for char in latin_1]
    assert not key.is_valid("order-17\n")  # the last character too


def test_a_job_takes_each_models_inputs_as_its_json_api_does(document: dict[str, Any]) -> None:
    validator = submission_validator(document)
    row = {"features": [5.1, 3.5, 1.4, 0.2]}
    taken = [
        {"model": "iris", "inputs": row},
        {"model": "iris", "version": "2", "inputs": [row, row], "priority": 9, "idempotency_key": "order-17"},
        {"model": "iris", "version": None, "inputs": row, "ttl_s": 60, "max_attempts": 1, "queue_timeout_s": None},
        {"model": "thumbnail", "inputs": {"image": "YQ==", "size": [64, 64]}},
    ]
    refused = [
        {"model": "iris"},
        {"model": "iris", "inputs": {"image": "YQ==", "size": [64, 64]}},  # thumbnail's inputs
        {"model": "iris", "version": "3", "inputs": row},
        {"model": "iris", "inputs": [row] * (IRIS.max_batch_size + 1)},
        {"model": "iris", "inputs": row, "priority": 10},
        {"model": "iris", "inputs": row, "max_attempts": 101},
        {"model": "iris", "inputs": row, "ttl_s": 0},
        {"model": "iris", "inputs": row, "idempotency_key": "a\nb"},
        {"model": "iris", "inputs": row, "idempotency_key": ""},
        {"model": "iris", "inputs": row, "webhook": "https://example.com/done"},  # this server sends none
        {"model": "iris", "inputs": row, "colour": "red"},
    ]
    assert [validator.is_valid(body) for body in taken] == [True] * len(taken)
    assert [validator.is_valid(body) for body in refused] == [False] * len(refused)
    batch = document["paths"]["/v1/jobs/batch"]["post"]["requestBody"]["content"]
    jobs = {"type": "array", "items": {"$ref": "#/components/schemas/JobSubmission"}, "minItems": 1}
    assert batch["application/json"]["schema"] == {**jobs, "maxItems": JOBS.max_batch}
    assert "application/x-ndjson" in batch


def test_a_webhook_is_documented_only_where_the_server_sends_them() -> None:
    document = openapi_document("demo", "1", [IRIS], JobsDocument(max_batch=10, webhooks=True))
    body = {"model": "iris", "inputs": {"features": [5.1, 3.5, 1.4, 0.2]}, "webhook": "https://example.com/done"}
    assert submission_validator(document).is_valid(body)


def test_a_streaming_model_cannot_be_a_job() -> None:
    document = openapi_document("demo", "1", [IRIS, describe(Words())], JOBS)
    titles = [variant["title"] for variant in document["components"]["schemas"]["JobSubmission"]["anyOf"]]
    assert titles == ["iris", "iris:2"]
    assert not submission_validator(document).is_valid({"model": "words", "inputs": {"text": "a b"}})


def test_listing_jobs_takes_its_query_parameters(document: dict[str, Any]) -> None:
    operation = document["paths"]["/v1/jobs"]["get"]
    query = {p["name"]: p for p in operation["parameters"]}
    assert list(query) == ["status", "model", "cursor", "limit"]
    assert all(p["in"] == "query" and not p["required"] for p in query.values())
    assert query["status"]["schema"]["enum"] == STATUSES
    assert (query["limit"]["schema"]["minimum"], query["limit"]["schema"]["maximum"]) == (1, 1000)
    assert re.search(query["cursor"]["schema"]["pattern"], "0" * 32)
    assert not re.search(query["cursor"]["schema"]["pattern"], "x" * 32)
    page = follow(document, operation["responses"]["200"]["content"]["application/json"]["schema"])
    assert page["required"] == ["jobs", "next_cursor"]
    events = document["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert list(events) == ["text/event-stream"]


def test_v2_infer_takes_prefer_respond_async_only_on_a_server_with_jobs(document: dict[str, Any]) -> None:
    for path in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer"):
        operation = document["paths"][path]["post"]
        names = [follow(document, p)["name"] for p in operation["parameters"]]
        assert names == ["X-Request-Timeout", "Inference-Header-Content-Length", "Prefer", "Idempotency-Key"]
        accepted = operation["responses"]["202"]
        assert follow(document, accepted["content"]["application/json"]["schema"])["properties"]["links"]
    without = openapi_document("demo", "1", [IRIS])
    assert not [path for path in without["paths"] if path.startswith("/v1/jobs")]
    infer = without["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert sorted(infer["responses"]) == INFER_STATUSES
    assert "jobs" not in [tag["name"] for tag in without["tags"]]
