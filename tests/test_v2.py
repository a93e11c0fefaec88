"""The Open Inference Protocol codec, proven against hand-written bodies and tritonclient's own bytes."""

from __future__ import annotations

import base64
import struct
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from tritonclient.http import InferInput, InferRequestedOutput, InferResult
from tritonclient.http._utils import _get_inference_request

from asyncserve.exceptions import InvalidRequest, SchemaViolation
from asyncserve.http import v2
from asyncserve.http.conversions import may_hold_booleans
from asyncserve.http.v2 import (
    InferRequest,
    RequestedOutput,
    decode_infer_request,
    encode_infer_response,
    model_metadata,
)
from asyncserve.model import Model, ModelSpec, describe
from asyncserve.tensors import Columns, Datatype, Tensor

# Two values per datatype, including each type's extremes, so a round trip proves no precision is lost.
SAMPLES: dict[Datatype, list[Any]] = {
    Datatype.BOOL: [True, False],
    Datatype.UINT8: [0, 255],
    Datatype.UINT16: [0, 65535],
    Datatype.UINT32: [0, 2**32 - 1],
    Datatype.UINT64: [0, 2**64 - 1],
    Datatype.INT8: [-128, 127],
    Datatype.INT16: [-(2**15), 2**15 - 1],
    Datatype.INT32: [-(2**31), 2**31 - 1],
    Datatype.INT64: [-(2**63), 2**63 - 1],
    Datatype.FP16: [0.099975586, -65504.0],
    Datatype.FP32: [0.1, -3.4028234663852886e38],
    Datatype.FP64: [0.1, 1.7976931348623157e308],
    Datatype.BYTES: ["héllo", ""],
}


class Echo(Model):
    """One input and one output per datatype, each two values per row; predict echoes them."""

    name = "echo"
    version = "3"
    inputs: ClassVar[dict[str, Tensor]] = {f"in_{d.lower()}": Tensor(d, shape=(2,)) for d in Datatype}
    outputs: ClassVar[dict[str, Tensor]] = {f"out_{d.lower()}": Tensor(d, shape=(2,)) for d in Datatype}

    def predict(self, **columns: Any) -> Any:
        return {name.replace("in_", "out_"): column for name, column in columns.items()}


class Scorer(Model):
    """A small model with a variable-length input and a binary (raw bytes) input."""

    name = "scorer"
    inputs: ClassVar[dict[str, Tensor]] = {
        "x": Tensor("FP32", shape=(3,)),
        "tokens": Tensor("INT64", shape=(-1,)),
        "blob": Tensor("BYTES", binary=True),
    }
    outputs: ClassVar[dict[str, Tensor]] = {
        "score": Tensor("FP32"),
        "label": Tensor("BYTES"),
        "raw": Tensor("BYTES", binary=True),
    }

    def predict(self, x: Any, tokens: Any, blob: Any) -> Any:
        return {}


class Single(Model):
    name = "single"
    inputs: ClassVar[dict[str, Tensor]] = {"x": Tensor("FP32", shape=(2,))}
    outputs: ClassVar[dict[str, Tensor]] = {"y": Tensor("FP32", shape=(2,)), "z": Tensor("INT32")}

    def predict(self, x: Any) -> Any:
        return {}


ECHO = describe(Echo())
SCORER = describe(Scorer())
SINGLE = describe(Single())


def json_body(inputs: list[dict[str, Any]], **fields: Any) -> bytes:
    return orjson.dumps({"inputs": inputs, **fields})


def x_input(data: Any = None, shape: Any = None, **fields: Any) -> dict[str, Any]:
    entry = {"name": "x", "datatype": "FP32", "shape": shape or [1, 2], "data": [1.0, 2.0] if data is None else data}
    return {**entry, **fields}


def decode_single(inputs: list[dict[str, Any]] | None = None, **fields: Any) -> InferRequest:
    return decode_infer_request(json_body(inputs or [x_input()], **fields), SINGLE, None)


def echo_columns(rows: int = 1) -> dict[str, npt.NDArray[Any]]:
    columns: dict[str, npt.NDArray[Any]] = {}
    for datatype, values in SAMPLES.items():
        array = np.array([values] * rows, dtype=datatype.numpy_dtype)
        columns[f"in_{datatype.lower()}"] = array
    return columns


def triton_round_trip(
    spec: ModelSpec,
    columns: dict[str, npt.NDArray[Any]],
    *,
    binary_inputs: bool = True,
    outputs: list[InferRequestedOutput] | None = None,
    request_id: str = "",
) -> tuple[InferRequest, InferResult]:
    """Build a request with tritonclient, decode it, echo it back, and parse the response with tritonclient."""
    inputs = []
    for name, array in columns.items():
        datatype = spec.inputs[name].dtype
        inputs.append(InferInput(name, list(array.shape), str(datatype)).set_data_from_numpy(array, binary_inputs))
    body, json_size = _get_inference_request(
        inputs=inputs,
        request_id=request_id,
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=None,
    )
    request = decode_infer_request(body, spec, json_size)
    result_columns = {name.replace("in_", "out_"): column for name, column in request.columns.items()}
    response, headers = encode_infer_response(spec, request, result_columns)
    header_length = headers.get("inference-header-content-length")
    result = InferResult.from_response_body(
        response, header_length=None if header_length is None else int(header_length)
    )
    return request, result


