"""A streaming model that declares features: they are looked up before its first part, and a stream
that completes is written to the prediction log whole, through a real server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pytest

from asyncserve import Model, Service, Tensor
from asyncserve.config import Settings
from asyncserve.features import Feature, FeatureSource, FileSource, PostgresSource
from tests.conftest import serving
from tests.processes import eventually

AGES = {1: 30.0, 2: 62.0}
SourceFactory = Callable[[], FeatureSource]


@pytest.fixture
def ages_csv(tmp_path: Path) -> SourceFactory:
    path = tmp_path / "ages.csv"
    path.write_text("customer_id,age\n" + "".join(f"{k},{age}\n" for k, age in AGES.items()))
    return lambda: FileSource("ages", path, key_column="customer_id")


@pytest.fixture
async def ages_table(postgres_dsn: str) -> AsyncIterator[SourceFactory]:
    import asyncpg

    table = f"ages_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(postgres_dsn)
    await connection.execute(f"CREATE TABLE {table} (customer_id bigint PRIMARY KEY, age float8)")
    await connection.copy_records_to_table(table, records=list(AGES.items()))
    try:
        yield lambda: PostgresSource("ages", postgres_dsn, table=table, key_column="customer_id")
    finally:
        await connection.execute(f"DROP TABLE {table}")
        await connection.close()


@pytest.fixture(params=["csv", "postgres"])
def ages(request: pytest.FixtureRequest) -> SourceFactory:
    factory: SourceFactory = request.getfixturevalue("ages_csv" if request.param == "csv" else "ages_table")
    return factory


def birthdays(source: FeatureSource) -> Model:
    class Birthdays(Model):
        """Counts the next three birthdays of a customer whose age is looked up."""

        name = "birthdays"
        inputs: ClassVar = {"customer_id": Tensor("INT64")}
        outputs: ClassVar = {"age": Tensor("FP32")}
        features: ClassVar = [Feature(source, key="customer_id", fields={"age": Tensor("FP32")})]
        max_batch_size = 1

        def predict(self, customer_id: npt.NDArray[np.int64], age: npt.NDArray[np.float32]) -> Iterator[Any]:
            for year in (1, 2, 3):
                yield {"age": age + year}

    return Birthdays()


async def test_a_streaming_model_gets_its_features_and_its_completed_stream_is_logged(
    ages: SourceFactory, tmp_path: Path
) -> None:
    log = tmp_path / "predictions.jsonl"
    settings = Settings(executor_workers=1, jobs="", prediction_log=f"jsonl://{log}", loop_lag_interval_s=0.01)
    async with serving(Service(birthdays(ages())), settings) as running, running.client() as client:
        events = await client.post(
            "/v1/models/birthdays/predict", json={"customer_id": 2}, headers={"Accept": "text/event-stream"}
        )
        whole = await client.post("/v1/models/birthdays/predict", json={"customer_id": 1})
        unknown = await client.post("/v1/models/birthdays/predict", json={"customer_id": 99})

        async def both_logged() -> bool:
            return await asyncio.to_thread(lambda: log.exists() and len(log.read_text().splitlines()) == 2)

        await eventually(both_logged, "the two completed streams in the prediction log")
    assert [line for line in events.text.split("\n\n") if line.startswith("data: {\"age\"")] == [
        'data: {"age":63.0}', 'data: {"age":64.0}', 'data: {"age":65.0}',
    ]  # fmt: skip
    assert whole.json() == [{"age": 31.0}, {"age": 32.0}, {"age": 33.0}]
    assert unknown.status_code == 400
    assert "no row for customer_id=99" in unknown.json()["error"]
    records = [json.loads(line) for line in (await asyncio.to_thread(log.read_text)).splitlines()]
    first = next(r for r in records if r["inputs"]["customer_id"] == [2])
    assert first["model"] == "birthdays"
    assert first["features"] == {"age": [62.0]}
    assert first["outputs"] == {"age": [[63.0, 64.0, 65.0]]}  # the row's parts, in order
    assert set(first["latency_ms"]) == {"features", "model"}
