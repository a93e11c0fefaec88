"""Ensembles whose members need looked-up features, through a real server, with features from a CSV file and
from PostgreSQL.

Two declarations work: each member declares its own ``Feature`` and the ensemble passes the key (the
members stay servable on their own, with the same inputs as the ensemble), or the ensemble declares
the ``Feature`` and its members take the looked-up fields as inputs (one lookup for all members).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from asyncserve import ConfigurationError, Model, Service, Tensor
from asyncserve.composition.ensemble import Ensemble
from asyncserve.features import Feature, FileSource, PostgresSource
from asyncserve.features.source import FeatureSource
from tests.conftest import serving

CUSTOMERS = {1: (30.0, 2.0), 2: (60.0, 8.0), 3: (45.0, 5.0)}
"""customer_id -> (age, tenure in years)."""

KEY = {"customer_id": Tensor("INT64")}
AGE = {"age": Tensor("FP32")}
TENURE = {"tenure": Tensor("FP32")}
SCORE = {"score": Tensor("FP64")}

SourceFactory = Callable[[str], FeatureSource]


def expected_score(customer_id: int) -> float:
    age, tenure = CUSTOMERS[customer_id]
    return (age / 100 + tenure / 10) / 2  # the mean of the two members


@pytest.fixture
def customers_csv(tmp_path: Path) -> SourceFactory:
    path = tmp_path / "customers.csv"
    lines = ["customer_id,age,tenure", *(f"{k},{age},{tenure}" for k, (age, tenure) in CUSTOMERS.items())]
    path.write_text("\n".join(lines) + "\n")
    return lambda name: FileSource(name, path, key_column="customer_id")


@pytest.fixture
async def customers_table(postgres_dsn: str) -> AsyncIterator[SourceFactory]:
    import asyncpg

    table = f"customers_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(postgres_dsn)
    await connection.execute(f"CREATE TABLE {table} (customer_id bigint PRIMARY KEY, age float8, tenure float8)")
    rows = [(k, age, tenure) for k, (age, tenure) in CUSTOMERS.items()]
    await connection.copy_records_to_table(table, records=rows)
    try:
        yield lambda name: PostgresSource(name, postgres_dsn, table=table, key_column="customer_id")
    finally:
        await connection.execute(f"DROP TABLE {table}")
        await connection.close()


@pytest.fixture(params=["csv", "postgres"])
def customers(request: pytest.FixtureRequest) -> SourceFactory:
    factory: SourceFactory = request.getfixturevalue("customers_csv" if request.param == "csv" else "customers_table")
    return factory


# Declaration 1: each member looks up its own features; the ensemble passes the key.


def members_with_features(source: FeatureSource) -> list[Model]:
    class AgeScore(Model):
        name = "age-score"
        inputs: ClassVar = KEY
        outputs: ClassVar = SCORE
        features: ClassVar = [Feature(source, key="customer_id", fields=AGE)]

        def predict(self, customer_id: Any, age: Any) -> Any:
            return age.astype(np.float64) / 100

    class TenureScore(Model):
        name = "tenure-score"
        inputs: ClassVar = KEY
        outputs: ClassVar = SCORE
        features: ClassVar = [Feature(source, key="customer_id", fields=TENURE)]

        def predict(self, customer_id: Any, tenure: Any) -> Any:
            return tenure.astype(np.float64) / 10

    return [AgeScore(), TenureScore()]


class Risk(Ensemble):
    name = "risk"
    inputs: ClassVar = KEY
    outputs: ClassVar = SCORE
    members = ["age-score", "tenure-score"]
    aggregate = "mean"


async def test_members_look_up_their_own_features_by_the_ensembles_key(customers: SourceFactory) -> None:
    service = Service(*members_with_features(customers("customers")), Risk(), name="risk")
    async with serving(service) as running, running.client() as client:
        one = await client.post("/v1/models/risk/predict", json={"customer_id": 2})
        many = await client.post("/v1/models/risk/predict", json=[{"customer_id": k} for k in CUSTOMERS])
        alone = await client.post("/v1/models/age-score/predict", json={"customer_id": 2})
    assert one.status_code == 200, one.text
    assert one.json()["score"] == pytest.approx(expected_score(2))
    assert one.json()["members_used"] == "age-score,tenure-score"
    assert [row["score"] for row in many.json()] == pytest.approx([expected_score(k) for k in CUSTOMERS])
    assert alone.json()["score"] == pytest.approx(0.6)  # a member still serves on its own, with the same input


async def test_a_key_a_members_source_lacks_is_a_400_naming_it(customers: SourceFactory) -> None:
    service = Service(*members_with_features(customers("customers")), Risk(), name="risk")
    async with serving(service) as running, running.client() as client:
        answer = await client.post("/v1/models/risk/predict", json={"customer_id": 99})
    assert answer.status_code == 400, answer.text
    assert "99" in answer.json()["error"]
    assert "customers" in answer.json()["error"]


# Declaration 2: the ensemble looks the features up once; its members take the fields as inputs.


class AgeModel(Model):
    name = "age-model"
    inputs: ClassVar = AGE
    outputs: ClassVar = SCORE

    def predict(self, age: Any) -> Any:
        return age.astype(np.float64) / 100


class TenureModel(Model):
    name = "tenure-model"
    inputs: ClassVar = TENURE
    outputs: ClassVar = SCORE

    def predict(self, tenure: Any) -> Any:
        return tenure.astype(np.float64) / 10


def ensemble_with_features(source: FeatureSource) -> Ensemble:
    class RiskFromFields(Ensemble):
        name = "risk-fields"
        inputs: ClassVar = KEY
        outputs: ClassVar = SCORE
        features: ClassVar = [Feature(source, key="customer_id", fields={**AGE, **TENURE})]
        members = ["age-model", "tenure-model"]
        aggregate = "mean"

    return RiskFromFields()


async def test_members_receive_the_fields_the_ensemble_looks_up(customers: SourceFactory) -> None:
    service = Service(AgeModel(), TenureModel(), ensemble_with_features(customers("customers")), name="risk")
    async with serving(service) as running, running.client() as client:
        answer = await client.post("/v1/models/risk-fields/predict", json=[{"customer_id": k} for k in CUSTOMERS])
    assert answer.status_code == 200, answer.text
    assert [row["score"] for row in answer.json()] == pytest.approx([expected_score(k) for k in CUSTOMERS])


# The declarations that stay wrong say what to do.


def test_a_field_declared_as_an_input_too_says_to_remove_it_from_the_inputs(customers_csv: SourceFactory) -> None:
    source = customers_csv("customers")

    class Both(Ensemble):
        name = "both"
        inputs: ClassVar = {**KEY, **AGE}
        outputs: ClassVar = SCORE
        features: ClassVar = [Feature(source, key="customer_id", fields=AGE)]
        members = ["age-model"]

    with pytest.raises(ConfigurationError, match=r"\['age'\] clash .* remove it from the inputs"):
        Service(AgeModel(), Both())


async def test_a_member_input_the_ensemble_cannot_give_names_the_three_ways_to_give_it() -> None:
    class KeyOnly(Ensemble):
        name = "key-only"
        inputs: ClassVar = KEY
        outputs: ClassVar = SCORE
        members = ["age-model"]

    with pytest.raises(ConfigurationError) as raised:
        async with serving(Service(AgeModel(), KeyOnly())):
            pass
    message = raised.value.message
    assert "member 'age-model' takes 'age' (FP32 []), which the ensemble neither takes nor looks up" in message
    assert "KeyOnly.inputs" in message
    assert "KeyOnly.features" in message
    assert "let the member declare the Feature itself" in message
