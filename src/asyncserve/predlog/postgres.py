"""PostgreSQL: each batch is one ``COPY`` into a table with the record as JSONB (needs ``asyncserve[postgres]``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from asyncserve.exceptions import ConfigurationError
from asyncserve.predlog.records import LogRecord, dumps
from asyncserve.predlog.sinks import check_identifier

COLUMNS = ("request_id", "model", "version", "time", "record")
CLOSE_TIMEOUT_S = 10.0


def _import_asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise ConfigurationError(
            "the PostgreSQL prediction-log sink needs asyncpg: pip install 'asyncserve[postgres]'"
        ) from None
    return asyncpg


class PostgresSink:
    """Writes each batch with one ``COPY`` (asyncpg's ``copy_records_to_table``) into ``table``.

    ``open()`` creates a small connection pool and the table if it is missing: ``id`` (identity
    primary key), ``request_id``, ``model``, ``version``, ``time`` (``timestamptz``, indexed) and
    ``record`` (the whole record, ``jsonb``). A connection the server dropped is replaced by the
    pool on the next batch, so the sink recovers by itself once the server is back.

    When asyncpg opens a connection it looks for ``~/.pgpass`` and the TLS files in
    ``~/.postgresql/`` with blocking calls (only then: never per batch). A DSN with its password
    and an explicit ``sslmode=disable``, or TLS settings in the DSN, avoids most of that.

    Example::

        sink = PostgresSink("postgresql://app@db:5432/ml", table="predictions")
        async with PredictionLogger(sink) as log:
            log.record(prediction_record(...))

        -- select record -> 'outputs' from predictions where model = 'churn' order by time desc;
    """

    def __init__(self, dsn: str, *, table: str = "predictions", pool_max_size: int = 2) -> None:
        self._asyncpg = _import_asyncpg()
        self.dsn = dsn
        self.table = check_identifier("table", table)
        self.name = f"postgres:{table}"
        self.pool_max_size = pool_max_size
        self._pool: Any = None

    def __repr__(self) -> str:
        # The DSN may hold a password: the repr names the table only.
        return f"PostgresSink(table={self.table!r})"

    async def open(self) -> None:
        if self._pool is not None:
            raise RuntimeError(f"{self!r} is already open")
        pool = await self._asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_max_size)
        try:
            async with pool.acquire() as connection:
                await self._create_table(connection)
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool

    async def _create_table(self, connection: Any) -> None:
        table = self.table
        async with connection.transaction():
            # Several servers may start at once: the lock makes "create if missing" race-free.
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"asyncserve.predlog.{table}")
            await connection.execute(
                f'CREATE TABLE IF NOT EXISTS "{table}" ('
                "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, request_id text, model text, version text, "
                "time timestamptz, record jsonb NOT NULL)"
            )
            await connection.execute(f'CREATE INDEX IF NOT EXISTS "{table}_time" ON "{table}" (time)')

    async def write(self, records: Sequence[LogRecord]) -> None:
        if self._pool is None:
            raise RuntimeError(f"{self!r} is not open; call open() first")
        rows = [(_text(r.request_id), _text(r.model), _text(r.version), _timestamp(r.time), _jsonb(r)) for r in records]
        async with self._pool.acquire() as connection:
            await connection.copy_records_to_table(self.table, records=rows, columns=COLUMNS)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await pool.close()
        except TimeoutError:
            pool.terminate()


def _timestamp(text: str) -> datetime | None:
    """The record's time for the ``timestamptz`` column; a time that does not parse is stored as NULL."""
    with contextlib.suppress(ValueError):
        moment = datetime.fromisoformat(text)
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return None


def _text(value: str) -> str:
    return value.replace("\x00", "\ufffd")


def _jsonb(record: LogRecord) -> str:
    """The record's JSON for a ``jsonb`` column, which refuses ``\\u0000``: NUL characters become U+FFFD."""
    if b"\\u0000" not in record.json:
        return record.json.decode()
    return dumps(_scrub(orjson.loads(record.json))).decode()


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    if isinstance(value, dict):
        return {_text(key): _scrub(item) for key, item in value.items()}
    return value
