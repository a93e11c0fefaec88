"""SQLite: the embedded database sink (stdlib ``sqlite3``, on a thread of its own, in WAL mode)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from asyncserve.predlog.records import LogRecord
from asyncserve.predlog.sinks import check_identifier

T = TypeVar("T")


BUSY_POLL_S = (0.001, 0.05)
"""While another connection holds the write lock, a write tries again after the first delay,
doubling up to the second, until it gets the lock or is cancelled."""


class SQLiteSink:
    """Inserts each batch into ``table`` in one transaction, storing each record once per ``log_id``.

    Every ``sqlite3`` call runs on one dedicated thread, so the connection never meets the event
    loop or a second thread. The table is created if missing, with the columns ``id`` (integer
    primary key), ``log_id`` (unique), ``request_id``, ``model``, ``version``, ``time`` (ISO 8601
    text) and ``record`` (the whole record as JSON text, readable with SQLite's JSON functions); a
    table of an earlier version gets its ``log_id`` column and index. Rows are inserted with ``ON
    CONFLICT (log_id) DO NOTHING``, so a batch written again (a retry, a replay of the spill file)
    stores only the records that are not there yet.

    A write cancelled by the logger's write timeout stops: while it waits for the database's
    write lock (held by another process), it gives up at its next try, and a statement under way
    is interrupted (``Connection.interrupt``) and rolled back.

    Example::

        async with PredictionLogger(SQLiteSink(Path("var/predictions.db"))) as log:
            log.record(prediction_record(...))

        # sqlite3 var/predictions.db "select record ->> '$.outputs' from predictions"
    """

    def __init__(self, path: Path | str, *, table: str = "predictions") -> None:
        self.path = Path(path)
        self.table = check_identifier("table", table)
        self.name = f"sqlite:{self.path}:{table}"
        self._connection: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"SQLiteSink({str(self.path)!r}, table={self.table!r})"

    async def open(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self!r} is already open")
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncserve-predlog-sqlite")
        try:
            self._connection = await self._run(self._connect)
        except BaseException:
            self._thread.shutdown(wait=False)
            self._thread = None
            raise

    async def write(self, records: Sequence[LogRecord]) -> None:
        rows = [(r.log_id, r.request_id, r.model, r.version, r.time, r.json.decode()) for r in records]
        cancelled = threading.Event()
        try:
            await self._run(self._insert, rows, cancelled)
        except asyncio.CancelledError:
            cancelled.set()
            if self._connection is not None:
                self._connection.interrupt()  # made to be called from another thread
            raise

    async def aclose(self) -> None:
        if self._thread is None:
            return
        try:
            if self._connection is not None:
                await self._run(self._connection.close)
        finally:
            self._connection = None
            # The thread is idle (its last job was awaited), so it ends without a join on the loop.
            self._thread.shutdown(wait=False)
            self._thread = None

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        if self._thread is None:
            raise RuntimeError(f"{self!r} is not open; call open() first")
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    # Everything below runs on the sink's thread.

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA busy_timeout=5000")  # for creating the table; writes wait in _begin
            self._create_table(connection)
            connection.execute("PRAGMA busy_timeout=0")
        except BaseException:
            connection.close()
            raise
        return connection

    def _create_table(self, connection: sqlite3.Connection) -> None:
        table = self.table
        connection.execute(
            f'CREATE TABLE IF NOT EXISTS "{table}" (id INTEGER PRIMARY KEY, log_id TEXT, '
            "request_id TEXT, model TEXT, version TEXT, time TEXT, record TEXT NOT NULL)"
        )
        columns = {row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')}
        if "log_id" not in columns:
            connection.execute(f'ALTER TABLE "{table}" ADD COLUMN log_id TEXT')  # a table of an earlier version
        connection.execute(f'CREATE UNIQUE INDEX IF NOT EXISTS "{table}_log_id" ON "{table}" (log_id)')
        connection.execute(f'CREATE INDEX IF NOT EXISTS "{table}_time" ON "{table}" (time)')

    def _insert(self, rows: list[tuple[str, str, str, str, str, str]], cancelled: threading.Event) -> None:
        connection = self._connection
        if connection is None:
            raise RuntimeError(f"{self!r} is closed")
        statement = (
            f'INSERT INTO "{self.table}" (log_id, request_id, model, version, time, record) '
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (log_id) DO NOTHING"
        )
        self._begin(connection, cancelled)
        try:
            connection.executemany(statement, rows)
        except BaseException:
            if connection.in_transaction:  # an interrupted statement may have rolled it back already
                connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def _begin(self, connection: sqlite3.Connection, cancelled: threading.Event) -> None:
        """Take the write lock, waiting for it as long as the write is not cancelled.

        SQLite's own busy timeout would wait its whole length even once the write is cancelled
        (``interrupt`` does not stop it), so the wait is ours.
        """
        delay_s, max_delay_s = BUSY_POLL_S
        while not cancelled.is_set():
            try:
                connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
            cancelled.wait(delay_s)
            delay_s = min(delay_s * 2, max_delay_s)
        raise sqlite3.OperationalError("the write was cancelled while it waited for the database's lock")
