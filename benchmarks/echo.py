"""The work every benchmarked app does: decode a request, double ``x``, encode the answer.

The bare ASGI app and the Starlette app call these functions on bytes decoded with orjson;
the FastAPI app reaches the same ``double`` through its pydantic body model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

V2_REQUEST: dict[str, Any] = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
V1_REQUEST: dict[str, Any] = {"x": [1, 2, 3, 4]}
READY_RESPONSE = b'{"ready":true}'


def double(data: list[float], shape: list[int]) -> list[float]:
    """The trivial model: ``x * 2`` on an FP32 array, as asyncserve's echo model computes it."""
    x = np.asarray(data, dtype=np.float32).reshape(shape)
    result: list[float] = (x * 2).ravel().tolist()
    return result


def infer_v2(body: bytes) -> bytes:
    """Answer an Open Inference Protocol V2 request for the echo model."""
    tensor = orjson.loads(body)["inputs"][0]
    shape = tensor["shape"]
    output = {"name": "y", "shape": shape, "datatype": "FP32", "data": double(tensor["data"], shape)}
    return orjson.dumps({"model_name": "echo", "outputs": [output]})


def predict_v1(body: bytes) -> bytes:
    """Answer a plain JSON request ``{"x": [...]}`` with ``{"y": [...]}``."""
    data = orjson.loads(body)["x"]
    return orjson.dumps({"y": double(data, [len(data)])})
