"""A store that hangs or is down: every accepted record ends up in it exactly once, once it is back.

The real PostgreSQL and Redis sit behind a TCP proxy in the test's event loop (``proxy.py``),
which the test freezes (no byte forwarded either way: a hung server) and thaws, or keeps closed
(the server is down) and opens. Records are counted in the real store, read directly, by
``log_id`` and ``request_id``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio

from asyncserve.predlog import LoggerState, LogSink, PostgresSink, PredictionLogger, RedisStreamSink
from tests.predlog.conftest import read_stream, record, until
from tests.predlog.proxy import FreezableProxy, free_port

FROZEN_RECORDS = 3000
WRITE_TIMEOUT_S = 0.5


@dataclass
class Store:
    """A real store: the sink to reach it through a proxy on a port, and how to read it directly."""

    upstream: tuple[str, int]
    sink_on: Callable[[int], LogSink]
    read_ids: Callable[[], Awaitable[list[tuple[str, str]]]]
    """Every stored record's ``(log_id, request_id)``, duplicates included."""


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)
    where = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{host[0]}@{where}" if len(host) == 2 else where))


@pytest.fixture(
    params=[pytest.param("postgres", marks=pytest.mark.postgres), pytest.param("redis", marks=pytest.mark.redis)]
)
def store(request: pytest.FixtureRequest) -> Store:
    found: Store = request.getfixturevalue(f"{request.param}_store")
    return found


@pytest.fixture
async def postgres_store(postgres_dsn: str) -> AsyncIterator[Store]:
    table = f"predlog_frozen_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(postgres_dsn)

    async def read_ids() -> list[tuple[str, str]]:
        rows = await connection.fetch(f"SELECT log_id, request_id FROM {table}")
        return [(row["log_id"], row["request_id"]) for row in rows]

    def sink_on(port: int) -> LogSink:
        return PostgresSink(with_port(postgres_dsn, port), table=table, connect_timeout_s=WRITE_TIMEOUT_S)

    try:
        yield Store(("127.0.0.1", urlsplit(postgres_dsn).port or 5432), sink_on, read_ids)
    finally:
        await connection.execute(f"DROP TABLE IF EXISTS {table}")
        await connection.close()


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[Store]:
    stream = f"asyncserve:test:frozen:{uuid.uuid4().hex[:12]}"
    client = redis.asyncio.Redis.from_url(redis_url)

    async def read_ids() -> list[tuple[str, str]]:
        return [(entry["log_id"], entry["request_id"]) for entry in await read_stream(client, stream)]

    def sink_on(port: int) -> LogSink:
        return RedisStreamSink(with_port(redis_url, port), stream=stream, maxlen=None)

    try:
        yield Store(("127.0.0.1", urlsplit(redis_url).port or 6379), sink_on, read_ids)
    finally:
        keys = [stream, *await client.keys(f"{stream}:*")]
        await client.delete(*keys)
        await client.aclose()


def logger_for(sink: LogSink, spill: Path) -> PredictionLogger:
    return PredictionLogger(
        sink, max_buffer=1000, batch_size=100, flush_interval_s=0.02, write_timeout_s=WRITE_TIMEOUT_S,
        retries=3, retry_backoff_s=0.05, replay_interval_s=0.2, spill_path=spill,
    )  # fmt: skip


async def spill_files(spill: Path) -> list[Path]:
    return await asyncio.to_thread(lambda: sorted(spill.parent.glob(f"{spill.name}*")))


async def assert_stored_once(store: Store, count: int) -> None:
    ids = await store.read_ids()
    log_ids = [log_id for log_id, _ in ids]
    assert len(ids) == count, f"{len(ids)} rows for {count} records"
    assert len(set(log_ids)) == count, f"{count - len(set(log_ids))} records stored twice"
    assert {request_id for _, request_id in ids} == {f"r{i}" for i in range(count)}


