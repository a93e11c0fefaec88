"""Broker fixtures: every test of the broker contract runs on memory, SQLite (in tmp_path) and the real Redis.

``make_broker(**options)`` opens a broker on the test's own storage (a SQLite file of its own, a
Redis key prefix of its own); calling it twice gives two brokers on the same storage, as two
processes would have. Every broker is closed after the test, and the Redis keys are deleted.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from asyncserve.jobs import Broker, MemoryBroker, RedisBroker, SQLiteBroker

MakeBroker = Callable[..., Awaitable[Broker]]


@dataclass
class Storage:
    """Where a test's brokers keep their jobs."""

    kind: str
    path: Path | None = None
    redis_url: str | None = None
    prefix: str | None = None

    @property
    def url(self) -> str:
        """The ``open_broker`` URL of this storage."""
        if self.kind == "sqlite":
            return f"sqlite://{self.path}"
        if self.kind == "redis":
            return f"{self.redis_url}?prefix={self.prefix}"
        return "memory://"

    def build(self, **options: Any) -> Broker:
        if self.kind == "sqlite":
            assert self.path is not None
            return SQLiteBroker(self.path, **options)
        if self.kind == "redis":
            assert self.redis_url is not None
            assert self.prefix is not None
            return RedisBroker(self.redis_url, prefix=self.prefix, **options)
        return MemoryBroker(**options)


def _storage(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if kind == "sqlite":
        return Storage("sqlite", path=tmp_path / "jobs.db")
    if kind == "redis":
        # A plain fixture calls this: redis_url probes the server with a blocking socket.
        url: str = request.getfixturevalue("redis_url")
        return Storage("redis", redis_url=url, prefix=f"asyncserve-test:{uuid.uuid4().hex[:12]}")
    return Storage("memory")


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """Each broker backend in turn."""
    return _storage(request.param, request, tmp_path)


@pytest.fixture
def sqlite_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return _storage("sqlite", request, tmp_path)


@pytest.fixture
def redis_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return _storage("redis", request, tmp_path)


async def _brokers(storage: Storage) -> AsyncIterator[MakeBroker]:
    opened: list[Broker] = []

    async def make(**options: Any) -> Broker:
        broker = storage.build(**options)
        await broker.open()
        opened.append(broker)
        return broker

    try:
        yield make
    finally:
        for broker in reversed(opened):
            await broker.aclose()
        if storage.kind == "redis":
            await delete_keys(storage)


async def delete_keys(storage: Storage) -> None:
    assert storage.redis_url is not None
    client = redis.asyncio.Redis.from_url(storage.redis_url)
    try:
        found = [key async for key in client.scan_iter(match=f"{storage.prefix}:*", count=1000)]
        if found:
            await client.delete(*found)
    finally:
        await client.aclose()


@pytest.fixture
async def make_broker(storage: Storage) -> AsyncIterator[MakeBroker]:
    async for make in _brokers(storage):
        yield make


@pytest.fixture
async def broker(make_broker: MakeBroker) -> Broker:
    """An open broker of each backend, with its defaults."""
    return await make_broker()


@pytest.fixture
async def make_sqlite_broker(sqlite_storage: Storage) -> AsyncIterator[MakeBroker]:
    async for make in _brokers(sqlite_storage):
        yield make


@pytest.fixture
async def make_redis_broker(redis_storage: Storage) -> AsyncIterator[MakeBroker]:
    async for make in _brokers(redis_storage):
        yield make


async def let_pass(seconds: float) -> None:
    """Let a duration the test chose (a lease, a backoff, a TTL) run out: the one kind of sleep we allow."""
    await asyncio.sleep(seconds)