def assert_column(column: npt.NDArray[Any], datatype: Datatype, expected: list[Any]) -> None:
    assert column.dtype == datatype.numpy_dtype
    if datatype is Datatype.BYTES:
        assert column.tolist() == expected
    else:
        np.testing.assert_array_equal(column, np.array(expected, dtype=datatype.numpy_dtype))


# --- metadata -------------------------------------------------------------------------------


def test_model_metadata_lists_batched_shapes() -> None:
    metadata = model_metadata(SCORER)
    assert metadata["name"] == "scorer"
    assert metadata["versions"] == []
    assert metadata["platform"] == "python"
    assert metadata["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "tokens", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "blob", "datatype": "BYTES", "shape": [-1]},
    ]
    assert metadata["outputs"][0] == {"name": "score", "datatype": "FP32", "shape": [-1]}


def test_model_metadata_gives_the_version() -> None:
    assert model_metadata(ECHO)["versions"] == ["3"]


# --- every datatype, JSON and binary --------------------------------------------------------


@pytest.mark.parametrize("datatype", list(Datatype))
def test_json_input_decodes_to_the_declared_dtype(datatype: Datatype) -> None:
    body = json_body([{"name": "v", "datatype": str(datatype), "shape": [1, 2], "data": SAMPLES[datatype]}])
    spec = one_input_spec("v", Tensor(datatype, shape=(2,)))
    request = decode_infer_request(body, spec, None)
    assert request.rows == 1
    assert request.columns["v"].shape == (1, 2)
    assert_column(request.columns["v"][0], datatype, SAMPLES[datatype])


def one_input_spec(input_name: str, tensor: Tensor) -> ModelSpec:
    class One(Model):
        name = "one"
        inputs: ClassVar[dict[str, Tensor]] = {input_name: tensor}
        outputs: ClassVar[dict[str, Tensor]] = {"out": tensor}

        def predict(self, **columns: Any) -> Any:
            return columns

    return describe(One())


@pytest.mark.parametrize("datatype", list(Datatype))
def test_json_output_encodes_flat_data(datatype: Datatype) -> None:
    columns = echo_columns(rows=2)
    request = InferRequest(id=None, columns=columns, rows=2, parameters={}, outputs=[])
    name = f"out_{datatype.lower()}"
    request.outputs = [RequestedOutput(name, binary=False)]
    body, headers = encode_infer_response(ECHO, request, {name: columns[f"in_{datatype.lower()}"]})
    assert headers == {"content-type": "application/json"}
    output = orjson.loads(body)["outputs"][0]
    assert output["name"] == name
    assert output["datatype"] == str(datatype)
    assert output["shape"] == [2, 2]
    assert_column(np.array(output["data"], dtype=datatype.numpy_dtype), datatype, SAMPLES[datatype] * 2)


def test_tritonclient_default_binary_round_trip_of_every_datatype() -> None:
    columns = echo_columns(rows=2)
    columns["in_bytes"] = np.array([["héllo".encode(), b""]] * 2, dtype=object)
    request, result = triton_round_trip(ECHO, columns)
    assert request.rows == 2
    assert all(r.binary for r in request.outputs)  # tritonclient asks binary_data_output when naming no outputs
    for datatype, values in SAMPLES.items():
        assert_column(request.columns[f"in_{datatype.lower()}"][1], datatype, values)
        got = result.as_numpy(f"out_{datatype.lower()}")
        assert got.shape == (2, 2)
        if datatype is Datatype.BYTES:
            assert got[0].tolist() == ["héllo".encode(), b""]
        else:
            np.testing.assert_array_equal(got, columns[f"in_{datatype.lower()}"])


def test_tritonclient_json_round_trip_of_every_datatype() -> None:
    columns = echo_columns(rows=1)
    outputs = [InferRequestedOutput(name, binary_data=False) for name in ECHO.outputs]
    request, result = triton_round_trip(ECHO, columns, binary_inputs=False, outputs=outputs)
    assert not any(r.binary for r in request.outputs)
    for datatype, values in SAMPLES.items():
        got = result.as_numpy(f"out_{datatype.lower()}")
        assert_column(got[0], datatype, values)


def test_tritonclient_fp16_and_uint64_extremes_round_trip() -> None:
    fp16 = np.array([[np.finfo(np.float16).max, np.finfo(np.float16).tiny]], dtype=np.float16)
    uint64 = np.array([[np.iinfo(np.uint64).max, 1]], dtype=np.uint64)
    columns = {**echo_columns(), "in_fp16": fp16, "in_uint64": uint64}
    for binary in (True, False):
        outputs = [InferRequestedOutput(n, binary_data=binary) for n in ("out_fp16", "out_uint64")]
        _, result = triton_round_trip(ECHO, columns, binary_inputs=binary, outputs=outputs)
        np.testing.assert_array_equal(result.as_numpy("out_fp16"), fp16)
        np.testing.assert_array_equal(result.as_numpy("out_uint64"), uint64)
        assert result.as_numpy("out_uint64").dtype == np.uint64


