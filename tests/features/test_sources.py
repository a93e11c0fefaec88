"""Feature sources against the real PostgreSQL, Redis and an HTTP service on loopback."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from asyncserve import FeatureTimeout, FeatureUnavailable
from asyncserve.features import FileSource, FunctionSource, HttpSource, PostgresSource, RedisSource
from asyncserve.features.source import BreakerState, FeatureSource, Key
from tests.conftest import serving_asgi
from tests.features.service import FeatureService, user_row

USERS = 1000


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


@pytest.fixture
async def users_table(postgres_dsn: str) -> AsyncIterator[str]:
    import asyncpg

    table = f"users_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(postgres_dsn)
    await connection.execute(f"CREATE TABLE {table} (user_id int PRIMARY KEY, age float8, country text)")
    rows = [(i, user_row(i)["age"], user_row(i)["country"]) for i in range(USERS)]
    await connection.copy_records_to_table(table, records=rows)
    try:
        yield table
    finally:
        await connection.execute(f"DROP TABLE {table}")
        await connection.close()


@pytest.fixture
async def redis_users(redis_url: str) -> AsyncIterator[str]:
    from redis import asyncio as aioredis

    prefix = f"test:{uuid.uuid4().hex[:12]}"
    client = aioredis.from_url(redis_url, decode_responses=True)
    async with client.pipeline(transaction=False) as pipe:
        for i in range(100):
            row = {name: str(value) for name, value in user_row(i).items()}
            pipe.hset(f"{prefix}:user:{i}", mapping=row)  # type: ignore[unused-awaitable,arg-type]
            pipe.set(f"{prefix}:json:{i}", f'{{"age": {user_row(i)["age"]}}}')  # type: ignore[unused-awaitable]
        await pipe.execute()
    try:
        yield prefix
    finally:
        keys = [key async for key in client.scan_iter(f"{prefix}:*")]
        await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def feature_service() -> AsyncIterator[tuple[FeatureService, str]]:
    service = FeatureService()
    async with serving_asgi(service) as url:
        yield service, url


def state_of(source: FeatureSource) -> BreakerState:
    return source.breaker.state


async def opened(source: FeatureSource) -> FeatureSource:
    await source.open()
    return source


async def test_postgres_concurrent_requests_share_round_trips(postgres_dsn: str, users_table: str) -> None:
    source = await opened(PostgresSource("users", postgres_dsn, table=users_table, key_column="user_id"))
    try:
        keys = list(range(256))
        results = await asyncio.gather(*(source.lookup([key], soon()) for key in keys))
        missing = await source.lookup([USERS + 5], soon())
    finally:
        await source.aclose()
    assert all(
        (result[key] or {}).get("age") == user_row(key)["age"] for key, result in zip(keys, results, strict=True)
    )
    assert missing == {USERS + 5: None}
    assert source.round_trips <= len(keys) / 10, f"{source.round_trips} round trips for {len(keys)} requests"


async def test_postgres_from_a_query_of_ones_own(postgres_dsn: str, users_table: str) -> None:
    query = f"SELECT user_id, age * 2 AS double_age FROM {users_table} WHERE user_id = ANY($1::int[])"
    source = await opened(PostgresSource("doubled", postgres_dsn, query=query, key_column="user_id"))
    try:
        rows = await source.lookup([3, 4], soon())
    finally:
        await source.aclose()
    assert rows[3] == {"user_id": 3, "double_age": 2 * user_row(3)["age"]}


@pytest.mark.parametrize("kind", ["hash", "json"])
async def test_redis_hashes_and_json(redis_url: str, redis_users: str, kind: str) -> None:
    template = f"{redis_users}:user:{{key}}" if kind == "hash" else f"{redis_users}:json:{{key}}"
    source = await opened(RedisSource("profiles", redis_url, key_template=template, kind=kind))  # type: ignore[arg-type]
    try:
        results = await asyncio.gather(*(source.lookup([key, 999], soon()) for key in range(50)))
    finally:
        await source.aclose()
    for key, rows in enumerate(results):
        assert float((rows[key] or {})["age"]) == user_row(key)["age"]
        assert rows[999] is None
    assert source.round_trips < 50


async def test_http_per_key_merges_duplicate_keys(feature_service: tuple[FeatureService, str]) -> None:
    service, url = feature_service
    service.delay_s = 0.02
    source = await opened(HttpSource("users", f"{url}/users/{{key}}", max_concurrent_fetches=1))
    try:
        results = await asyncio.gather(*(source.lookup([key % 10], soon()) for key in range(100)))
        missing = await source.lookup([USERS + 1], soon())
    finally:
        await source.aclose()
    assert all(rows[key % 10] == user_row(key % 10) for key, rows in enumerate(results))
    assert missing == {USERS + 1: None}
    assert service.gets <= 11  # ten users (one may be asked twice: before and after it was in flight) + the missing one


async def test_http_batch_endpoint_takes_many_keys_per_call(feature_service: tuple[FeatureService, str]) -> None:
    service, url = feature_service
    service.delay_s = 0.02
    source = await opened(HttpSource("users", f"{url}/users/{{key}}", batch_url=f"{url}/users:batch"))
    try:
        results = await asyncio.gather(*(source.lookup([key], soon()) for key in range(200)))
    finally:
        await source.aclose()
    assert all(rows[key] == user_row(key) for key, rows in enumerate(results))
    assert service.gets == 0
    assert service.batch_calls <= 20
    assert sorted(service.batch_keys) == list(range(200))  # every key asked exactly once


async def test_cache_answers_a_hot_key_once(feature_service: tuple[FeatureService, str]) -> None:
    service, url = feature_service
    source = await opened(HttpSource("users", f"{url}/users/{{key}}", cache_ttl_s=60))
    try:
        await asyncio.gather(*(source.lookup([7], soon()) for _ in range(50)))
        await source.lookup([7], soon())
        await source.lookup([USERS + 3], soon())
        await source.lookup([USERS + 3], soon())  # a missing row is cached too
    finally:
        await source.aclose()
    assert service.gets == 2
    assert source.cache is not None
    assert source.cache.hits >= 2


async def test_a_slow_source_times_out_naming_itself(feature_service: tuple[FeatureService, str]) -> None:
    service, url = feature_service
    service.delay_s = 0.5
    source = await opened(HttpSource("slowpoke", f"{url}/users/{{key}}", timeout_s=0.05, retries=0))
    try:
        with pytest.raises(FeatureTimeout, match="slowpoke"):
            await source.lookup([1], soon())
        started = time.perf_counter()
        with pytest.raises(FeatureTimeout, match="slowpoke"):
            await source.lookup([2], time.monotonic() + 0.03)  # the request's deadline is shorter still
        assert time.perf_counter() - started < 0.2
    finally:
        await source.aclose()


async def test_failed_reads_are_retried(feature_service: tuple[FeatureService, str]) -> None:
    service, url = feature_service
    service.fail_next = 2
    source = await opened(HttpSource("flaky", f"{url}/users/{{key}}", retries=2, backoff_s=0.001))
    try:
        rows = await source.lookup([5], soon())
    finally:
        await source.aclose()
    assert rows[5] == user_row(5)
    assert service.fail_next == 0


async def test_the_circuit_breaker_opens_then_lets_a_trial_through(feature_service: tuple[FeatureService, str]) -> None:
    service, url = feature_service
    service.fail_next = 3
    policy: dict[str, Any] = {"retries": 0, "breaker_failures": 3, "breaker_reset_s": 0.2}
    source = await opened(HttpSource("broken", f"{url}/users/{{key}}", **policy))
    try:
        for key in range(3):
            with pytest.raises(FeatureUnavailable, match="broken"):
                await source.lookup([key], soon())
        assert state_of(source) == BreakerState.OPEN
        calls_before = service.gets
        with pytest.raises(FeatureUnavailable, match="circuit breaker is open"):
            await source.lookup([9], soon())
        assert service.gets == calls_before  # failed fast, without calling the service
        await asyncio.sleep(0.25)
        assert state_of(source) == BreakerState.HALF_OPEN
        assert (await source.lookup([9], soon()))[9] == user_row(9)
        assert state_of(source) == BreakerState.CLOSED
    finally:
        await source.aclose()


async def test_file_source_reloads_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    await asyncio.to_thread(path.write_text, "sku,price\n1,9.5\n2,3.0\n")
    source = FileSource("prices", path, key_column="sku", check_interval_s=0.0)
    await source.open()
    try:
        first = await source.lookup([1, 3], soon())
        await asyncio.to_thread(path.write_text, "sku,price\n1,10.5\n3,1.0\n")
        stamp = time.time() + 5  # a different mtime even on coarse file systems
        await asyncio.to_thread(os.utime, path, (stamp, stamp))
        second = await source.lookup([1, 3], soon())
    finally:
        await source.aclose()
    assert first == {1: {"sku": "1", "price": "9.5"}, 3: None}
    assert second == {1: {"sku": "1", "price": "10.5"}, 3: {"sku": "3", "price": "1.0"}}
    assert source.reloads == 2


async def test_function_source_gets_batches_of_keys() -> None:
    calls: list[list[Key]] = []

    async def squares(keys: list[Key]) -> dict[Key, dict[str, Any]]:
        calls.append(keys)
        await asyncio.sleep(0.01)
        return {key: {"square": key * key} for key in keys if isinstance(key, int)}

    source = await opened(FunctionSource("squares", squares, max_concurrent_fetches=1))
    try:
        results = await asyncio.gather(*(source.lookup([key], soon()) for key in range(40)))
    finally:
        await source.aclose()
    assert all(rows[key] == {"square": key * key} for key, rows in enumerate(results))
    assert len(calls) < 10


async def test_a_closed_source_opens_again_on_another_event_loop(tmp_path: Path) -> None:
    # A module-level service (the demo's) served twice in one process opens its sources on two loops.
    path = tmp_path / "users.csv"
    await asyncio.to_thread(path.write_text, "user_id,age\n1,30\n")
    source = FileSource("users", path, key_column="user_id")

    async def lookup_once() -> Any:
        await source.open()
        try:
            return await source.lookup([1], soon())
        finally:
            await source.aclose()

    first = await asyncio.to_thread(asyncio.run, lookup_once())
    second = await asyncio.to_thread(asyncio.run, lookup_once())
    assert first == second == {1: {"user_id": "1", "age": "30"}}  # CSV values are text until a model's types
