"""Every sink against its real backend (files, SQLite, the real PostgreSQL and Redis), and open_sink."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

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
from tests.predlog.conftest import Backend, read_jsonl, record


def encoded(*indexes: int) -> list[LogRecord]:
    return [LogRecord.encode(record(i)) for i in indexes]


async def test_a_sink_stores_each_batch_whole_and_in_order(backend: Backend) -> None:
    await backend.sink.open()
    try:
        await backend.sink.write(encoded(0, 1, 2))
        await backend.sink.write(encoded(3))
    finally:
        await backend.sink.aclose()

    stored = await backend.read_back()
    assert [r["request_id"] for r in stored] == ["r0", "r1", "r2", "r3"]
    assert stored[3] == dict(encoded(3)[0]) | {"time": stored[3]["time"]}


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
        ("redis://cache:6379/0?stream=preds&maxlen=500", RedisStreamSink, "redis:preds"),
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
    assert (redis.url, redis.maxlen) == ("redis://cache/0?socket_timeout=2", None)


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