def test_tritonclient_id_and_mixed_binary_outputs() -> None:
    outputs = [InferRequestedOutput("out_int8", binary_data=False), InferRequestedOutput("out_fp32")]
    request, result = triton_round_trip(ECHO, echo_columns(), outputs=outputs, request_id="req-7")
    assert request.id == "req-7"
    assert request.outputs == [RequestedOutput("out_int8", False), RequestedOutput("out_fp32", True)]
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_name"] == "echo"
    assert response["model_version"] == "3"
    assert [o["name"] for o in response["outputs"]] == ["out_int8", "out_fp32"]
    assert response["outputs"][0]["data"] == [-128, 127]
    assert response["outputs"][1]["parameters"] == {"binary_data_size": 8}
    np.testing.assert_array_equal(result.as_numpy("out_fp32"), np.array([SAMPLES[Datatype.FP32]], dtype=np.float32))


def test_tritonclient_mixed_json_and_binary_inputs() -> None:
    inputs = [
        InferInput("x", [1, 3], "FP32").set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.float32)),
        InferInput("tokens", [1, 2], "INT64").set_data_from_numpy(np.array([[4, 5]]), binary_data=False),
        InferInput("blob", [1], "BYTES").set_data_from_numpy(np.array(["é"], dtype=object), binary_data=False),
    ]
    body, json_size = _get_inference_request(inputs, "", None, 0, False, False, 0, None, None)
    request = decode_infer_request(body, SCORER, json_size)
    assert request.columns["blob"].tolist() == ["é".encode()]
    np.testing.assert_array_equal(request.columns["tokens"], [[4, 5]])
    np.testing.assert_array_equal(request.columns["x"], [[1, 2, 3]])


# --- JSON forms ---------------------------------------------------------------------------


def test_nested_and_flat_data_decode_alike() -> None:
    flat = x_input([1.0, 2.0, 3.0, 4.0], shape=[2, 2])
    nested = x_input([[1.0, 2.0], [3.0, 4.0]], shape=[2, 2])
    deep = x_input([[[1.0], [2.0]], [[3.0], [4]]], shape=[2, 2])
    columns = [decode_single([entry]).columns["x"] for entry in (flat, nested, deep)]
    for column in columns:
        np.testing.assert_array_equal(column, np.array([[1, 2], [3, 4]], dtype=np.float32))
        assert column.dtype == np.float32


def test_variable_length_dimension_takes_any_length() -> None:
    for length in (1, 5):
        body = json_body(
            [
                {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [0.5] * 6},
                {"name": "tokens", "datatype": "INT64", "shape": [2, length], "data": list(range(2 * length))},
                {"name": "blob", "datatype": "BYTES", "shape": [2], "data": ["a", "é"]},
            ]
        )
        request = decode_infer_request(body, SCORER, None)
        assert request.columns["tokens"].shape == (2, length)
        assert list(request.columns) == ["x", "tokens", "blob"]


