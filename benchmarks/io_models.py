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
  otherwise (4 queries in flight, a pool of 10 connections);
- ``per_key_aiohttp`` and ``batched_aiohttp``: ``per_key`` and ``batched`` with ``AiohttpSource``, a
  benchmark-local ``HttpSource`` that speaks through ``aiohttp`` instead of ``httpx``: what
  asyncserve would measure if its HttpSource switched client (it is not part of asyncserve).

Building a service opens nothing: a source connects when the server starts. No source caches
(``cache_ttl_s`` stays None), so every request costs a lookup.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy.typing as npt
import orjson

from asyncserve.features import Feature, FeatureSource, HttpSource, PostgresSource
from asyncserve.features.source import Key, Row
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


class AiohttpSource(HttpSource):
    """``HttpSource`` over a pooled ``aiohttp.ClientSession`` instead of ``httpx.AsyncClient``; same URLs and policy.

    It replaces the client methods of ``asyncserve.features.http.HttpSource`` (``_open``,
    ``_fetch_one``, ``_fetch_batch``, ``_close``) and keeps everything else of the source (batching,
    single flight, timeouts, retries, breaker, metrics).
    """

    async def _open(self) -> None:
        import aiohttp  # type: ignore[import-not-found, unused-ignore]  # not installed in CI's `make check`

        connector = aiohttp.TCPConnector(limit=self.pool_size, limit_per_host=self.pool_size)
        timeout = aiohttp.ClientTimeout(total=self.policy.timeout_s)
        self._client = aiohttp.ClientSession(connector=connector, headers=self.headers, timeout=timeout)

    async def _fetch_one(self, key: Key) -> Row | None:
        async with self._client.get(self.url.format(key=key)) as response:
            if response.status == 404:
                return None
            response.raise_for_status()
            row: Row = orjson.loads(await response.read())
            return row

    async def _fetch_batch(self, keys: list[Key]) -> Mapping[Key, Row]:
        body = orjson.dumps({"keys": keys})
        async with self._client.post(self.batch_url, data=body, headers=_JSON) as response:
            response.raise_for_status()
            found = orjson.loads(await response.read())
        return {key: found[str(key)] for key in keys if found.get(str(key)) is not None}

    async def _close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


_JSON = {"Content-Type": "application/json"}


def http_users(*, batch: bool, client: type[HttpSource] = HttpSource) -> HttpSource:
    return client(
        "users",
        FEATURE_URL + "/users/{key}",
        batch_url=FEATURE_URL + "/users:batch" if batch else None,
        pool_size=POOL_SIZE,
        max_concurrent_fetches=POOL_SIZE,
        timeout_s=TIMEOUT_S,
    )


per_key = Service(Score(http_users(batch=False)), name="io-per-key")
batched = Service(Score(http_users(batch=True)), name="io-batched")
per_key_aiohttp = Service(Score(http_users(batch=False, client=AiohttpSource)), name="io-per-key-aiohttp")
batched_aiohttp = Service(Score(http_users(batch=True, client=AiohttpSource)), name="io-batched-aiohttp")
postgres = Service(
    Score(PostgresSource("users", PG_DSN, table=PG_TABLE, key_column="user_id", timeout_s=TIMEOUT_S)),
    name="io-postgres",
)
