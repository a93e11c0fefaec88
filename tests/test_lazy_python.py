"""``service.lazy(...)``: a deferred prediction in Python, through a real server.

The model ``gate`` answers cheaply and asks the ``expensive`` model for a second opinion only for
rows flagged ``deep``: it makes the lazy handle up front and awaits it only when needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import orjson
import pytest

from asyncserve import AsyncServeError, ConfigurationError, LazyPrediction, Model, Service, Tensor
from asyncserve.config import Settings
from tests.conftest import RunningServer, serving

Array = npt.NDArray[Any]


class Expensive(Model):
    name = "expensive"
    inputs: ClassVar[dict[str, Tensor]] = {"x": Tensor("FP32")}
    outputs: ClassVar[dict[str, Tensor]] = {"y": Tensor("FP32")}
    rows_computed = 0

    def predict(self, x: Array) -> Array:
        type(self).rows_computed += len(x)
        result: Array = x * np.float32(10)
        return result


class Gate(Model):
    name = "gate"
    inputs: ClassVar[dict[str, Tensor]] = {"x": Tensor("FP32"), "deep": Tensor("BOOL")}
    outputs: ClassVar[dict[str, Tensor]] = {"y": Tensor("FP32"), "handle": Tensor("BYTES")}
    handles: ClassVar[list[LazyPrediction]] = []

    async def predict(self, x: Array, deep: Array) -> dict[str, Array]:
        second_opinion = SERVICE.lazy("expensive", [{"x": float(value)} for value in x])
        self.handles.append(second_opinion)
        y = x
        if deep.any():
            first, again = await asyncio.gather(second_opinion, second_opinion)
            assert first is again, "every await shares one computation"
            y = np.where(deep, (await second_opinion)["y"], x)
        return {"y": y, "handle": np.array([second_opinion.id] * len(x), dtype=object)}


class Asker(Model):
    """Makes a lazy handle for each row's model and ``x`` (JSON text), and says how that went."""

    name = "asker"
    inputs: ClassVar[dict[str, Tensor]] = {"model": Tensor("BYTES"), "x": Tensor("BYTES")}
    outputs: ClassVar[dict[str, Tensor]] = {"error": Tensor("BYTES")}

    async def predict(self, model: Array, x: Array) -> Array:
        errors = []
        for name, value in zip(model, x, strict=True):
            try:
                _ = SERVICE.lazy(str(name), {"x": orjson.loads(value)})
            except AsyncServeError as exc:
                errors.append(exc.code)
            else:
                errors.append("")
        return np.array(errors, dtype=object)


SERVICE = Service(Gate(), Expensive(), Asker(), name="lazy-python")


@pytest.fixture
async def running() -> AsyncIterator[RunningServer]:
    async with serving(SERVICE, Settings(executor_workers=1, jobs="")) as server:
        yield server


async def test_the_model_runs_only_when_the_handle_is_awaited_and_once(running: RunningServer) -> None:
    before = Expensive.rows_computed
    async with running.client() as client:
        shallow = await client.post("/v1/models/gate/predict", json={"x": 2.0, "deep": False})
        assert shallow.status_code == 200, shallow.text
        assert shallow.json()["y"] == 2.0
        assert Expensive.rows_computed == before, "never awaited: never computed"
        deep = await client.post("/v1/models/gate/predict", json=[{"x": 2.0, "deep": True}, {"x": 3.0, "deep": False}])
        assert deep.status_code == 200, deep.text
        assert [row["y"] for row in deep.json()] == [20.0, 3.0]
        assert Expensive.rows_computed == before + 2, "awaited three times, computed once (both rows)"
        # The handle made in Python is the same as an HTTP one: readable there, without computing again.
        over_http = await client.get(f"/v1/predictions/{deep.json()[0]['handle']}")
        assert over_http.status_code == 200, over_http.text
        assert over_http.json() == [{"y": 20.0}, {"y": 30.0}]
        assert Expensive.rows_computed == before + 2
        metrics = (await client.get("/metrics")).text
    assert "asyncserve_deferred_resolved_total 1.0" in metrics


async def test_a_bad_request_fails_at_once_and_outside_a_server_lazy_says_why(running: RunningServer) -> None:
    asks = [{"model": "nope", "x": "1.0"}, {"model": "expensive", "x": '"many"'}, {"model": "expensive", "x": "1.5"}]
    async with running.client() as client:
        answered = await client.post("/v1/models/asker/predict", json=asks)
    assert answered.status_code == 200, answered.text
    assert [row["error"] for row in answered.json()] == ["model_not_found", "schema_violation", ""]
    unserved = Service(Expensive(), name="unserved")
    with pytest.raises(ConfigurationError, match="not being served by this process"):
        _ = unserved.lazy("expensive", {"x": 1.0})
