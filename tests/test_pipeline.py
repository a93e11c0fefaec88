"""Requests whose model needs features, end to end through the real server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import orjson
import pytest

from asyncserve import Feature, Model, Service, Settings, Tensor
from asyncserve.features import FunctionSource, HttpSource, PostgresSource
from asyncserve.features.source import Key
from tests.conftest import serving, serving_asgi
from tests.features.service import FeatureService, user_row

Array = npt.NDArray[Any]
SETTINGS = Settings(executor_workers=1, loop_lag_interval_s=0.01)


def sleeping_source(name: str, delay_s: float) -> FunctionSource:
    async def lookup(keys: list[Key]) -> dict[Key, dict[str, Any]]:
        await asyncio.sleep(delay_s)
        return {key: {f"{name}_value": float(key)} for key in keys}  # type: ignore[arg-type]

    return FunctionSource(name, lookup)


class ThreeSources(Model):
    name = "three"
    inputs = {"user_id": Tensor("INT64")}
    outputs = {"total": Tensor("FP64")}

    def __init__(self, delay_s: float) -> None:
        self.features = [  # type: ignore[misc]
            Feature(sleeping_source(name, delay_s), key="user_id", fields={f"{name}_value": Tensor("FP64")})
            for name in ("a", "b", "c")
        ]

    def predict(self, user_id: Array, a_value: Array, b_value: Array, c_value: Array) -> Array:
        return a_value + b_value + c_value


class AgeModel(Model):
    """Needs a user's age and country from the feature service; age + 1 is its prediction."""

    name = "age"
    inputs = {"user_id": Tensor("INT64")}
    outputs = {"next_age": Tensor("FP32"), "country": Tensor("BYTES")}

    def __init__(self, source: Any, on_error: str = "fail") -> None:
        defaults = {"age": 40.0, "country": "unknown"} if on_error == "default" else {}
        fields = {"age": Tensor("FP32"), "country": Tensor("BYTES")}
        self.features = [Feature(source, key="user_id", fields=fields, on_error=on_error, defaults=defaults)]  # type: ignore[arg-type,misc]

    def predict(self, user_id: Array, age: Array, country: Array) -> dict[str, Array]:
        return {"next_age": age + 1, "country": country}


@pytest.fixture
async def feature_service() -> AsyncIterator[tuple[FeatureService, str]]:
    service = FeatureService()
    async with serving_asgi(service) as url:
        yield service, url


async def predict(client: httpx.AsyncClient, model: str, user_id: int, **headers: str) -> httpx.Response:
    return await client.post(f"/v1/models/{model}/predict", json={"user_id": user_id}, headers=headers)


async def test_sources_of_a_request_are_fetched_concurrently() -> None:
    async with serving(Service(ThreeSources(delay_s=0.2)), SETTINGS) as running, running.client() as client:
        started = time.perf_counter()
        response = await predict(client, "three", 7)
        elapsed = time.perf_counter() - started
    assert response.json() == {"total": 21.0}
    assert elapsed < 0.4  # three 200 ms sources side by side, not one after the other


async def test_features_from_http_reach_the_model(feature_service: tuple[FeatureService, str]) -> None:
    service, url = feature_service
    source = HttpSource("users", f"{url}/users/{{key}}", batch_url=f"{url}/users:batch")
    async with serving(Service(AgeModel(source)), SETTINGS) as running, running.client() as client:
        responses = await asyncio.gather(*(predict(client, "age", user_id) for user_id in range(100)))
        metrics = (await client.get("/metrics")).text
    for user_id, response in enumerate(responses):
        row = user_row(user_id)
        assert response.json() == {"next_age": row["age"] + 1, "country": row["country"]}
    assert service.batch_calls < 50
    assert 'asyncserve_feature_fetch_seconds_count{source="users"}' in metrics
    assert 'asyncserve_feature_batch_keys_sum{source="users"} 100.0' in metrics


async def test_features_from_postgres_in_a_v2_request(postgres_dsn: str) -> None:
    import asyncpg

    table = f"people_{uuid.uuid4().hex[:10]}"
    connection = await asyncpg.connect(postgres_dsn)
    await connection.execute(f"CREATE TABLE {table} (user_id bigint PRIMARY KEY, age real, country text)")
    await connection.executemany(f"INSERT INTO {table} VALUES ($1, $2, $3)", [(1, 30.0, "fr"), (2, 50.0, "de")])
    source = PostgresSource("people", postgres_dsn, table=table, key_column="user_id")
    try:
        async with serving(Service(AgeModel(source)), SETTINGS) as running, running.client() as client:
            body = {"inputs": [{"name": "user_id", "shape": [2], "datatype": "INT64", "data": [1, 2]}]}
            response = await client.post("/v2/models/age/infer", json=body)
            unknown = await predict(client, "age", 3)
    finally:
        await connection.execute(f"DROP TABLE {table}")
        await connection.close()
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs == {"next_age": [31.0, 51.0], "country": ["fr", "de"]}
    assert unknown.status_code == 400
    assert "no row for user_id=3" in unknown.json()["error"]


