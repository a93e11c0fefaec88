"""PostgreSQL: each batch is one idempotent ``INSERT`` into a table, records as JSONB (``asyncserve[postgres]``)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from asyncserve.exceptions import ConfigurationError, StartupError
from asyncserve.predlog.records import LogRecord, dumps
from asyncserve.predlog.sinks import check_identifier

COLUMNS = ("log_id", "request_id", "model", "version", "time", "record")
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
    """Inserts each batch with one statement into ``table``, storing each record once per ``log_id``.

    ``open()`` connects and creates the table if it is missing: ``id`` (identity primary key),
    ``log_id`` (unique), ``request_id``, ``model``, ``version``, ``time`` (``timestamptz``,
    indexed) and ``record`` (the whole record, ``jsonb``); a table of an earlier version gets its
    ``log_id`` column and index. A batch is one ``INSERT ... SELECT FROM unnest(...) ON CONFLICT
    (log_id) DO NOTHING``, so writing a batch again (a retry, a replay of the spill file) stores
    only the records that are not there yet.

    The sink holds one connection (the logger writes one batch at a time). A write that fails or
    is cancelled (the logger's write timeout) *terminates* the connection at once: asyncpg would
    otherwise wait for the server to acknowledge a cancel request, which a server that hangs never
    does. The next write connects again, within ``connect_timeout_s``.

    When asyncpg opens a connection it looks for ``~/.pgpass`` and the TLS files in
    ``~/.postgresql/`` with blocking calls (only then: never per batch). A DSN with its password
    and an explicit ``sslmode=disable``, or TLS settings in the DSN, avoids most of that.

    Example::

        sink = PostgresSink("postgresql://app@db:5432/ml", table="predictions")
        async with PredictionLogger(sink) as log:
            log.record(prediction_record(...))

        -- select record -> 'outputs' from predictions where model = 'churn' order by time desc;
    """

    def __init__(self, dsn: str, *, table: str = "predictions", connect_timeout_s: float = 10.0) -> None:
        self._asyncpg = _import_asyncpg()
        if connect_timeout_s <= 0:
            raise ConfigurationError(f"connect_timeout_s must be a number of seconds > 0, got {connect_timeout_s}")
        self.dsn = dsn
        self.table = check_identifier("table", table)
        self.name = f"postgres:{table}"
        self.connect_timeout_s = connect_timeout_s
        self._insert = (
            f'INSERT INTO "{table}" ({", ".join(COLUMNS)}) '
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::jsonb[]) "
            "ON CONFLICT (log_id) DO NOTHING"
        )
        self._open = False
        self._connection: Any = None

    def __repr__(self) -> str:
        # The DSN may hold a password: the repr names the table only.
        return f"PostgresSink(table={self.table!r})"

    async def open(self) -> None:
        if self._open:
            raise RuntimeError(f"{self!r} is already open")
        connection = await self._connect()
        try:
            await self._create_table(connection)
        except BaseException:
            connection.terminate()
            raise
        self._connection, self._open = connection, True

    async def _connect(self) -> Any:
        asyncpg = self._asyncpg
        try:
            return await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
        except asyncpg.InvalidCatalogNameError as exc:
            # The server answers, and says the database is not there: no retry will make it appear.
            fix = "create it (createdb), or name another database in the URL (ASYNCSERVE_PREDICTION_LOG)"
            raise StartupError(f"prediction log {self.name}", str(exc), fix) from exc
        except asyncpg.InvalidAuthorizationSpecificationError as exc:
            fix = "fix the user or password in the URL (ASYNCSERVE_PREDICTION_LOG), or grant it access"
            raise StartupError(f"prediction log {self.name}", str(exc), fix) from exc

    async def _create_table(self, connection: Any) -> None:
        table = self.table
        async with connection.transaction():
            # Several servers may start at once: the lock makes "create if missing" race-free.
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"asyncserve.predlog.{table}")
            await connection.execute(
                f'CREATE TABLE IF NOT EXISTS "{table}" ('
                "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, log_id text, request_id text, model text, "
                "version text, time timestamptz, record jsonb NOT NULL)"
            )
            if not await connection.fetchval(
                "SELECT count(*) > 0 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'log_id' "
                "AND NOT attisdropped",
                f'"{table}"',
            ):
                await connection.execute(f'ALTER TABLE "{table}" ADD COLUMN log_id text')  # a table of 0.x
            await connection.execute(f'CREATE UNIQUE INDEX IF NOT EXISTS "{table}_log_id" ON "{table}" (log_id)')
            await connection.execute(f'CREATE INDEX IF NOT EXISTS "{table}_time" ON "{table}" (time)')

    async def write(self, records: Sequence[LogRecord]) -> None:
        if not self._open:
            raise RuntimeError(f"{self!r} is not open; call open() first")
        columns = (
            [r.log_id for r in records], [_text(r.request_id) for r in records], [_text(r.model) for r in records],
            [_text(r.version) for r in records], [_timestamp(r.time) for r in records], [_jsonb(r) for r in records],
        )  # fmt: skip
        if self._connection is None:
            self._connection = await self._connect()
        connection = self._connection
        try:
            await connection.execute(self._insert, *columns)
        except BaseException:
            # Its state is unknown (a statement may be under way): drop it without a goodbye.
            self._connection = None
            connection.terminate()
            raise

    async def aclose(self) -> None:
        connection, self._connection, self._open = self._connection, None, False
        if connection is None:
            return
        try:
            await connection.close(timeout=CLOSE_TIMEOUT_S)
        except TimeoutError:
            connection.terminate()
        except BaseException:
            connection.terminate()
            raise


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
