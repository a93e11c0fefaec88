"""The asyncserve services of the I/O benchmark: one model, fed by three kinds of feature source.

The model ``score`` takes ``{"user_id": N}``, gets the user's ``age`` and ``country`` from its
feature source, and returns ``{"probability": p}`` from ``benchmarks.io_apps.predict_proba``, the
same logistic regression the baselines call. Served with, for example::

    IO_FEATURE_URL=http://127.0.0.1:8123 asyncserve serve benchmarks.io_models:per_key --executor-workers 1

- ``per_key``: ``HttpSource`` GETting ``/users/{key}``, one request per key, over a pool of 256
  connections with up to 256 round trips in flight (what the bare-ASGI ceiling does);
- ``batched``: the same source with ``batch_url``: the keys of all the requests waiting while
  round trips run leave together in one ``POST /users:batch`` (cross-request batching), with the
  same 256 round trips allowed in flight;
- ``postgres``: ``PostgresSource`` over the table ``IO_PG_TABLE`` of ``IO_PG_DSN``, its defaults
  otherwise (4 queries in flight, a pool of 10 connections).

Building a service opens nothing: a source connects when the server starts. No source caches
(``cache_ttl_s`` stays None), so every request costs a lookup.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy.typing as npt

from asyncserve.features import Feature, FeatureSource, HttpSource, PostgresSource
from asyncserve.model import Model
from asyncserve.service import Service
from asyncserve.tensors import Tensor
from benchmarks.io_apps import MODEL, POOL_SIZE, TIMEOUT_S, predict_proba

Array = npt.NDArray[Any]
FEATURE_URL = os.environ.get("IO_FEATURE_URL", "http://127.0.0.1:8123").rstrip("/")
PG_DSN = os.environ.get("IO_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PG_TABLE = os.environ.get("IO_PG_TABLE", "io_users")


class Score(Model):
    """P(positive) of a user, from the age and country its feature source holds."""

    name = MODEL
    inputs: ClassVar[Mapping[str, Tensor]] = {"user_id": Tensor("INT64")}
    outputs: ClassVar[Mapping[str, Tensor]] = {"probability": Tensor("FP32")}

    def __init__(self, source: FeatureSource) -> None:
        fields = {"age": Tensor("FP32"), "country": Tensor("BYTES")}
        self.features = [Feature(source, key="user_id", fields=fields)]  # type: ignore[misc]

    def predict(self, user_id: Array, age: Array, country: Array) -> Array:
        return predict_proba(age, country)


def http_users(*, batch: bool) -> HttpSource:
    return HttpSource(
        "users",
        FEATURE_URL + "/users/{key}",
        batch_url=FEATURE_URL + "/users:batch" if batch else None,
        pool_size=POOL_SIZE,
        max_concurrent_fetches=POOL_SIZE,
        timeout_s=TIMEOUT_S,
    )


per_key = Service(Score(http_users(batch=False)), name="io-per-key")
batched = Service(Score(http_users(batch=True)), name="io-batched")
postgres = Service(
    Score(PostgresSource("users", PG_DSN, table=PG_TABLE, key_column="user_id", timeout_s=TIMEOUT_S)),
    name="io-postgres",
)