async def test_a_failing_source_with_defaults_gives_a_degraded_answer(
    feature_service: tuple[FeatureService, str],
) -> None:
    service, url = feature_service
    service.fail_next = 1000
    source = HttpSource("users", f"{url}/users/{{key}}", retries=0, breaker_failures=1000)
    model = AgeModel(source, on_error="default")
    async with serving(Service(model), SETTINGS) as running, running.client() as client:
        response = await predict(client, "age", 5)
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 200
    assert response.json() == {"next_age": 41.0, "country": "unknown"}
    assert response.headers["x-degraded"] == "users"
    assert 'asyncserve_degraded_responses_total{model="age",source="users"} 1.0' in metrics


async def test_a_failing_source_without_defaults_is_a_502_naming_it(
    feature_service: tuple[FeatureService, str],
) -> None:
    service, url = feature_service
    service.fail_next = 1000
    source = HttpSource("users", f"{url}/users/{{key}}", retries=1, backoff_s=0.001, breaker_failures=4)
    async with serving(Service(AgeModel(source)), SETTINGS) as running, running.client() as client:
        first = await predict(client, "age", 5)
        second = await predict(client, "age", 6)
        ready = await client.get("/v2/health/ready")
    assert first.status_code == 502
    assert first.json()["code"] == "feature_unavailable"
    assert "'users'" in first.json()["error"]
    assert second.status_code == 502
    assert ready.status_code == 503  # its breaker opened, and the model cannot do without it
    assert "users" in ready.json()["error"]


async def test_a_slow_source_is_a_504_naming_it(feature_service: tuple[FeatureService, str]) -> None:
    service, url = feature_service
    service.delay_s = 1.0
    source = HttpSource("users", f"{url}/users/{{key}}", timeout_s=5.0)
    async with serving(Service(AgeModel(source)), SETTINGS) as running, running.client() as client:
        started = time.perf_counter()
        response = await predict(client, "age", 5, **{"X-Request-Timeout": "0.2"})
        elapsed = time.perf_counter() - started
    assert response.status_code == 504
    assert response.json()["code"] == "feature_timeout"
    assert "'users'" in response.json()["error"]
    assert elapsed < 0.6


def test_features_must_be_declared_consistently() -> None:
    from asyncserve import ConfigurationError

    class Wrong(AgeModel):
        def predict(self, user_id: Array, age: Array) -> dict[str, Array]:  # type: ignore[override]
            return {"next_age": age, "country": np.array(["x"])}

    with pytest.raises(ConfigurationError, match="one keyword argument per input and feature field"):
        Service(Wrong(sleeping_source("users", 0)))


async def test_predictions_are_logged_with_hashed_inputs_and_flushed_on_close(tmp_path: Any) -> None:
    import sqlite3

    database = tmp_path / "predictions.db"
    settings = Settings(
        executor_workers=1, prediction_log=f"sqlite:///{database}", prediction_log_inputs="hash",
        prediction_log_spill=str(tmp_path / "spill.jsonl"),
    )  # fmt: skip
    async with serving(Service(ThreeSources(delay_s=0.0)), settings) as running, running.client() as client:
        for user_id in range(20):
            response = await client.post(
                "/v1/models/three/predict", json={"user_id": user_id}, headers={"X-Request-ID": f"req-{user_id}"}
            )
            assert response.status_code == 200
    # The server has stopped: every accepted record must be in the database now.

    def read() -> list[Any]:
        with sqlite3.connect(database) as connection:
            return connection.execute("SELECT request_id, model, record FROM predictions ORDER BY id").fetchall()

    rows = await asyncio.to_thread(read)
    assert [row[0] for row in rows] == [f"req-{i}" for i in range(20)]
    record = orjson.loads(rows[3][2])
    assert record["model"] == "three"
    assert set(record["inputs"]) == {"sha256"}
    assert record["outputs"] == {"total": [9.0]}
    assert record["features"]["a_value"] == [3.0]
    assert set(record["latency_ms"]) == {"features", "model"}
