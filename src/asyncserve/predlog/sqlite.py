"""SQLite: the embedded database sink (stdlib ``sqlite3``, on a thread of its own, in WAL mode)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from asyncserve.predlog.records import LogRecord
from asyncserve.predlog.sinks import check_identifier

T = TypeVar("T")


class SQLiteSink:
    """Inserts each batch into ``table`` in one transaction.

    Every ``sqlite3`` call runs on one dedicated thread, so the connection never meets the event
    loop or a second thread. The table is created if missing, with the columns ``id`` (integer
    primary key), ``request_id``, ``model``, ``version``, ``time`` (ISO 8601 text) and ``record``
    (the whole record as JSON text, readable with SQLite's JSON functions).

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
        rows = [(r.request_id, r.model, r.version, r.time, r.json.decode()) for r in records]
        await self._run(self._insert, rows)

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
            connection.execute("PRAGMA busy_timeout=5000")
            connection.execute(
                f'CREATE TABLE IF NOT EXISTS "{self.table}" ('
                "id INTEGER PRIMARY KEY, request_id TEXT, model TEXT, version TEXT, time TEXT, record TEXT NOT NULL)"
            )
            connection.execute(f'CREATE INDEX IF NOT EXISTS "{self.table}_time" ON "{self.table}" (time)')
        except BaseException:
            connection.close()
            raise
        return connection

    def _insert(self, rows: list[tuple[str, str, str, str, str]]) -> None:
        connection = self._connection
        if connection is None:
            raise RuntimeError(f"{self!r} is closed")
        statement = f'INSERT INTO "{self.table}" (request_id, model, version, time, record) VALUES (?, ?, ?, ?, ?)'
        connection.execute("BEGIN")
        try:
            connection.executemany(statement, rows)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
