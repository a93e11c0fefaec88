"""Tensor declarations take V2 names, NumPy names and NumPy types, and the API always shows the V2 names."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from asyncserve import ConfigurationError, Datatype, Model, Service, Tensor
from tests.conftest import serving

NUMPY_FORMS: list[tuple[Any, Datatype]] = [
    *[(name, Datatype(v2)) for name, v2 in [
        ("bool", "BOOL"), ("uint8", "UINT8"), ("uint16", "UINT16"), ("uint32", "UINT32"), ("uint64", "UINT64"),
        ("int8", "INT8"), ("int16", "INT16"), ("int32", "INT32"), ("int64", "INT64"),
        ("float16", "FP16"), ("float32", "FP32"), ("float64", "FP64"),
        ("bytes", "BYTES"), ("str", "BYTES"), ("object", "BYTES"),
    ]],
    (np.bool_, Datatype.BOOL), (np.uint8, Datatype.UINT8), (np.uint64, Datatype.UINT64), (np.int8, Datatype.INT8),
    (np.int32, Datatype.INT32), (np.int64, Datatype.INT64), (np.float16, Datatype.FP16),
    (np.float32, Datatype.FP32), (np.float64, Datatype.FP64), (np.str_, Datatype.BYTES), (np.bytes_, Datatype.BYTES),
    (np.dtype("float32"), Datatype.FP32), (bool, Datatype.BOOL), (str, Datatype.BYTES), (bytes, Datatype.BYTES),
    (object, Datatype.BYTES), ("FP32", Datatype.FP32), ("fp32", Datatype.FP32), (Datatype.INT8, Datatype.INT8),
]  # fmt: skip


@pytest.mark.parametrize(("given", "datatype"), NUMPY_FORMS, ids=lambda value: repr(value))
def test_numpy_names_and_types_become_v2_datatypes(given: Any, datatype: Datatype) -> None:
    assert Tensor(given).datatype is datatype


@pytest.mark.parametrize("unknown", ["float128", "complex64", "f4", "FP8", np.complex64, np.datetime64, dict, None])
def test_an_unknown_datatype_names_what_is_accepted(unknown: Any) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Tensor(unknown)
    message = raised.value.message
    assert message.startswith(f"unknown tensor datatype {unknown!r}; use a V2 name (BOOL, UINT8,")
    assert "FP32" in message
    assert "a NumPy name (bool, uint8, uint16, uint32, uint64, int8, int16, int32, int64, float16, float32" in message
    assert "or a NumPy type such as np.float32" in message


class NumpyDeclared(Model):
    """Declared with NumPy names and types only."""

    name = "numpy_declared"
    inputs = {"x": Tensor("float32", shape=(2,)), "n": Tensor(np.int64)}
    outputs = {"y": Tensor(np.float32, shape=(2,)), "label": Tensor(str)}

    def predict(self, x: npt.NDArray[Any], n: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
        return {"y": x * n[:, None], "label": np.array([f"times {v}" for v in n], dtype=object)}


async def test_a_model_declared_with_numpy_dtypes_shows_v2_names_and_serves() -> None:
    async with serving(Service(NumpyDeclared())) as running, running.client() as client:
        metadata = (await client.get("/v2/models/numpy_declared")).json()
        answer = await client.post("/v1/models/numpy_declared/predict", json={"x": [1.5, 2.0], "n": 3})
    assert metadata["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "n", "datatype": "INT64", "shape": [-1]},
    ]
    assert metadata["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
    ]
    assert answer.json() == {"y": [4.5, 6.0], "label": "times 3"}
