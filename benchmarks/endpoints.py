"""The requests the benchmarks send, each with a check of its answer."""

from __future__ import annotations

from typing import Any

import orjson

from benchmarks import echo
from benchmarks.harness import Endpoint

_EXPECTED = [2.0, 4.0, 6.0, 8.0]


def _number_lists(value: Any) -> list[list[float]]:
    """Every list of numbers in a JSON document, flattened (``[[2, 4]]`` is ``[2, 4]``)."""
    if isinstance(value, dict):
        return [found for item in value.values() for found in _number_lists(item)]
    if isinstance(value, list):
        flat = _flatten(value)
        if flat is not None:
            return [flat]
        return [found for item in value for found in _number_lists(item)]
    return []


def _flatten(value: list[Any]) -> list[float] | None:
    flat: list[float] = []
    for item in value:
        if isinstance(item, list):
            inner = _flatten(item)
            if inner is None:
                return None
            flat += inner
        elif isinstance(item, int | float) and not isinstance(item, bool):
            flat.append(float(item))
        else:
            return None
    return flat


def holds_doubled_x(body: bytes) -> bool:
    """The answer carries ``x * 2`` somewhere; the exact envelope is the server's business."""
    try:
        return _EXPECTED in _number_lists(orjson.loads(body))
    except orjson.JSONDecodeError:
        return False


def is_json(body: bytes) -> bool:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


READY = Endpoint("GET ready", "GET", "/v2/health/ready", None, is_json)
V2_INFER = Endpoint("POST v2 infer", "POST", "/v2/models/echo/infer", orjson.dumps(echo.V2_REQUEST), holds_doubled_x)
V1_PREDICT = Endpoint(
    "POST v1 predict", "POST", "/v1/models/echo/predict", orjson.dumps(echo.V1_REQUEST), holds_doubled_x
)
