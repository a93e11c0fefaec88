"""A standard Open Inference Protocol client, with its default settings, works unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from asyncserve import Service
from tests.conftest import RunningServer
from tests.models import DATATYPE_SAMPLES, AdderV1, AllTypes

SERVICE = Service(AdderV1(), AllTypes(), name="triton-compat")


@pytest.fixture
def triton_client(running: RunningServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(running.url.removeprefix("http://"))


def test_health_and_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("adder")
    assert triton_client.get_server_metadata()["name"] == "triton-compat"
    inputs = triton_client.get_model_metadata("adder")["inputs"]
    assert {"name": "a", "datatype": "FP32", "shape": [-1, 3]} in inputs
    index = triton_client.get_model_repository_index()
    assert {row["name"] for row in index} == {"adder", "all_types"}


def test_binary_inputs_and_outputs_by_default(triton_client: triton.InferenceServerClient) -> None:
    a = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    b = np.ones((2, 3), dtype=np.float32)
    inputs = [triton.InferInput("a", [2, 3], "FP32"), triton.InferInput("b", [2, 3], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = triton_client.infer("adder", inputs, request_id="r-1")
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
    np.testing.assert_array_equal(result.as_numpy("total"), [9.0, 18.0])
    assert result.get_response()["id"] == "r-1"


def test_every_datatype_through_the_client(triton_client: triton.InferenceServerClient) -> None:
    inputs, expected = [], {}
    for datatype, values in DATATYPE_SAMPLES.items():
        if datatype == "BYTES":
            array = np.array([v.encode() for v in values], dtype=object)
        else:
            array = np.array(values, dtype=triton_to_np_dtype(datatype))
        tensor = triton.InferInput(f"in_{datatype.lower()}", [2], datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
        expected[f"out_{datatype.lower()}"] = array
    outputs = [triton.InferRequestedOutput(name) for name in ("out_fp16", "out_bytes", "out_uint64")]
    result = triton_client.infer("all_types", inputs, outputs=outputs)
    for name in ("out_fp16", "out_bytes", "out_uint64"):
        np.testing.assert_array_equal(result.as_numpy(name), expected[name])
    assert result.as_numpy("out_bool") is None  # not requested


def test_json_tensors_when_asked(triton_client: triton.InferenceServerClient) -> None:
    a = np.array([[1, 2, 3]], dtype=np.float32)
    inputs = [triton.InferInput("a", [1, 3], "FP32"), triton.InferInput("b", [1, 3], "FP32")]
    inputs[0].set_data_from_numpy(a, binary_data=False)
    inputs[1].set_data_from_numpy(a, binary_data=False)
    outputs = [triton.InferRequestedOutput("sum", binary_data=False)]
    result = triton_client.infer("adder", inputs, outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("sum"), a * 2)


def test_errors_reach_the_client_as_messages(triton_client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("a", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="'b'"):
        triton_client.infer("adder", [tensor])
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        triton_client.infer("nope", [tensor])
