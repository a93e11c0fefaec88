"""In-process sinks for the logger's logic, and a factory per real backend for the sink contract tests."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio

from asyncserve.predlog import JsonlSink, LogRecord, LogSink, PostgresSink, RedisStreamSink, SQLiteSink


class MemorySink:
    """Keeps every batch; each write is also put on ``batches`` so a test can await it."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.opened = self.closed = False
        self.stored: list[dict[str, Any]] = []
        self.batches: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()

    async def open(self) -> None:
        self.opened = True

    async def write(self, records: Sequence[LogRecord]) -> None:
        batch = [orjson.loads(record.json) for record in records]
        self.stored.extend(batch)
        self.batches.put_nowait(batch)

    async def aclose(self) -> None:
        self.closed = True

    async def next_batch(self, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout_s):
            return await self.batches.get()


class FlakySink(MemorySink):
    """Raises ``ConnectionError`` on its first ``failures`` writes (all of them when ``failures`` is None)."""

    def __init__(self, failures: int | None, name: str = "flaky") -> None:
        super().__init__(name)
        self.failures = failures
        self.attempts = 0

    async def write(self, records: Sequence[LogRecord]) -> None:
        self.attempts += 1
        if self.failures is None or self.attempts <= self.failures:
            raise ConnectionError(f"{self.name} is down (attempt {self.attempts})")
        await super().write(records)


class GatedSink(MemorySink):
    """Each write waits for ``gate`` (the test opens it); ``entered`` is set once a write is waiting."""

    def __init__(self, name: str = "gated") -> None:
        super().__init__(name)
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def write(self, records: Sequence[LogRecord]) -> None:
        self.entered.set()
        await self.gate.wait()
        await super().write(records)


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 5.0) -> float:
    """Wait until ``condition()`` holds (polled every 10 ms); return how long that took."""
    started = time.monotonic()
    async with asyncio.timeout(timeout_s):
        while True:
            holds = condition()
            if await holds if inspect.isawaitable(holds) else holds:
                return time.monotonic() - started
            # Polled: the logger's counts and the stores' contents have no event to wait on.
            await asyncio.sleep(0.01)


def record(index: int, **extra: Any) -> dict[str, Any]:
    return {"request_id": f"r{index}", "model": "churn", "version": "3", "outputs": {"p": index / 100}, **extra}


async def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines file (read off the event loop); none if it does not exist."""

    def read() -> list[dict[str, Any]]:
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines()]

    return await asyncio.to_thread(read)


async def read_stream(client: redis.asyncio.Redis, stream: str) -> list[dict[str, Any]]:
    """The records of a Redis stream, oldest first."""
    records = []
    for _, fields in await client.xrange(stream) or []:
        assert fields is not None
        records.append(orjson.loads(fields[b"record"]))
    return records


@dataclass
class Backend:
    """A real sink, and how to read back (in write order) what it stored."""

    sink: LogSink
    read_back: Callable[[], Awaitable[list[dict[str, Any]]]]


@pytest.fixture(
    params=[
        "jsonl",
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
    ]
)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each real backend in turn: files in tmp_path, a table or a stream of its own on the real servers."""
    # A plain fixture: the server fixtures it pulls in probe their servers with blocking sockets.
    found: Backend = request.getfixturevalue(f"{request.param}_backend")
    return found


@pytest.fixture
def jsonl_backend(tmp_path: Path) -> Backend:
    path = tmp_path / "predictions.jsonl"
    return Backend(JsonlSink(path), lambda: read_jsonl(path))


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Backend:
    path = tmp_path / "predictions.db"

    def read() -> list[dict[str, Any]]:
        with sqlite3.connect(path) as connection:
            rows = connection.execute("SELECT request_id, model, version, time, record FROM predictions ORDER BY id")
            return [_checked_row(*row) for row in rows]

    async def read_back() -> list[dict[str, Any]]:
        return await asyncio.to_thread(read)

    return Backend(SQLiteSink(path), read_back)


def _checked_row(request_id: str, model: str, version: str, time: Any, record: str | bytes) -> dict[str, Any]:
    """The row's JSON record, after checking that its columns agree with it."""
    fields: dict[str, Any] = orjson.loads(record)
    assert (request_id, model, version) == (fields["request_id"], fields["model"], fields["version"])
    assert str(time) == fields["time"] or time.isoformat(timespec="microseconds") == fields["time"]
    return fields


@pytest.fixture
async def postgres_backend(postgres_dsn: str) -> AsyncIterator[Backend]:
    """A PostgresSink on a table of the test's own, dropped afterwards."""
    table = f"predlog_test_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(postgres_dsn)

    async def read_back() -> list[dict[str, Any]]:
        rows = await connection.fetch(f"SELECT request_id, model, version, time, record FROM {table} ORDER BY id")
        return [_checked_row(*row) for row in rows]

    try:
        yield Backend(PostgresSink(postgres_dsn, table=table), read_back)
    finally:
        await connection.execute(f"DROP TABLE IF EXISTS {table}")
        await connection.close()


@pytest.fixture
async def redis_backend(redis_url: str) -> AsyncIterator[Backend]:
    """A RedisStreamSink on a stream of the test's own, deleted afterwards."""
    stream = f"asyncserve:test:{uuid.uuid4().hex[:12]}"
    client = redis.asyncio.Redis.from_url(redis_url)

    async def read_back() -> list[dict[str, Any]]:
        return await read_stream(client, stream)

    try:
        yield Backend(RedisStreamSink(redis_url, stream=stream), read_back)
    finally:
        await client.delete(stream)
        await client.aclose()