def test_json_string_for_a_binary_tensor_becomes_utf8_bytes() -> None:
    body = json_body(
        [
            {"name": "blob", "datatype": "BYTES", "shape": [1], "data": ["é"]},
            {"name": "tokens", "datatype": "INT64", "shape": [1, 0], "data": []},
            {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
        ]
    )
    request = decode_infer_request(body, SCORER, None)
    assert request.columns["blob"].tolist() == ["é".encode()]
    assert request.columns["tokens"].shape == (1, 0)


def test_id_parameters_and_default_outputs() -> None:
    request = decode_single(id="abc", parameters={"timeout": 5, "binary_data_output": True})
    assert request.id == "abc"
    assert request.parameters == {"timeout": 5, "binary_data_output": True}
    assert request.outputs == [RequestedOutput("y", True), RequestedOutput("z", True)]
    assert decode_single().id is None
    assert decode_single().outputs == [RequestedOutput("y", False), RequestedOutput("z", False)]


def test_outputs_filter_and_order() -> None:
    outputs = [{"name": "z"}, {"name": "y", "parameters": {"binary_data": True}}]
    request = decode_single(outputs=outputs, parameters={"binary_data_output": False})
    assert request.outputs == [RequestedOutput("z", False), RequestedOutput("y", True)]
    overridden = decode_single(
        outputs=[{"name": "z", "parameters": {"binary_data": False}}], parameters={"binary_data_output": True}
    )
    assert overridden.outputs == [RequestedOutput("z", False)]


def test_response_echoes_id_and_omits_missing_version() -> None:
    request = decode_single(outputs=[{"name": "z"}], id="r1")
    body, _ = encode_infer_response(SINGLE, request, {"z": np.array([7], dtype=np.int32), "y": np.zeros((1, 2))})
    assert orjson.loads(body) == {
        "model_name": "single",
        "id": "r1",
        "outputs": [{"name": "z", "datatype": "INT32", "shape": [1], "data": [7]}],
    }


def test_binary_response_layout() -> None:
    request = decode_single(parameters={"binary_data_output": True})
    outputs: Columns = {"y": np.array([[1.5, -2.0]], dtype=np.float32), "z": np.array([9], dtype=np.int32)}
    body, headers = encode_infer_response(SINGLE, request, outputs)
    length = int(headers["inference-header-content-length"])
    assert headers["content-type"] == "application/octet-stream"
    header = orjson.loads(body[:length])
    assert [o["parameters"] for o in header["outputs"]] == [{"binary_data_size": 8}, {"binary_data_size": 4}]
    assert "data" not in header["outputs"][0]
    assert body[length:] == struct.pack("<2f", 1.5, -2.0) + struct.pack("<i", 9)


def test_bytes_outputs_in_json_and_binary() -> None:
    request = decode_infer_request(_scorer_body(), SCORER, None)
    outputs: Columns = {
        "score": np.array([0.5], dtype=np.float32),
        "label": np.array(["cat"], dtype=object),
        "raw": np.array([b"\xff\x00"], dtype=object),
    }
    body, _ = encode_infer_response(SCORER, request, outputs)
    label, raw = orjson.loads(body)["outputs"][1:]
    assert label["data"] == ["cat"]
    assert "parameters" not in label
    assert raw["data"] == [base64.b64encode(b"\xff\x00").decode()]
    assert raw["parameters"] == {"content_type": "base64"}
    request.outputs = [RequestedOutput("raw", True), RequestedOutput("label", True)]
    body, headers = encode_infer_response(SCORER, request, {**outputs, "label": np.array([b"dog"], dtype=object)})
    tail = body[int(headers["inference-header-content-length"]) :]
    assert tail == struct.pack("<I", 2) + b"\xff\x00" + struct.pack("<I", 3) + b"dog"


def test_bytes_output_as_utf8_bytes_goes_out_as_text() -> None:
    request = decode_infer_request(_scorer_body(), SCORER, None)
    outputs: Columns = {"label": np.array(["é".encode()], dtype=object)}
    request.outputs = [RequestedOutput("label", False)]
    body, _ = encode_infer_response(SCORER, request, outputs)
    assert orjson.loads(body)["outputs"][0]["data"] == ["é"]


def test_bytes_output_of_other_objects_goes_out_as_their_text() -> None:
    request = decode_infer_request(_scorer_body(), SCORER, None)
    outputs: Columns = {"label": np.array([7], dtype=object)}
    for binary, expected in ((False, b'"data":["7"]'), (True, struct.pack("<I", 1) + b"7")):
        request.outputs = [RequestedOutput("label", binary)]
        body, _ = encode_infer_response(SCORER, request, outputs)
        assert expected in body


def _scorer_body() -> bytes:
    return json_body(
        [
            {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
            {"name": "tokens", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]},
            {"name": "blob", "datatype": "BYTES", "shape": [1], "data": ["z"]},
        ]
    )


# --- binary inputs by hand ---------------------------------------------------------------


def binary_request(entries: list[tuple[dict[str, Any], bytes]]) -> tuple[bytes, int]:
    inputs = [{**entry, "parameters": {"binary_data_size": len(blob)}} for entry, blob in entries]
    header = json_body(inputs)
    return header + b"".join(blob for _, blob in entries), len(header)


def test_binary_bytes_input_keeps_bytes_for_binary_tensors_and_decodes_text() -> None:
    blob = struct.pack("<I", 2) + b"\xff\x01"
    body, length = binary_request(
        [
            ({"name": "blob", "datatype": "BYTES", "shape": [1]}, blob),
            ({"name": "x", "datatype": "FP32", "shape": [1, 3]}, np.arange(3, dtype="<f4").tobytes()),
            ({"name": "tokens", "datatype": "INT64", "shape": [1, 1]}, np.array([5], dtype="<i8").tobytes()),
        ]
    )
    request = decode_infer_request(body, SCORER, length)
    assert request.columns["blob"].tolist() == [b"\xff\x01"]
    np.testing.assert_array_equal(request.columns["x"], [[0, 1, 2]])
    assert request.columns["x"].flags.writeable


def test_binary_and_json_inputs_mix() -> None:
    body, length = binary_request([({"name": "x", "datatype": "FP32", "shape": [1, 2]}, b"\x00" * 8)])
    request = decode_infer_request(body, SINGLE, length)
    np.testing.assert_array_equal(request.columns["x"], np.zeros((1, 2), dtype=np.float32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_infinity_in_binary_floats_is_refused_as_in_json(bad: float) -> None:
    blob = np.array([0.0, bad], dtype="<f4").tobytes()
    body, length = binary_request([({"name": "x", "datatype": "FP32", "shape": [1, 2]}, blob)])
    with pytest.raises(InvalidRequest, match=r"input 'x': value 1 of its binary data is .*; send finite numbers"):
        decode_infer_request(body, SINGLE, length)


# --- errors: body and structure ----------------------------------------------------------


def test_malformed_json_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest, match="not valid JSON") as caught:
        decode_infer_request(b'{"inputs": [', SINGLE, None)
    assert not isinstance(caught.value, SchemaViolation)


@pytest.mark.parametrize("header_length", [-1, 10_000])
def test_header_length_out_of_range(header_length: int) -> None:
    with pytest.raises(InvalidRequest, match="Inference-Header-Content-Length is"):
        decode_infer_request(json_body([x_input()]), SINGLE, header_length)


def test_binary_sizes_must_add_up_to_the_tail() -> None:
    body, length = binary_request([({"name": "x", "datatype": "FP32", "shape": [1, 2]}, b"\x00" * 8)])
    with pytest.raises(InvalidRequest, match="add up to 8 bytes but 9 bytes follow"):
        decode_infer_request(body + b"\x00", SINGLE, length)
    body = json_body([x_input()])
    with pytest.raises(InvalidRequest, match="add up to 0 bytes but 3 bytes follow"):
        decode_infer_request(body + b"abc", SINGLE, len(body))


def test_binary_data_without_the_header_length() -> None:
    body, length = binary_request([({"name": "x", "datatype": "FP32", "shape": [1, 2]}, b"\x00" * 8)])
    with pytest.raises(InvalidRequest, match="no Inference-Header-Content-Length"):
        decode_infer_request(body[:length], SINGLE, None)
    with pytest.raises(InvalidRequest, match=r"not valid JSON.*needs the Inference-Header-Content-Length header"):
        decode_infer_request(body, SINGLE, None)


SCHEMA_VIOLATIONS_AND_PATHS: list[tuple[Any, str]] = [
    ([], ""),
    ({}, "inputs"),
    ({"inputs": {}}, "inputs"),
    ({"inputs": [x_input(), 3]}, "inputs[1]"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "data": []}]}, "inputs[0].shape"),
    ({"inputs": [{"shape": [1, 2], "datatype": "FP32", "data": []}]}, "inputs[0].name"),
    ({"inputs": [{"name": "x", "shape": [1, 2], "data": []}]}, "inputs[0].datatype"),
    ({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32"}]}, "inputs[0].data"),
    ({"inputs": [x_input(name=7)]}, "inputs[0].name"),
    ({"inputs": [x_input(shape=[1, 2.0])]}, "inputs[0].shape"),
    ({"inputs": [x_input(shape="1,2")]}, "inputs[0].shape"),
    ({"inputs": [x_input(data="1 2")]}, "inputs[0].data"),
    ({"inputs": [x_input(parameters=[])]}, "inputs[0].parameters"),
    ({"inputs": [x_input(parameters={"binary_data_size": "8"})]}, "inputs[0].parameters.binary_data_size"),
    ({"inputs": [x_input(parameters={"binary_data_size": -8})]}, "inputs[0].parameters.binary_data_size"),
    ({"inputs": [x_input(parameters={"binary_data_size": 0})]}, "inputs[0].data"),
    ({"inputs": [x_input()], "id": 5}, "id"),
    ({"inputs": [x_input()], "parameters": []}, "parameters"),
    ({"inputs": [x_input()], "parameters": {"binary_data_output": 1}}, "parameters.binary_data_output"),
    ({"inputs": [x_input()], "outputs": {"name": "y"}}, "outputs"),
    ({"inputs": [x_input()], "outputs": ["y"]}, "outputs[0]"),
    ({"inputs": [x_input()], "outputs": [{"name": "y"}, {}]}, "outputs[1].name"),
    ({"inputs": [x_input()], "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}, "outputs[0]"),
]
SCHEMA_VIOLATIONS = [document for document, _ in SCHEMA_VIOLATIONS_AND_PATHS]


@pytest.mark.parametrize(("document", "path"), SCHEMA_VIOLATIONS_AND_PATHS)
def test_schema_violations_name_the_field(document: Any, path: str) -> None:
    with pytest.raises(SchemaViolation) as caught:
        decode_infer_request(orjson.dumps(document), SINGLE, None)
    assert caught.value.path.startswith(path)
    assert caught.value.status_code == 422


# --- errors: inputs against the declaration -----------------------------------------------


def assert_invalid(inputs: list[dict[str, Any]], *fragments: str, spec: ModelSpec = SINGLE, **fields: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_infer_request(json_body(inputs, **fields), spec, None)
    assert caught.value.status_code == 400, caught.value.message
    for fragment in fragments:
        assert fragment in caught.value.message


def test_unknown_input_lists_the_declared_ones() -> None:
    assert_invalid([x_input(), x_input(name="w")], "no input 'w'", "['x']")


def test_missing_input() -> None:
    assert_invalid([x_input(name="tokens", datatype="INT64", data=[1], shape=[1, 1])], "missing input(s)", spec=SCORER)


def test_duplicate_input() -> None:
    assert_invalid([x_input(), x_input()], "'x' is given more than once")


def test_datatype_must_match_the_declaration() -> None:
    assert_invalid([x_input(datatype="FP64")], "'x' is declared FP32", '"datatype": "FP32"', "'FP64'")


@pytest.mark.parametrize("shape", [[2], [1, 3], [1, 2, 1], [0, 2]])
def test_shape_must_be_rows_then_the_row_shape(shape: list[int]) -> None:
    assert_invalid([x_input(shape=shape, data=[])], "input 'x' takes shape [rows, 2]", str(shape))


def test_inputs_must_agree_on_rows() -> None:
    inputs = [
        {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
        {"name": "tokens", "datatype": "INT64", "shape": [2, 1], "data": [1, 2]},
        {"name": "blob", "datatype": "BYTES", "shape": [1], "data": ["a"]},
    ]
    assert_invalid(inputs, "'tokens' has 2 rows but 'x' has 1", spec=SCORER)


def test_element_count_must_match_the_shape() -> None:
    assert_invalid([x_input([1.0, 2.0, 3.0])], "'x'", "holds 2 values", "holds 3")
    assert_invalid([x_input([[1.0], [2.0], [3.0]])], "'x'", "holds 2 values", "holds 3")


@pytest.mark.parametrize(
    ("datatype", "data", "fragment"),
    [
        ("BOOL", [True, 1], "takes true or false; value 1 is 1"),
        ("BOOL", [0, 1], "takes true or false"),
        ("INT32", [1, 2.5], "takes integers; value 1 is 2.5"),
        ("INT32", [1, True], "takes integers; value 1 is true"),
        ("INT8", [1, 128], "out of the INT8 range [-128, 127]"),
        ("UINT8", [-1, 1], "out of the UINT8 range"),
        ("UINT64", [1, orjson.Fragment(b"18446744073709551616")], "takes integers"),  # parsed as a float
        ("INT64", [1, 2**63], "out of the INT64 range"),
        ("FP32", [1.0, "2"], 'takes numbers; value 1 is "2"'),
        ("FP32", [1.0, None], "value 1 is null"),
        ("FP64", [False, 1.0], "takes numbers"),
        ("FP16", [1.0, 1e6], "out of the FP16 range"),
        ("BYTES", ["a", 1], "takes strings"),
        ("BYTES", [["a"], "b"], "mixes lists and values"),
        ("INT32", [[1, [2]]], "mixes lists and values"),
    ],
)
def test_values_must_match_the_datatype(datatype: str, data: list[Any], fragment: str) -> None:
    name = f"in_{datatype.lower()}"
    columns = {f"in_{d.lower()}": SAMPLES[d] for d in Datatype}
    inputs = [{"name": n, "datatype": n[3:].upper(), "shape": [1, 2], "data": v} for n, v in columns.items()]
    inputs = [entry if entry["name"] != name else {**entry, "data": data} for entry in inputs]
    with pytest.raises(SchemaViolation) as caught:
        decode_infer_request(json_body(inputs), ECHO, None)
    assert caught.value.path == f"inputs[{list(columns).index(name)}].data"
    assert fragment in caught.value.message
    assert repr(name) in caught.value.message


def test_unknown_and_duplicate_outputs() -> None:
    assert_invalid([x_input()], "no output 'w'", "['y', 'z']", outputs=[{"name": "w"}])
    assert_invalid([x_input()], "ask for each output once", outputs=[{"name": "y"}, {"name": "y"}])
    assert_invalid([x_input()], "classification", outputs=[{"name": "y", "parameters": {"classification": 2}}])


def test_shared_memory_input_is_refused() -> None:
    inputs = [x_input(parameters={"shared_memory_region": "r", "shared_memory_byte_size": 8})]
    assert_invalid(inputs, "inputs[0]", "shared-memory")


# --- errors: binary data ------------------------------------------------------------------


def assert_binary_invalid(entry: dict[str, Any], blob: bytes, *fragments: str, spec: ModelSpec = SINGLE) -> None:
    body, length = binary_request([(entry, blob)])
    with pytest.raises(InvalidRequest) as caught:
        decode_infer_request(body, spec, length)
    for fragment in fragments:
        assert fragment in caught.value.message


def test_binary_size_must_match_shape_and_itemsize() -> None:
    entry = {"name": "x", "datatype": "FP32", "shape": [1, 2]}
    assert_binary_invalid(entry, b"\x00" * 7, "'x'", "takes 8 bytes", "binary_data_size 7")


def test_binary_bool_must_hold_zero_or_one() -> None:
    entry = {"name": "in_bool", "datatype": "BOOL", "shape": [1, 2]}
    body, length = binary_request([(entry, b"\x01\x02")])
    with pytest.raises(InvalidRequest, match="'in_bool' is BOOL"):
        decode_infer_request(body, one_input_spec("in_bool", Tensor("BOOL", shape=(2,))), length)


def test_binary_bool_decodes() -> None:
    body, length = binary_request([({"name": "in_bool", "datatype": "BOOL", "shape": [1, 2]}, b"\x01\x00")])
    column = decode_infer_request(body, one_input_spec("in_bool", Tensor("BOOL", shape=(2,))), length).columns[
        "in_bool"
    ]
    assert column.dtype == np.bool_
    assert column.tolist() == [[True, False]]


@pytest.mark.parametrize(
    ("blob", "fragment"),
    [
        (b"\x05\x00\x00\x00abc", "ends inside value 0"),
        (struct.pack("<I", 1) + b"a" + b"\x01\x00", "ends inside value 1"),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b", "holds 1 values, but its data holds 2"),
    ],
)
def test_binary_bytes_must_be_well_formed(blob: bytes, fragment: str) -> None:
    entries = [
        ({"name": "blob", "datatype": "BYTES", "shape": [1]}, blob),
        ({"name": "x", "datatype": "FP32", "shape": [1, 3]}, b"\x00" * 12),
        ({"name": "tokens", "datatype": "INT64", "shape": [1, 0]}, b""),
    ]
    body, length = binary_request(entries)
    with pytest.raises(InvalidRequest, match="'blob'") as caught:
        decode_infer_request(body, SCORER, length)
    assert fragment in caught.value.message


def test_binary_text_must_be_utf8() -> None:
    entry = {"name": "in_bytes", "datatype": "BYTES", "shape": [1]}
    spec = one_input_spec("in_bytes", Tensor("BYTES"))
    body, length = binary_request([(entry, struct.pack("<I", 1) + b"\xff")])
    with pytest.raises(InvalidRequest, match="'in_bytes' takes text, but value 0 is not valid UTF-8"):
        decode_infer_request(body, spec, length)


# --- the fast path takes exactly what the exact path takes --------------------------------------

# 600 values: a body longer than may_hold_booleans' threshold, whose values are packed without a
# look at their types when the text holds no true or false.
PADDING = [0.25] * 600


def exact_request(body: bytes, spec: ModelSpec, header_length: int | None) -> InferRequest:
    header, tail = v2._split_body(body, header_length)
    return v2._exact_request(v2._parse_json(header, header_length), spec, tail, header_length)


def fast_request(body: bytes, spec: ModelSpec, header_length: int | None) -> InferRequest | None:
    """What the fast path makes of ``body``: None if it leaves it to the exact path (or raises first)."""
    try:
        header, tail = v2._split_body(body, header_length)
        document = v2._parse_json(header, header_length)
        return v2._fast_request(document, spec, tail, may_hold_booleans(header))
    except InvalidRequest:
        return None


def triton_body(spec: ModelSpec, columns: dict[str, npt.NDArray[Any]], binary: bool) -> tuple[bytes, int | None]:
    inputs = [
        InferInput(name, list(array.shape), str(spec.inputs[name].dtype)).set_data_from_numpy(array, binary)
        for name, array in columns.items()
    ]
    body, json_size = _get_inference_request(inputs, "", None, 0, False, False, 0, None, None)
    return body, json_size


def valid_requests() -> list[tuple[ModelSpec, bytes, int | None]]:
    every = [{"name": f"in_{d.lower()}", "datatype": str(d), "shape": [1, 2], "data": SAMPLES[d]} for d in Datatype]
    nested = [{**entry, "data": [entry["data"]]} for entry in every]
    with_bytes = {**echo_columns(rows=2), "in_bytes": np.array([["héllo".encode(), b""]] * 2, dtype=object)}
    scorer_binary = binary_request(
        [
            ({"name": "blob", "datatype": "BYTES", "shape": [1]}, struct.pack("<I", 2) + b"\xff\x01"),
            ({"name": "x", "datatype": "FP32", "shape": [1, 3]}, np.arange(3, dtype="<f4").tobytes()),
            ({"name": "tokens", "datatype": "INT64", "shape": [1, 0]}, b""),
        ]
    )
    return [
        (SINGLE, json_body([x_input()]), None),
        (SINGLE, json_body([x_input(PADDING, shape=[300, 2])]), None),
        (
            SINGLE,
            json_body([x_input([1] * 600, shape=[300, 2])], id="a", parameters={"binary_data_output": True}),
            None,
        ),
        (SINGLE, json_body([x_input(PADDING, shape=[300, 2])], outputs=[{"name": "z"}, {"name": "y"}]), None),
        (SINGLE, json_body([x_input([[1.0, 2], [3, 4.5]], shape=[2, 2])], outputs=[]), None),
        (ECHO, json_body(every), None),
        (ECHO, json_body(nested, parameters={"binary_data_output": False}), None),
        (ECHO, *triton_body(ECHO, with_bytes, binary=True)),
        (ECHO, *triton_body(ECHO, echo_columns(rows=3), binary=False)),
        (SCORER, _scorer_body(), None),
        (SCORER, *scorer_binary),
    ]


@pytest.mark.parametrize(("spec", "body", "header_length"), valid_requests())
def test_valid_requests_take_the_fast_path(
    monkeypatch: pytest.MonkeyPatch, spec: ModelSpec, body: bytes, header_length: int | None
) -> None:
    expected = exact_request(body, spec, header_length)

    def refuse(*args: Any) -> None:
        raise AssertionError("the exact path read a valid request")

    monkeypatch.setattr(v2, "_exact_request", refuse)
    request = decode_infer_request(body, spec, header_length)
    assert (request.id, request.rows, request.parameters) == (expected.id, expected.rows, expected.parameters)
    assert request.outputs == expected.outputs
    assert list(request.columns) == list(expected.columns)
    for name, column in request.columns.items():
        assert column.dtype == expected.columns[name].dtype
        assert column.shape == expected.columns[name].shape
        assert column.flags.writeable
        if column.dtype == object:
            assert column.tolist() == expected.columns[name].tolist()
        else:
            assert column.tobytes() == expected.columns[name].tobytes()


def bad_requests() -> list[tuple[ModelSpec, bytes, int | None]]:
    """Requests refused (see the tests above), or with a bad value at the end of a long body."""
    bad_values: list[Any] = [True, False, None, "1", [1.0], {"a": 1}, 1e39]
    long_values = [json_body([x_input([*PADDING, 0.5, value], shape=[301, 2])]) for value in bad_values]
    long_values.append(json_body([x_input([*PADDING, 0.5, False], shape=[301, 2])], parameters={"a": "true"}))
    long_values.append(json_body([x_input([[*PADDING[:-1], 1.0], [2.0, [3.0]]], shape=[301, 2])]))
    shapes = [x_input(shape=shape) for shape in ([True, 2], [1, 2.0], [1, -2], [0, 2], [1], [1, 2, 1])]
    scorer = [
        {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
        {"name": "tokens", "datatype": "INT64", "shape": [1, -1], "data": []},
        {"name": "blob", "datatype": "BYTES", "shape": [1], "data": ["a"]},
    ]
    requests: list[tuple[ModelSpec, bytes, int | None]] = [
        *((SINGLE, orjson.dumps(document), None) for document in SCHEMA_VIOLATIONS),
        *((SINGLE, body, None) for body in long_values),
        *((SINGLE, json_body([entry]), None) for entry in shapes),
        (SINGLE, json_body([x_input(name="w")]), None),
        (SINGLE, json_body([x_input(datatype="FP64")]), None),
        (SINGLE, json_body([x_input([1.0, 2.0, 3.0])]), None),
        (SINGLE, json_body([x_input()], outputs=[{"name": "w"}]), None),
        (SINGLE, json_body([x_input()], outputs=[{"name": "y"}, {"name": "y"}]), None),
        (SCORER, json_body(scorer), None),
        (SCORER, json_body([scorer[0], scorer[0], scorer[2]]), None),
        (SCORER, json_body([scorer[0], {**scorer[1], "shape": [2, 0]}, scorer[2]]), None),
        (SCORER, json_body([scorer[0], {**scorer[1], "shape": [1, 0]}, {**scorer[2], "data": [1]}]), None),
    ]
    any_shape = one_input_spec("v", Tensor("INT64", shape=(-1, -1)))
    entry = {"name": "v", "datatype": "INT64", "shape": [1, -1, -1], "data": [5]}  # holds "1" value
    requests.append((any_shape, json_body([entry]), None))
    body, length = binary_request([({**x_input(), "data": [1.0, 2.0]}, b"\x00" * 8)])
    requests.append((SINGLE, body, length))  # data both in JSON and binary
    for size in (7, 9):  # binary data too short, too long
        body, length = binary_request([({"name": "x", "datatype": "FP32", "shape": [1, 2]}, b"\x00" * size)])
        requests.append((SINGLE, body, length))
    body, length = binary_request([({"name": "x", "datatype": "FP32", "shape": [1, 2]}, b"\x00" * 8)])
    requests += [(SINGLE, body + b"\x00", length), (SINGLE, body[:length], None)]
    return requests


@pytest.mark.parametrize(("spec", "body", "header_length"), bad_requests())
def test_the_fast_path_leaves_every_bad_request_to_the_exact_path(
    spec: ModelSpec, body: bytes, header_length: int | None
) -> None:
    assert fast_request(body, spec, header_length) is None
    with pytest.raises(InvalidRequest) as caught:
        exact_request(body, spec, header_length)
    with pytest.raises(InvalidRequest) as again:
        decode_infer_request(body, spec, header_length)
    assert type(again.value) is type(caught.value)
    assert again.value.message == caught.value.message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (True, "takes numbers; value 601 is true"),
        (None, "takes numbers; value 601 is null"),
        ("1", 'takes numbers; value 601 is "1"'),
        (1e39, "holds a value out of the FP32 range"),
        ([1.0], "mixes lists and values"),
    ],
)
def test_a_bad_value_at_the_end_of_a_long_body_is_named(value: Any, fragment: str) -> None:
    with pytest.raises(SchemaViolation) as caught:
        decode_single([x_input([*PADDING, 0.5, value], shape=[301, 2])])
    assert caught.value.path == "inputs[0].data"
    assert fragment in caught.value.message


def test_a_hidden_boolean_is_found_when_the_text_says_true_elsewhere() -> None:
    with pytest.raises(SchemaViolation, match="value 601 is false"):
        decode_single([x_input([*PADDING, 0.5, False], shape=[301, 2])], parameters={"binary_data_output": True})


def test_bad_inputs_are_reported_before_bad_outputs() -> None:
    with pytest.raises(SchemaViolation, match="value 1 is null"):
        decode_single([x_input([1.0, None])], outputs=[{"name": "w"}])


def test_each_request_gets_its_own_outputs_and_headers() -> None:
    first = decode_single()
    first.outputs.append(RequestedOutput("z", True))
    assert decode_single().outputs == [RequestedOutput("y", False), RequestedOutput("z", False)]
    outputs: Columns = {"y": np.zeros((1, 2), dtype=np.float32), "z": np.zeros(1, dtype=np.int32)}
    _, headers = encode_infer_response(SINGLE, decode_single(), outputs)
    headers.pop("content-type")
    _, headers = encode_infer_response(SINGLE, decode_single(), outputs)
    assert headers == {"content-type": "application/json"}


def test_binary_outputs_are_little_endian_row_major() -> None:
    request = decode_single(parameters={"binary_data_output": True})
    y = np.arange(4, dtype=">f4").reshape(2, 2).T[:1]  # big-endian and not contiguous
    body, headers = encode_infer_response(SINGLE, request, {"y": y, "z": np.array([3], dtype=np.int32)})
    tail = body[int(headers["inference-header-content-length"]) :]
    assert tail == struct.pack("<2f", 0.0, 2.0) + struct.pack("<i", 3)