async def test_a_frozen_store_gets_every_record_once_after_it_thaws(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spill = tmp_path / "spill.jsonl"
    async with FreezableProxy(store.upstream) as proxy:
        log = logger_for(store.sink_on(proxy.port), spill)
        await log.start()
        for i in range(100):  # written through the proxy, so a connection is open when it freezes
            log.record(record(i))
        await log.flush()
        assert log.statistics().written == 100

        proxy.freeze()
        frozen_at = time.monotonic()
        first_spill_s = None
        with caplog.at_level(logging.WARNING):
            for i in range(100, 100 + FROZEN_RECORDS):  # about 1,000 records a second
                log.record(record(i))
                if i % 50 == 0:
                    await asyncio.sleep(0.05)
                    if first_spill_s is None and log.statistics().spilled:
                        first_spill_s = time.monotonic() - frozen_at
            await log.flush()
        frozen = log.statistics()
        assert (frozen.written, frozen.spilled, frozen.dropped, frozen.lost) == (100, FROZEN_RECORDS, 0, 0)
        assert first_spill_s is not None
        assert first_spill_s < WRITE_TIMEOUT_S + 0.5  # spilled at the first timeout
        assert f"no answer within {WRITE_TIMEOUT_S}s" in caplog.text

        proxy.thaw()
        replay_s = await until(lambda: log.statistics().replayed == FROZEN_RECORDS)
        await log.aclose()

    await assert_stored_once(store, 100 + FROZEN_RECORDS)
    assert await spill_files(spill) == []
    print(  # shown with pytest -s: the measures the issue asks for
        f"\n{log.sink.name}: frozen {FROZEN_RECORDS} records, first spill after {first_spill_s:.2f}s, "
        f"replayed in {replay_s:.2f}s after the thaw; {log.statistics()}"
    )


@pytest.mark.parametrize("unreachable", ["down", "frozen"])
async def test_a_logger_starts_while_its_store_is_unreachable(
    store: Store, unreachable: Literal["down", "frozen"], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spill = tmp_path / "spill.jsonl"
    proxy = FreezableProxy(store.upstream)
    port = await asyncio.to_thread(free_port)
    if unreachable == "frozen":
        await proxy.start(port)
        proxy.freeze()
    log = logger_for(store.sink_on(port), spill)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            await log.start()  # does not raise
        start_s = time.monotonic() - started
        assert log.state is LoggerState.RUNNING
        assert f"prediction log sink {log.sink.name} is unreachable" in caplog.text
        assert start_s < WRITE_TIMEOUT_S + 0.5
        for i in range(500):
            log.record(record(i))
        await log.flush()
        assert log.statistics().spilled == 500

        if unreachable == "frozen":
            proxy.thaw()
        else:
            await proxy.start(port)
        await until(lambda: log.statistics().replayed == 500)
        for i in range(500, 600):  # the store is back: written directly
            log.record(record(i))
        await log.aclose()
    finally:
        await proxy.stop()

    stats = log.statistics()
    assert (stats.written, stats.spilled, stats.replayed, stats.dropped) == (100, 500, 500, 0)
    await assert_stored_once(store, 600)
    assert await spill_files(spill) == []


async def test_a_store_that_comes_and_goes_loses_and_doubles_nothing(store: Store, tmp_path: Path) -> None:
    """Frozen, thawed, down, up, frozen again, while records keep coming: each stored once in the end."""
    spill = tmp_path / "spill.jsonl"
    async with FreezableProxy(store.upstream) as proxy:
        log = logger_for(store.sink_on(proxy.port), spill)
        await log.start()
        sent = 0

        async def send(seconds: float) -> None:
            nonlocal sent
            for _ in range(int(seconds / 0.02)):
                for _ in range(20):
                    log.record(record(sent))
                    sent += 1
                await asyncio.sleep(0.02)

        await send(0.3)
        proxy.freeze()
        await send(0.8)
        proxy.thaw()
        await send(0.5)
        port = proxy.port
        await proxy.stop()
        await send(0.5)
        await proxy.start(port)
        await send(0.5)
        proxy.freeze()
        await send(0.8)
        proxy.thaw()
        await until(lambda: log.statistics().replayed == log.statistics().spilled, timeout_s=8)
        await log.aclose()

    stats = log.statistics()
    assert stats.dropped == stats.lost == 0
    assert stats.spilled > 0
    await assert_stored_once(store, sent)
    assert await spill_files(spill) == []


def test_with_port_keeps_the_user() -> None:
    assert with_port("postgresql://postgres@127.0.0.1:5432/test", 7) == "postgresql://postgres@127.0.0.1:7/test"
    assert with_port("redis://127.0.0.1:6379/0", 7) == "redis://127.0.0.1:7/0"


async def test_a_write_that_timed_out_lands_on_the_thaw_and_is_not_stored_again(store: Store, tmp_path: Path) -> None:
    """The scenario idempotent writes are for: the hung batch reaches the store when it thaws, and is replayed too.

    The first logger never replays (its interval is long): the thaw alone puts the timed-out batch
    in the store. A second logger on the same spill file replays it at start, and must add nothing.
    """
    spill = tmp_path / "spill.jsonl"
    async with FreezableProxy(store.upstream) as proxy:
        first = PredictionLogger(
            store.sink_on(proxy.port), batch_size=100, flush_interval_s=0.01, write_timeout_s=WRITE_TIMEOUT_S,
            replay_interval_s=60, spill_path=spill,
        )  # fmt: skip
        await first.start()
        for i in range(10):
            first.record(record(i))
        await first.flush()
        proxy.freeze()
        for i in range(10, 110):
            first.record(record(i))
        await first.flush()
        assert first.statistics().spilled == 100
        proxy.thaw()

        async def landed() -> bool:  # the timed-out write, delivered late
            return len(await store.read_ids()) >= 110

        await until(landed)
        await first.aclose()

        second = logger_for(store.sink_on(proxy.port), spill)
        await second.start()
        await until(lambda: second.statistics().replayed == 100)
        await second.aclose()

    await assert_stored_once(store, 110)
    assert await spill_files(spill) == []
