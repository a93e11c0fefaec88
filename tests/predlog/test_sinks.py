"""Every sink against its real backend (files, SQLite, the real PostgreSQL and Redis), and open_sink."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import numpy as np
import pytest
import redis.asyncio

from asyncserve.exceptions import ConfigurationError
from asyncserve.predlog import (
    JsonlSink,
    LogRecord,
    PostgresSink,
    PredictionLogger,
    RedisStreamSink,
    SQLiteSink,
    open_sink,
    prediction_record,
)
from tests.predlog.conftest import Backend, read_jsonl, read_stream, record, until


def encoded(*indexes: int) -> list[LogRecord]:
    return [LogRecord.encode(record(i)) for i in indexes]


async def test_a_sink_stores_each_batch_whole_and_in_order(backend: Backend) -> None:
    last = encoded(3)
    await backend.sink.open()
    try:
        await backend.sink.write(encoded(0, 1, 2))
        await backend.sink.write([])  # how the logger checks that a failing sink answers again
        await backend.sink.write(last)
    finally:
        await backend.sink.aclose()

    stored = await backend.read_back()
    assert [r["request_id"] for r in stored] == ["r0", "r1", "r2", "r3"]
    assert stored[3] == dict(last[0]) | {"time": stored[3]["time"]}


async def test_a_logger_writes_a_full_prediction_record_through_every_sink(backend: Backend, tmp_path: Path) -> None:
    spill = tmp_path / "spill.jsonl"
    async with PredictionLogger(backend.sink, batch_size=10, flush_interval_s=0.01, spill_path=spill) as log:
        for i in range(25):
            log.record(
                prediction_record(
                    request_id=f"r{i}", model="churn", version="3",
                    inputs={"x": np.arange(3, dtype=np.float32), "raw": b"\x00\xff"},
                    outputs=np.array([[i, 1.5]])[:, ::-1], features={"age": np.int64(42)},
                    latency_ms={"features": 1.25, "model": 8.5}, degraded=i == 7,
                )
            )  # fmt: skip

    stored = await backend.read_back()
    assert [r["request_id"] for r in stored] == [f"r{i}" for i in range(25)]
    assert stored[7]["outputs"] == [[1.5, 7.0]]
    assert stored[7]["inputs"] == {"x": [0.0, 1.0, 2.0], "raw": "AP8="}
    assert stored[7]["features"] == {"age": 42}
    assert stored[7]["latency_ms"] == {"features": 1.25, "model": 8.5}
    assert [r["degraded"] for r in stored].count(True) == 1
    assert log.statistics().written == 25
    assert not await asyncio.to_thread(spill.exists)


async def test_jsonl_rotates_and_keeps_the_newest_files(tmp_path: Path) -> None:
    path = tmp_path / "log" / "predictions.jsonl"
    line_bytes = len(encoded(11)[0].json) + 1  # records 11 to 17 encode to lines of one length
    sink = JsonlSink(path, rotate_bytes=2 * line_bytes, keep=2)
    await sink.open()
    for i in range(11, 18):
        await sink.write(encoded(i))
    await sink.aclose()

    files = [path, path.with_name("predictions.jsonl.1"), path.with_name("predictions.jsonl.2")]
    contents = [[r["request_id"] for r in await read_jsonl(f)] for f in files]
    assert contents == [["r17"], ["r15", "r16"], ["r13", "r14"]]
    assert not await asyncio.to_thread(path.with_name("predictions.jsonl.3").exists)


async def test_jsonl_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    for batch in ((0, 1), (2,)):
        sink = JsonlSink(path)
        await sink.open()
        await sink.write(encoded(*batch))
        await sink.aclose()
    assert [r["request_id"] for r in await read_jsonl(path)] == ["r0", "r1", "r2"]


async def test_sqlite_uses_wal_mode(tmp_path: Path) -> None:
    sink = SQLiteSink(tmp_path / "p.db", table="preds")
    await sink.open()
    await sink.write(encoded(0))
    await sink.aclose()

    def inspect() -> tuple[str, int]:
        with sqlite3.connect(tmp_path / "p.db") as connection:
            mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
            return mode, connection.execute("SELECT count(*) FROM preds").fetchone()[0]

    assert await asyncio.to_thread(inspect) == ("wal", 1)


async def test_postgres_stores_nul_characters_as_replacement_characters(postgres_backend: Backend) -> None:
    sink = postgres_backend.sink
    await sink.open()
    try:
        await sink.write([LogRecord.encode(record(0, request_id="r\x000", inputs={"k\x00": ["a\x00b", 1]}))])
    finally:
        await sink.aclose()
    [stored] = await postgres_backend.read_back()
    assert (stored["request_id"], stored["inputs"]) == ("r\ufffd0", {"k\ufffd": ["a\ufffdb", 1]})


def test_table_names_must_be_plain_identifiers() -> None:
    with pytest.raises(ConfigurationError, match="table must be a plain identifier"):
        SQLiteSink("p.db", table="predictions; drop table users")
    with pytest.raises(ConfigurationError, match="table must be a plain identifier"):
        PostgresSink("postgresql://localhost/db", table="a-b")


def test_options_are_checked_when_a_sink_is_built() -> None:
    with pytest.raises(ConfigurationError, match="keep must be an integer >= 1"):
        JsonlSink("p.jsonl", keep=0)
    with pytest.raises(ConfigurationError, match="maxlen must be"):
        RedisStreamSink("redis://localhost", maxlen=0)


@pytest.mark.parametrize(
    ("url", "kind", "detail"),
    [
        ("var/predictions.jsonl", JsonlSink, "jsonl:var/predictions.jsonl"),
        ("jsonl:///tmp/p.jsonl", JsonlSink, "jsonl:/tmp/p.jsonl"),
        ("sqlite:///tmp/p.db", SQLiteSink, "sqlite:/tmp/p.db:predictions"),
        ("var/p.sqlite3", SQLiteSink, "sqlite:var/p.sqlite3:predictions"),
        ("postgresql://app:secret@db:5432/ml?table=preds&sslmode=disable", PostgresSink, "postgres:preds"),
        ("postgres://db/ml", PostgresSink, "postgres:predictions"),
        ("redis://cache:6379/0?stream=preds&maxlen=500&dedup_window_s=60", RedisStreamSink, "redis:preds"),
    ],
)
def test_open_sink_chooses_the_sink_by_url(url: str, kind: type, detail: str) -> None:
    sink = open_sink(url)
    assert isinstance(sink, kind)
    assert sink.name == detail
    assert "secret" not in repr(sink)


def test_open_sink_leaves_the_drivers_options_in_the_url() -> None:
    postgres = open_sink("postgresql://db/ml?table=preds&sslmode=disable")
    redis = open_sink("redis://cache/0?stream=s&maxlen=none&socket_timeout=2")
    assert isinstance(postgres, PostgresSink)
    assert isinstance(redis, RedisStreamSink)
    assert postgres.dsn == "postgresql://db/ml?sslmode=disable"
    assert (redis.url, redis.maxlen, redis.dedup_window_s) == ("redis://cache/0?socket_timeout=2", None, 3600.0)
    assert open_sink("redis://cache/0?dedup_window_s=none").dedup_window_s is None  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="dedup_window_s must be a number of seconds"):
        open_sink("redis://cache/0?dedup_window_s=soon")


@pytest.mark.parametrize("url", ["kafka://broker/topic", "predictions.csv", "jsonl://"])
def test_open_sink_names_the_supported_urls(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"postgresql://|names no file"):
        open_sink(url)


@pytest.mark.parametrize(
    ("module", "url", "extra"),
    [("asyncpg", "postgresql://db/ml", "postgres"), ("redis", "redis://cache", "redis")],
)
def test_a_missing_driver_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, module: str, url: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ConfigurationError, match=rf"pip install 'asyncserve\[{extra}\]'"):
        open_sink(url)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
    ]
)
def keyed_backend(request: pytest.FixtureRequest) -> Backend:
    """The backends that store a record once per log_id."""
    found: Backend = request.getfixturevalue(f"{request.param}_backend")
    return found


async def test_a_batch_written_again_stores_only_what_is_missing(keyed_backend: Backend) -> None:
    first, again = encoded(0, 1, 2), encoded(3)
    await keyed_backend.sink.open()
    try:
        await keyed_backend.sink.write(first)
        await keyed_backend.sink.write(first[1:] + again)  # a retry after a write that landed, with a new record
        await keyed_backend.sink.write(again)
    finally:
        await keyed_backend.sink.aclose()
    stored = await keyed_backend.read_back()
    assert [r["request_id"] for r in stored] == ["r0", "r1", "r2", "r3"]
    assert [r["log_id"] for r in stored] == [r.log_id for r in first + again]


async def test_a_cancelled_jsonl_write_leaves_nothing_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    sink = JsonlSink(path)
    await sink.open()
    await sink.write(encoded(0))
    expected, cancelled = ["r0"], 0
    for index in range(1, 30):  # cancelled before, while or after its thread writes
        write = asyncio.ensure_future(sink.write(encoded(index)))
        for _ in range(index % 4):
            await asyncio.sleep(0)
        write.cancel()
        try:
            await write
        except asyncio.CancelledError:
            cancelled += 1
        else:
            expected.append(f"r{index}")  # it had finished: it stays
    await sink.aclose()
    assert [r["request_id"] for r in await read_jsonl(path)] == expected
    assert cancelled > 0


async def test_a_write_to_a_locked_sqlite_database_times_out_spills_and_is_replayed(tmp_path: Path) -> None:
    database, spill = tmp_path / "p.db", tmp_path / "spill.jsonl"
    sink = SQLiteSink(database)
    log = PredictionLogger(
        sink, batch_size=50, flush_interval_s=0.01, write_timeout_s=0.2, replay_interval_s=0.1, spill_path=spill
    )
    await log.start()
    other = await asyncio.to_thread(sqlite3.connect, database, isolation_level=None, check_same_thread=False)
    await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")  # another process holds the write lock
    started = time.monotonic()
    for i in range(200):
        log.record(record(i))
    await log.flush()
    assert time.monotonic() - started < 1.0  # not SQLite's busy timeout (5 s): the write timeout
    assert log.statistics().spilled == 200
    await asyncio.to_thread(other.execute, "COMMIT")
    await asyncio.to_thread(other.close)
    await until(lambda: log.statistics().replayed >= 200)
    await log.aclose()

    def count() -> tuple[int, int]:
        with sqlite3.connect(database) as connection:
            rows, ids = connection.execute("SELECT count(*), count(DISTINCT log_id) FROM predictions").fetchone()
            return int(rows), int(ids)

    assert await asyncio.to_thread(count) == (200, 200)


async def test_sqlite_adds_the_log_id_column_to_a_table_of_an_earlier_version(tmp_path: Path) -> None:
    database = tmp_path / "p.db"

    def create_old_table() -> None:
        with sqlite3.connect(database) as connection:
            connection.execute(
                "CREATE TABLE predictions (id INTEGER PRIMARY KEY, request_id TEXT, model TEXT, version TEXT, "
                "time TEXT, record TEXT NOT NULL)"
            )
            connection.execute("INSERT INTO predictions (request_id, record) VALUES ('old', '{}')")

    await asyncio.to_thread(create_old_table)
    sink = SQLiteSink(database)
    await sink.open()
    await sink.write(encoded(0))
    await sink.write(encoded(0)[:0])
    await sink.aclose()

    def read() -> list[tuple[str, str | None]]:
        with sqlite3.connect(database) as connection:
            return connection.execute("SELECT request_id, log_id FROM predictions ORDER BY id").fetchall()

    rows = await asyncio.to_thread(read)
    assert [row[0] for row in rows] == ["old", "r0"]
    assert rows[0][1] is None


@pytest.mark.postgres
async def test_postgres_adds_the_log_id_column_to_a_table_of_an_earlier_version(postgres_dsn: str) -> None:
    table = f"predlog_old_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(postgres_dsn)
    try:
        await connection.execute(
            f"CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, request_id text, "
            "model text, version text, time timestamptz, record jsonb NOT NULL)"
        )
        await connection.execute(f"INSERT INTO {table} (request_id, record) VALUES ('old', '{{}}')")
        sink = PostgresSink(postgres_dsn, table=table)
        await sink.open()
        batch = encoded(0)
        await sink.write(batch)
        await sink.write(batch)
        await sink.aclose()
        rows = await connection.fetch(f"SELECT request_id, log_id FROM {table} ORDER BY id")
        assert [(row["request_id"], row["log_id"]) for row in rows] == [("old", None), ("r0", batch[0].log_id)]
    finally:
        await connection.execute(f"DROP TABLE IF EXISTS {table}")
        await connection.close()


@pytest.mark.redis
async def test_redis_remembers_log_ids_for_its_dedup_window(redis_url: str) -> None:
    stream = f"asyncserve:test:{uuid.uuid4().hex[:12]}"
    sink = RedisStreamSink(redis_url, stream=stream, dedup_window_s=120)
    client = redis.asyncio.Redis.from_url(redis_url)
    batch = encoded(0, 1)
    try:
        await sink.open()
        await sink.write(batch)
        await sink.aclose()
        key = sink.dedup_key(batch[0].log_id)
        assert await client.smembers(key) == {r.log_id.encode() for r in batch}
        assert 110 < await client.ttl(key) <= 120
    finally:
        await client.delete(stream, *await client.keys(f"{stream}:*"))
        await client.aclose()


@pytest.mark.redis
async def test_redis_without_dedup_stores_every_write(redis_url: str) -> None:
    stream = f"asyncserve:test:{uuid.uuid4().hex[:12]}"
    sink = RedisStreamSink(redis_url, stream=stream, dedup_window_s=None)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await sink.open()
        batch = encoded(0)
        await sink.write(batch)
        await sink.write(batch)
        await sink.aclose()
        assert [r["request_id"] for r in await read_stream(client, stream)] == ["r0", "r0"]
        assert await client.keys(f"{stream}:*") == []
    finally:
        await client.delete(stream)
        await client.aclose()
