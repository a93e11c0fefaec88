"""A standard V2 gRPC client, tritonclient.grpc with its default settings, against a real server."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from tests.grpc.conftest import Served
from tests.models import DATATYPE_SAMPLES

TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP16": "fp32_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}  # fmt: skip


@pytest.fixture
def client(served: Served) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(served.grpc_url) as client:
        yield client


@pytest.fixture
def stub(served: Served) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    """The protocol's raw stub, for what tritonclient never sends (typed contents, bad requests)."""
    with grpc.insecure_channel(served.grpc_url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def adder_inputs(a: Any, b: Any) -> list[triton.InferInput]:
    inputs = [triton.InferInput("a", list(np.shape(a)), "FP32"), triton.InferInput("b", list(np.shape(b)), "FP32")]
    inputs[0].set_data_from_numpy(np.asarray(a, dtype=np.float32))
    inputs[1].set_data_from_numpy(np.asarray(b, dtype=np.float32))
    return inputs


def fails(call: Any, *args: Any, **kwargs: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


# Health and metadata


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("adder")
    assert client.is_model_ready("adder", "1")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "grpc-tests"
    assert metadata["extensions"] == ["binary_tensor_data", "model_repository"]
    model = client.get_model_metadata("adder", as_json=True)
    assert model["name"] == "adder"
    assert model["versions"] == ["1"]
    assert {"name": "a", "datatype": "FP32", "shape": ["-1", "3"]} in model["inputs"]  # int64 in JSON: strings
    assert {"name": "total", "datatype": "FP64", "shape": ["-1"]} in model["outputs"]


def test_metadata_of_an_unknown_model_is_not_found(client: triton.InferenceServerClient) -> None:
    error = fails(client.get_model_metadata, "nope")
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "unknown model 'nope'; this server has: " in error.message()
    assert fails(client.is_model_ready, "nope").status() == "StatusCode.NOT_FOUND"


# Inference


def test_infer_raw_by_default_with_the_id_echoed(client: triton.InferenceServerClient) -> None:
    a = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    result = client.infer("adder", adder_inputs(a, np.ones((2, 3))), request_id="r-1")
    np.testing.assert_array_equal(result.as_numpy("sum"), a + 1)
    np.testing.assert_array_equal(result.as_numpy("total"), [9.0, 18.0])
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("r-1", "adder", "1")
    assert len(response.raw_output_contents) == 2


def test_outputs_filtering(client: triton.InferenceServerClient) -> None:
    outputs = [triton.InferRequestedOutput("total")]
    result = client.infer("adder", adder_inputs([[1, 2, 3]], [[1, 1, 1]]), outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("total"), [9.0])
    assert result.as_numpy("sum") is None
    assert [output.name for output in result.get_response().outputs] == ["total"]


def samples(datatype: str) -> np.ndarray[Any, Any]:
    if datatype == "BYTES":
        return np.array([v.encode() for v in DATATYPE_SAMPLES[datatype]], dtype=object)
    return np.array(DATATYPE_SAMPLES[datatype], dtype=triton_to_np_dtype(datatype))


def test_every_datatype_raw(client: triton.InferenceServerClient) -> None:
    inputs = []
    for datatype in DATATYPE_SAMPLES:
        tensor = triton.InferInput(f"in_{datatype.lower()}", [2], datatype)
        tensor.set_data_from_numpy(samples(datatype))
        inputs.append(tensor)
    result = client.infer("all_types", inputs)
    for datatype in DATATYPE_SAMPLES:
        got = result.as_numpy(f"out_{datatype.lower()}")
        np.testing.assert_array_equal(got, samples(datatype))
        assert got.dtype == samples(datatype).dtype


def typed_request(values: dict[str, list[Any]]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="all_types", id="typed")
    for datatype, data in values.items():
        tensor = request.inputs.add(name=f"in_{datatype.lower()}", datatype=datatype, shape=[len(data)])
        field = getattr(tensor.contents, TYPED_FIELD[datatype])
        field.extend([v.encode() for v in data] if datatype == "BYTES" else data)
    return request


def test_every_datatype_in_typed_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = typed_request({d: v for d, v in DATATYPE_SAMPLES.items() if d != "FP16"} | {"FP16": [0.5, -2.0]})
    request.outputs.add(name="out_int8")
    request.outputs.add(name="out_bytes")
    request.outputs.add(name="out_uint64")
    request.outputs.add(name="out_bool")
    response = stub.ModelInfer(request)
    assert response.id == "typed"
    assert not response.raw_output_contents  # a typed request is answered typed
    outputs = {output.name: output for output in response.outputs}
    assert list(outputs) == ["out_int8", "out_bytes", "out_uint64", "out_bool"]
    assert list(outputs["out_int8"].contents.int_contents) == [-128, 127]
    assert list(outputs["out_bytes"].contents.bytes_contents) == [b"hello", "wörld".encode()]
    assert list(outputs["out_uint64"].contents.uint64_contents) == [0, 18446744073709551615]
    assert list(outputs["out_bool"].contents.bool_contents) == [True, False]
    assert [list(output.shape) for output in outputs.values()] == [[2]] * 4


def test_an_fp16_output_makes_the_answer_raw(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = typed_request(dict(DATATYPE_SAMPLES))
    request.outputs.add(name="out_fp16")
    request.outputs.add(name="out_fp64")
    response = stub.ModelInfer(request)
    assert np.frombuffer(response.raw_output_contents[0], "<f2").tolist() == [0.5, -2.0]
    assert np.frombuffer(response.raw_output_contents[1], "<f8").tolist() == [0.1, -1e300]


def test_priority_parameter(client: triton.InferenceServerClient) -> None:
    result = client.infer("adder", adder_inputs([[1, 2, 3]], [[0, 0, 0]]), priority=9)
    np.testing.assert_array_equal(result.as_numpy("total"), [6.0])
    error = fails(client.infer, "adder", adder_inputs([[1, 2, 3]], [[0, 0, 0]]), priority=12)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "parameters.priority: a priority is an integer from 0 to 9 (higher first), got 12" in error.message()


# Errors: the REST message, the status of its HTTP status


def test_unknown_model_is_not_found(client: triton.InferenceServerClient) -> None:
    error = fails(client.infer, "nope", adder_inputs([[1, 2, 3]], [[1, 2, 3]]))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert error.message().startswith("unknown model 'nope'; this server has: ")


def test_wrong_shape_datatype_and_inputs_say_what_rest_says(client: triton.InferenceServerClient) -> None:
    error = fails(client.infer, "adder", adder_inputs([[1, 2]], [[1, 2]]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message() == "input 'a' takes shape [rows, 3] with rows >= 1 (-1 matches any length), got [1, 2]"
    wrong = triton.InferInput("a", [1, 3], "FP64")
    wrong.set_data_from_numpy(np.zeros((1, 3)))
    error = fails(client.infer, "adder", [wrong, adder_inputs([[1, 2, 3]], [[1, 2, 3]])[1]])
    assert error.message() == """input 'a' is declared FP32; send "datatype": "FP32", got 'FP64'"""
    error = fails(client.infer, "adder", adder_inputs([[1, 2, 3]], [[1, 2, 3]])[:1])
    assert error.message() == "the request is missing input(s) ['b']; model 'adder:1' takes ['a', 'b']"
    error = fails(
        client.infer, "adder", adder_inputs([[1, 2, 3]], [[1, 2, 3]]), outputs=[triton.InferRequestedOutput("x")]
    )
    assert error.message() == "model 'adder:1' has no output 'x'; its outputs are ['sum', 'total']"


def test_bad_data_is_invalid_argument(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = typed_request(DATATYPE_SAMPLES | {"INT8": [1, 300]})
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'in_int8' holds a value out of the INT8 range [-128, 127]" in caught.value.details()
    short = pb.ModelInferRequest(model_name="adder", raw_input_contents=[b"\0" * 12, b"\0" * 8])
    short.inputs.add(name="a", datatype="FP32", shape=[1, 3])
    short.inputs.add(name="b", datatype="FP32", shape=[1, 3])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(short)
    assert caught.value.details() == (
        "input 'b' of shape [1, 3] and datatype FP32 takes 12 bytes of binary data, "
        "got 8 bytes in raw_input_contents[1]"
    )
    mixed = pb.ModelInferRequest(model_name="adder")
    mixed.inputs.add(name="a", datatype="FP32", shape=[1, 3]).contents.int_contents.extend([1, 2, 3])
    mixed.inputs.add(name="b", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1, 2, 3])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(mixed)
    assert caught.value.details() == (
        "input 'a' is FP32: give its data in contents.fp32_contents (or raw_input_contents), got int_contents"
    )


def test_a_failing_model_is_internal_without_its_secrets(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("fail", [1], "BOOL")
    tensor.set_data_from_numpy(np.array([True]))
    error = fails(client.infer, "faulty", [tensor])
    assert error.status() == "StatusCode.INTERNAL"
    assert "/etc/passwd" not in error.message()
    assert "faulty" in error.message()


def sleep_input(seconds: float) -> list[triton.InferInput]:
    tensor = triton.InferInput("seconds", [1], "FP64")
    tensor.set_data_from_numpy(np.array([seconds], dtype=np.float64))
    return [tensor]


def test_the_grpc_deadline_is_the_requests_deadline(client: triton.InferenceServerClient) -> None:
    error = fails(client.infer, "sleeper", sleep_input(2.0), client_timeout=0.2)
    assert error.status() == "StatusCode.DEADLINE_EXCEEDED"


def test_the_models_timeout_caps_the_deadline(client: triton.InferenceServerClient) -> None:
    error = fails(client.infer, "hasty", sleep_input(2.0), client_timeout=10)
    assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "hasty" in error.message()  # the server's own message, not the client's "Deadline Exceeded"


def test_tritons_timeout_parameter_shortens_the_deadline(
    client: triton.InferenceServerClient, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    error = fails(client.infer, "sleeper", sleep_input(2.0), timeout=200_000)  # microseconds, as Triton reads it
    assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "sleeper" in error.message()  # the server's deadline, not the client's
    request = pb.ModelInferRequest(model_name="sleeper")
    request.inputs.add(name="seconds", datatype="FP64", shape=[1]).contents.fp64_contents.append(0.0)
    request.parameters["timeout"].string_param = "soon"
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "parameters.timeout: the request's timeout is microseconds > 0, got 'soon'"


def test_a_streaming_model_is_refused_by_model_infer(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("n", [1], "INT64")
    tensor.set_data_from_numpy(np.array([3]))
    error = fails(client.infer, "counting", [tensor])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message() == "model 'counting' answers in parts: call ModelStreamInfer"


# Streaming


def test_stream_infer_parts_then_plain_answers_in_order(client: triton.InferenceServerClient) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        count = triton.InferInput("n", [1], "INT64")
        count.set_data_from_numpy(np.array([3]))
        client.async_stream_infer("counting", [count], request_id="s-1")
        client.async_stream_infer("adder", adder_inputs([[1, 2, 3]], [[1, 1, 1]]), request_id="s-2")
        client.async_stream_infer("nope", [count], request_id="s-3")
        client.async_stream_infer("adder", adder_inputs([[0, 0, 0]], [[1, 1, 1]]), request_id="s-4")
        got = [answers.get(timeout=10) for _ in range(6)]
    finally:
        client.stop_stream()
    parts = [(result.get_response().id, result.as_numpy("i").tolist()) for result, _ in got[:3]]
    assert parts == [("s-1", [0]), ("s-1", [1]), ("s-1", [2])]
    assert got[3][0].get_response().id == "s-2"
    np.testing.assert_array_equal(got[3][0].as_numpy("total"), [9.0])
    assert got[4][0] is None
    assert "unknown model 'nope'" in str(got[4][1])  # an error answers its request; the stream goes on
    np.testing.assert_array_equal(got[5][0].as_numpy("total"), [3.0])


# The model repository


def test_repository_index_unload_and_load(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {"name": "adder", "version": "1", "state": "READY"} in index
    client.unload_model("sleeper")
    assert not client.is_model_ready("sleeper")
    error = fails(client.infer, "sleeper", sleep_input(0))
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert error.message().startswith("model 'sleeper' is unavailable")
    ready = client.get_model_repository_index(as_json=True)["models"]
    assert "sleeper" in {row["name"] for row in ready}
    client.load_model("sleeper")
    assert client.is_model_ready("sleeper")
    assert client.infer("sleeper", sleep_input(0)).as_numpy("pid") is not None
    error = fails(client.load_model, "nope")
    assert error.status() == "StatusCode.NOT_FOUND"


# The gRPC health checking protocol (grpc.health.v1), by its wire bytes: HealthCheckRequest{service=1},
# HealthCheckResponse{status=1}, SERVING = 1.


def health_call(served: Served, method: str, service: str) -> bytes:
    request = b"\x0a" + bytes([len(service)]) + service.encode() if service else b""
    with grpc.insecure_channel(served.grpc_url) as channel:
        call = channel.unary_unary(f"/grpc.health.v1.Health/{method}")
        return bytes(call(request, timeout=10))


def test_health_check_says_serving(served: Served) -> None:
    assert health_call(served, "Check", "") == b"\x08\x01"
    assert health_call(served, "Check", "inference.GRPCInferenceService") == b"\x08\x01"


def test_health_of_another_service_is_not_found(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        health_call(served, "Check", "nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown service 'nope'" in caught.value.details()


def test_health_watch_is_unimplemented(served: Served) -> None:
    with grpc.insecure_channel(served.grpc_url) as channel:
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
        with pytest.raises(grpc.RpcError) as caught:
            list(watch(b"", timeout=10))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
