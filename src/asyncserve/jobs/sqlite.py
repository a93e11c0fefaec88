"""SQLiteBroker: the durable embedded default (stdlib ``sqlite3``, one connection on one thread, WAL)."""

from __future__ import annotations

import asyncio
import builtins
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from asyncserve.jobs import sqlite_ops as ops
from asyncserve.jobs.base import (
    BrokerBase,
    check_claim,
    check_lease,
    check_lease_s,
    check_listing,
    check_retry_in_s,
    encode_attempt,
    encode_result,
)
from asyncserve.jobs.broker import DEFAULT_KEEP_EXPIRED_S, Job, JobRequest, JobStatus, Lease, new_job_id

T = TypeVar("T")
Write = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class SQLiteBroker(BrokerBase):
    """Jobs in one SQLite file, durable across ``kill -9`` and shared by the processes that open it.

    Every ``sqlite3`` call runs on the broker's own thread, on one connection, so the event loop
    never waits on the disk. The database is in WAL mode with ``synchronous=FULL``: when
    ``enqueue`` (or any change) returns, it is in the fsynced log.

    Writes are *group-committed*: the writes that arrive while the thread is busy commit together,
    in one ``BEGIN IMMEDIATE`` transaction with one fsync, each under its own savepoint (so one
    that raises, say ``Overloaded``, is rolled back alone). An idle broker commits a lone write at
    once; a busy one shares each fsync among all the writes waiting for it.

    Several processes (an API and separate workers on one machine) may share the file; the write
    lock serialises them and ``busy_timeout_s`` is how long one waits for another. Changes made
    in this process wake ``events()`` at once; those of other processes within ``poll_interval_s``.

    Example::

        async with SQLiteBroker("var/jobs.db") as broker:
            job, created = await broker.enqueue(JobRequest(model="churn", inputs={"age": 42}))

        # sqlite3 var/jobs.db "select status, count(*) from jobs group by status"
    """

    def __init__(
        self,
        path: Path | str,
        *,
        max_queued: int | None = None,
        keep_expired_s: float = DEFAULT_KEEP_EXPIRED_S,
        poll_interval_s: float = 1.0,
        busy_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(max_queued=max_queued, keep_expired_s=keep_expired_s, poll_interval_s=poll_interval_s)
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.commits = self.writes = 0
        self._thread: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._pending: builtins.list[Write] = []
        self._committing: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"SQLiteBroker({str(self.path)!r}, state={self._state.value!r}, "
            f"writes={self.writes}, commits={self.commits})"
        )

    async def _open(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncserve-jobs-sqlite")
        try:
            self._db = await self._on_thread(ops.connect, self.path, self.busy_timeout_s)
        except BaseException:
            self._thread.shutdown(wait=False)
            self._thread = None
            raise

    async def _close(self) -> None:
        if self._committing is not None:
            await self._committing  # the writes already accepted are committed before closing
        thread, db, self._thread, self._db = self._thread, self._db, None, None
        if thread is None:
            return
        try:
            if db is not None:
                await asyncio.get_running_loop().run_in_executor(thread, db.close)
        finally:
            thread.shutdown(wait=False)  # idle now (its last call was awaited): no join on the loop

    # --- public operations ----------------------------------------------------------------------

    async def _enqueue(self, requests: Sequence[JobRequest]) -> builtins.list[tuple[Job, bool]]:
        # Ids are made here, on the loop, so that they increase in the order enqueue was called.
        batch = [(request, new_job_id()) for request in requests]
        results = await self._write(ops.insert, batch, self.max_queued)
        self._watchers.notify(job.id for job, created in results if created)
        return results

    async def get(self, job_id: str) -> Job | None:
        found = await self._read(ops.select, f"{ops.SELECT} WHERE id = ?", (job_id,))
        return found[0] if found else None

    async def list(
        self,
        *,
        status: JobStatus | str | None = None,
        model: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
        owner: str | None = None,
    ) -> tuple[builtins.list[Job], str | None]:
        wanted = check_listing(status, cursor, limit, owner)
        conditions = {"status = ?": wanted and wanted.value, "model = ?": model, "owner = ?": owner, "id < ?": cursor}
        where = " AND ".join(sql for sql, value in conditions.items() if value is not None) or "1"
        params = [value for value in conditions.values() if value is not None]
        statement = f"{ops.SELECT} WHERE {where} ORDER BY id DESC LIMIT ?"
        page = await self._read(ops.select, statement, (*params, limit + 1))
        return page[:limit], page[limit - 1].id if len(page) > limit else None

    async def claim(
        self, worker_id: str, *, limit: int = 1, lease_s: float = 30.0, models: Sequence[str] | None = None
    ) -> builtins.list[Lease]:
        wanted = check_claim(worker_id, limit, lease_s, models)
        granted, failed = await self._write(ops.claim, worker_id, limit, float(lease_s), wanted)
        self._watchers.notify([*failed, *(job.id for job in granted)])
        return [Lease.of(job) for job in granted]

    async def renew(self, lease: Lease, lease_s: float) -> bool:
        check_lease_s(lease_s)
        return await self._held(lease, "lease_expires_at = :now + :lease_s", lease_s=float(lease_s), notify=False)

    async def complete(self, lease: Lease, result: Any) -> bool:
        result_json = encode_result(lease.job_id, result).decode()
        done = "status = 'succeeded', result = :result, finished_at = :now, updated_at = :now, due_at = :now + ttl_s"
        return await self._held(lease, f"{done}, {ops.UNLEASE}", result=result_json)

    async def fail(self, lease: Lease, error: str, *, retry_in_s: float | None) -> bool:
        check_retry_in_s(retry_in_s)
        check_lease(lease)
        changed = await self._write(ops.fail, lease.job_id, lease.token, str(error), retry_in_s)
        if changed:
            self._watchers.notify([lease.job_id])
        return changed

    async def release(self, lease: Lease) -> bool:
        back = "status = 'queued', attempts = attempts - 1, not_before = :now, updated_at = :now, due_at = deadline_at"
        return await self._held(lease, f"{back}, {ops.UNLEASE}")

    async def cancel(self, job_id: str) -> Job | None:
        job = await self._write(ops.cancel, job_id)
        if job is not None and job.status is JobStatus.CANCELLED:
            self._watchers.notify([job_id])
        return job

    async def record_webhook_attempt(self, job_id: str, attempt: Mapping[str, Any]) -> bool:
        return await self._write(ops.record_attempt, job_id, encode_attempt(attempt).decode())

    async def expire(self) -> int:
        expired, changed = await self._write(ops.expire, self.keep_expired_s)
        self._watchers.notify(changed)
        return expired

    async def stats(self) -> dict[str, int]:
        return await self._read(ops.counts)

    async def _held(self, lease: Lease, assignments: str, *, notify: bool = True, **params: Any) -> bool:
        check_lease(lease)
        changed = await self._write(ops.update_held, assignments, {"id": lease.job_id, "token": lease.token, **params})
        if changed and notify:
            self._watchers.notify([lease.job_id])
        return changed

    # --- the thread: reads in turn, writes group-committed -------------------------------------

    async def _read(self, function: Callable[..., T], *args: Any) -> T:
        self._check_open()
        return await self._on_thread(function, self._connection(), *args)

    async def _write(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(db, *args)`` in the next group commit; return once it is on disk."""
        self._check_open()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((function, args, future))
        if self._committing is None:
            self._committing = asyncio.create_task(self._commit_pending())
        # A caller that gives up does not withdraw its write: it may be committing already.
        return await future

    async def _commit_pending(self) -> None:
        try:
            while self._pending:
                # Everything that arrived while the previous commit ran goes in this one.
                batch, self._pending = self._pending, []
                await self._commit_batch(batch)
        finally:
            self._committing = None
            for _, _, future in self._pending:
                future.cancel()

    async def _commit_batch(self, batch: builtins.list[Write]) -> None:
        try:
            outcomes = await self._on_thread(self._commit, self._connection(), batch)
        except Exception as exc:  # the commit itself failed: so did every write in it
            outcomes = [(False, exc)] * len(batch)
        except BaseException:
            for _, _, future in batch:
                future.cancel()
            raise
        self.commits += 1
        self.writes += len(batch)
        for (_, _, future), (ok, value) in zip(batch, outcomes, strict=True):
            if future.done():  # its caller gave up waiting
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    @staticmethod
    def _commit(db: sqlite3.Connection, batch: builtins.list[Write]) -> builtins.list[tuple[bool, Any]]:
        """On the thread: every write of ``batch`` in one transaction, each under a savepoint."""
        outcomes: builtins.list[tuple[bool, Any]] = []
        db.execute("BEGIN IMMEDIATE")  # the write lock at once: no deadlock between two readers upgrading
        try:
            for function, args, _ in batch:
                db.execute("SAVEPOINT write")
                try:
                    outcomes.append((True, function(db, *args)))
                except Exception as exc:
                    db.execute("ROLLBACK TO write")
                    outcomes.append((False, exc))
                db.execute("RELEASE write")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return outcomes

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"{self!r} is closed")
        return self._db

    async def _on_thread(self, function: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            raise RuntimeError(f"{self!r} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)
