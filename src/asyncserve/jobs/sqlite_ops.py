"""The SQLite broker's schema and statements: plain functions on a connection, run on the broker's thread.

Each write function runs inside a transaction its caller opened (``SQLiteBroker`` groups the
writes that wait at the same moment into one ``BEGIN IMMEDIATE``, each under a savepoint).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from asyncserve.jobs.base import lease_expired_error, overloaded, scoped_key
from asyncserve.jobs.broker import Job, JobRequest, JobStatus
from asyncserve.jobs.keys import JOB_FIELDS, SQLITE_COUNTS_TABLE, SQLITE_JOBS_TABLE

Params = Sequence[Any] | Mapping[str, Any]

_JOBS, _COUNTS = SQLITE_JOBS_TABLE, SQLITE_COUNTS_TABLE
COLUMNS = ", ".join(JOB_FIELDS)
SELECT = f"SELECT {COLUMNS} FROM {_JOBS}"
_ORDER = "ORDER BY priority DESC, not_before, id"
_HELD = "id = :id AND status = 'running' AND fencing_token = :token"
UNLEASE = "lease_owner = NULL, lease_expires_at = NULL"
_INSERT = f"INSERT INTO {_JOBS} ({COLUMNS}, due_at) VALUES ({', '.join('?' * (len(JOB_FIELDS) + 1))})"

_UPGRADING = f"{_JOBS}_upgrading"
"""The new table an old database's jobs are copied into (see ``_upgrade``)."""


def _jobs_table(name: str) -> str:
    # due_at is when expire() must next look at a row: a queued job's deadline, the end of a finished
    # job's result TTL, the end of an expired job's tombstone. A running job has none.
    return f"""CREATE TABLE IF NOT EXISTS {name} (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT, inputs TEXT, priority INTEGER NOT NULL,
    status TEXT NOT NULL, result TEXT, error TEXT, dead_letter INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL, webhook TEXT,
    webhook_attempts TEXT NOT NULL DEFAULT '[]', idempotency_key TEXT, owner TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL,
    ttl_s REAL NOT NULL, not_before REAL NOT NULL, deadline_at REAL, lease_owner TEXT,
    fencing_token INTEGER NOT NULL DEFAULT 0, lease_expires_at REAL, due_at REAL
) WITHOUT ROWID"""


_NO_JOBS = ", ".join(f"('{status.value}', 0)" for status in JobStatus)

# An idempotency key is unique per owner. SQLite's UNIQUE treats NULLs as distinct, so the index is
# over ifnull(owner, ''): the jobs without an owner share one scope ('' is no valid owner). The key
# comes first, so that ``idempotency_key IN (...)`` walks the index.
SCHEMA = (
    _jobs_table(_JOBS),
    f"CREATE UNIQUE INDEX IF NOT EXISTS {_JOBS}_idempotency ON {_JOBS} (idempotency_key, ifnull(owner, '')) "
    f"WHERE idempotency_key IS NOT NULL",
    f"CREATE INDEX IF NOT EXISTS {_JOBS}_claim ON {_JOBS} (priority DESC, not_before, id) WHERE status = 'queued'",
    f"CREATE INDEX IF NOT EXISTS {_JOBS}_leases ON {_JOBS} (lease_expires_at) WHERE status = 'running'",
    f"CREATE INDEX IF NOT EXISTS {_JOBS}_status ON {_JOBS} (status, id)",
    f"CREATE INDEX IF NOT EXISTS {_JOBS}_model ON {_JOBS} (model, id)",
    f"CREATE INDEX IF NOT EXISTS {_JOBS}_owner ON {_JOBS} (owner, id) WHERE owner IS NOT NULL",
    f"CREATE INDEX IF NOT EXISTS {_JOBS}_due ON {_JOBS} (due_at) WHERE due_at IS NOT NULL",
    f"CREATE TABLE IF NOT EXISTS {_COUNTS} (status TEXT PRIMARY KEY, jobs INTEGER NOT NULL) WITHOUT ROWID",
    f"INSERT OR IGNORE INTO {_COUNTS} VALUES {_NO_JOBS}",
    f"""CREATE TRIGGER IF NOT EXISTS {_JOBS}_counted_insert AFTER INSERT ON {_JOBS} BEGIN
    UPDATE {_COUNTS} SET jobs = jobs + 1 WHERE status = NEW.status; END""",
    f"""CREATE TRIGGER IF NOT EXISTS {_JOBS}_counted_update AFTER UPDATE OF status ON {_JOBS}
    WHEN OLD.status != NEW.status BEGIN
    UPDATE {_COUNTS} SET jobs = jobs - 1 WHERE status = OLD.status;
    UPDATE {_COUNTS} SET jobs = jobs + 1 WHERE status = NEW.status; END""",
    f"""CREATE TRIGGER IF NOT EXISTS {_JOBS}_counted_delete AFTER DELETE ON {_JOBS} BEGIN
    UPDATE {_COUNTS} SET jobs = jobs - 1 WHERE status = OLD.status; END""",
)
"""The schema's statements, each one idempotent (``IF NOT EXISTS``)."""


def connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """Open (creating or upgrading if need be) the database: WAL, ``synchronous=FULL``, the schema."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_s)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")  # a commit is on disk (the WAL fsynced) when it returns
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        _create_schema(db)
    except BaseException:
        db.close()
        raise
    return db


def _create_schema(db: sqlite3.Connection) -> None:
    # One transaction, so that two processes creating (or upgrading) a file at once do not trip on
    # each other: the second waits for the write lock, then finds the work done.
    db.execute("BEGIN IMMEDIATE")
    try:
        _upgrade(db)
        for statement in SCHEMA:
            db.execute(statement)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _upgrade(db: sqlite3.Connection) -> None:
    """Bring a database made before jobs had an owner up to the schema; nothing for a new or current one.

    Adding the ``owner`` column is not enough: the old table declared ``idempotency_key UNIQUE``,
    which would stop two owners from using one key, and SQLite cannot drop a column's constraint.
    So the jobs move to a new table (the procedure the SQLite manual gives for changing a table's
    constraints); ``SCHEMA`` then recreates the indexes and triggers that went with the old one.
    The counts stay right: the new table has no triggers while it fills, and ``DROP TABLE`` fires none.
    """
    columns = {name for (_, name, *_) in rows(db, f"PRAGMA table_info({_JOBS})")}
    if not columns or "owner" in columns:
        return
    shared = ", ".join(name for name in (*JOB_FIELDS, "due_at") if name in columns)
    db.execute(f"DROP TABLE IF EXISTS {_UPGRADING}")
    db.execute(_jobs_table(_UPGRADING))
    db.execute(f"INSERT INTO {_UPGRADING} ({shared}) SELECT {shared} FROM {_JOBS}")
    db.execute(f"DROP TABLE {_JOBS}")
    db.execute(f"ALTER TABLE {_UPGRADING} RENAME TO {_JOBS}")


def rows(db: sqlite3.Connection, statement: str, params: Params = ()) -> list[tuple[Any, ...]]:
    return db.execute(statement, params).fetchall()


def select(db: sqlite3.Connection, statement: str, params: Params = ()) -> list[Job]:
    return [_job(row) for row in rows(db, statement, params)]


def execute(db: sqlite3.Connection, statement: str, params: Params) -> int:
    return db.execute(statement, params).rowcount


def update_held(db: sqlite3.Connection, assignments: str, params: Mapping[str, Any]) -> bool:
    """One UPDATE of a job while it runs under ``params["token"]`` (``:now`` is the time); True if it did."""
    return execute(db, f"UPDATE {_JOBS} SET {assignments} WHERE {_HELD}", {"now": time.time(), **params}) == 1


def insert(
    db: sqlite3.Connection, requests: list[tuple[JobRequest, str]], max_queued: int | None
) -> list[tuple[Job, bool]]:
    now, results = time.time(), []
    seen = _known_keys(db, [r.idempotency_key for r, _ in requests if r.idempotency_key is not None])
    _check_room(db, max_queued, sum(scoped_key(r) not in seen for r, _ in requests))
    for request, job_id in requests:
        scoped = scoped_key(request)
        if scoped is not None and scoped in seen:
            results.append((seen[scoped], False))
            continue
        job = _new_job(request, job_id, now)
        db.execute(_INSERT, (*_row(job, request), job.deadline_at))
        if scoped is not None:
            seen[scoped] = job
        results.append((job, True))
    return results


def _known_keys(db: sqlite3.Connection, keys: list[str]) -> dict[tuple[str | None, str], Job]:
    """The jobs that hold any of ``keys``, whoever their owner, by (owner, key)."""
    if not keys:
        return {}
    jobs = select(db, f"{SELECT} WHERE idempotency_key IN ({', '.join('?' * len(keys))})", keys)
    return {(job.owner, job.idempotency_key): job for job in jobs if job.idempotency_key is not None}


def _check_room(db: sqlite3.Connection, max_queued: int | None, adding: int) -> None:
    if max_queued is None or adding == 0:
        return
    [(queued,)] = rows(db, f"SELECT jobs FROM {_COUNTS} WHERE status = 'queued'")
    if queued + adding > max_queued:
        raise overloaded(queued, adding, max_queued)


def claim(
    db: sqlite3.Connection, owner: str, limit: int, lease_s: float, models: tuple[str, ...] | None
) -> tuple[list[Job], list[str]]:
    """The jobs granted to ``owner``, and the ids of jobs that failed because their last lease expired."""
    params: dict[str, Any] = {"now": time.time(), **{f"m{i}": model for i, model in enumerate(models or ())}}
    in_models = f"AND model IN ({', '.join(f':m{i}' for i in range(len(models)))})" if models else ""
    # First the jobs of dead workers (their leases expired): they have waited longest. INDEXED BY, because
    # on a young table the planner would rather use jobs_status and sort every queued job.
    expired = select(db, f"{SELECT} INDEXED BY {_JOBS}_leases WHERE status = 'running' AND lease_expires_at <= :now "
                         f"{in_models} {_ORDER}", params)  # fmt: skip
    exhausted = [job for job in expired if job.attempts >= job.max_attempts]
    for job in exhausted:
        error = lease_expired_error(job.attempts, job.max_attempts, job.lease_owner)
        db.execute(f"UPDATE {_JOBS} SET status = 'failed', dead_letter = 1, error = :error, finished_at = :now, "
                   f"updated_at = :now, due_at = :now + ttl_s, {UNLEASE} WHERE id = :id",
                   {"error": error, "now": params["now"], "id": job.id})  # fmt: skip
    ids = [job.id for job in expired if job not in exhausted][:limit]
    if len(ids) < limit:
        queued = rows(db, f"SELECT id FROM {_JOBS} INDEXED BY {_JOBS}_claim WHERE status = 'queued' "
                          f"AND not_before <= :now AND (deadline_at IS NULL OR deadline_at > :now) {in_models} "
                          f"{_ORDER} LIMIT :room", {**params, "room": limit - len(ids)})  # fmt: skip
        ids += [job_id for (job_id,) in queued]
    return _grant(db, ids, owner, params["now"], lease_s), [job.id for job in exhausted]


def _grant(db: sqlite3.Connection, ids: list[str], owner: str, now: float, lease_s: float) -> list[Job]:
    if not ids:
        return []
    granted = rows(
        db,
        f"UPDATE {_JOBS} SET status = 'running', attempts = attempts + 1, fencing_token = fencing_token + 1, "
        f"lease_owner = ?, lease_expires_at = ?, started_at = ?, updated_at = ?, due_at = NULL "
        f"WHERE id IN ({', '.join('?' * len(ids))}) RETURNING {COLUMNS}",
        (owner, now + lease_s, now, now, *ids),
    )
    order = {job_id: index for index, job_id in enumerate(ids)}
    return sorted(map(_job, granted), key=lambda job: order[job.id])


def fail(db: sqlite3.Connection, job_id: str, token: int, error: str, retry_in_s: float | None) -> bool:
    params = {"id": job_id, "token": token, "error": error, "now": time.time()}
    held = rows(db, f"SELECT attempts, max_attempts FROM {_JOBS} WHERE {_HELD}", params)
    if not held:
        return False
    [(attempts, max_attempts)] = held
    if retry_in_s is None or attempts >= max_attempts:
        db.execute(f"UPDATE {_JOBS} SET status = 'failed', dead_letter = :dead_letter, error = :error, "
                   f"finished_at = :now, updated_at = :now, due_at = :now + ttl_s, {UNLEASE} WHERE id = :id",
                   {**params, "dead_letter": int(retry_in_s is not None)})  # fmt: skip
    else:
        db.execute(f"UPDATE {_JOBS} SET status = 'queued', error = :error, not_before = :now + :retry_in_s, "
                   f"updated_at = :now, due_at = deadline_at, {UNLEASE} WHERE id = :id",
                   {**params, "retry_in_s": retry_in_s})  # fmt: skip
    return True


def cancel(db: sqlite3.Connection, job_id: str) -> Job | None:
    db.execute(f"UPDATE {_JOBS} SET status = 'cancelled', finished_at = :now, updated_at = :now, "
               f"due_at = :now + ttl_s, {UNLEASE} WHERE id = :id AND status IN ('queued', 'running')",
               {"now": time.time(), "id": job_id})  # fmt: skip
    found = select(db, f"{SELECT} WHERE id = ?", (job_id,))
    return found[0] if found else None


def record_attempt(db: sqlite3.Connection, job_id: str, attempt_json: str) -> bool:
    statement = f"UPDATE {_JOBS} SET webhook_attempts = json_insert(webhook_attempts, '$[#]', json(?)) WHERE id = ?"
    return execute(db, statement, (attempt_json, job_id)) == 1


def expire(db: sqlite3.Connection, keep_expired_s: float) -> tuple[int, list[str]]:
    """How many jobs expired now, and the ids of every job changed (expired or removed)."""
    params = {"now": time.time(), "keep": keep_expired_s}
    # Expire first, then remove: with keep_expired_s=0 a job expired now is removed now.
    expired = rows(
        db,
        f"UPDATE {_JOBS} SET status = 'expired', inputs = NULL, result = NULL, {UNLEASE}, "
        f"finished_at = COALESCE(finished_at, :now), updated_at = :now, due_at = :now + :keep "
        f"WHERE due_at <= :now AND status IN ('queued', 'succeeded', 'failed', 'cancelled') RETURNING id",
        params,
    )
    removed = rows(db, f"DELETE FROM {_JOBS} WHERE due_at <= :now AND status = 'expired' RETURNING id", params)
    return len(expired), [job_id for (job_id,) in expired + removed]


def counts(db: sqlite3.Connection) -> dict[str, int]:
    found = {status.value: 0 for status in JobStatus}
    found.update({str(status): int(jobs) for status, jobs in rows(db, f"SELECT status, jobs FROM {_COUNTS}")})
    return found


def _new_job(request: JobRequest, job_id: str, now: float) -> Job:
    deadline = None if request.queue_timeout_s is None else now + request.queue_timeout_s
    return Job(
        id=job_id, model=request.model, version=request.version, inputs=orjson.loads(request.inputs_json),
        priority=request.priority, max_attempts=request.max_attempts, webhook=request.webhook,
        idempotency_key=request.idempotency_key, owner=request.owner, created_at=now, updated_at=now,
        ttl_s=request.ttl_s, not_before=now, deadline_at=deadline,
    )  # fmt: skip


def _row(job: Job, request: JobRequest) -> tuple[Any, ...]:
    values = job.to_dict()
    values.update(inputs=request.inputs_json.decode(), result=None, webhook_attempts="[]", dead_letter=0)
    return tuple(values[name] for name in JOB_FIELDS)


def _job(row: Sequence[Any]) -> Job:
    fields = dict(zip(JOB_FIELDS, row, strict=True))
    for name in ("inputs", "result"):
        fields[name] = None if fields[name] is None else orjson.loads(fields[name])
    fields["webhook_attempts"] = orjson.loads(fields["webhook_attempts"])
    fields["dead_letter"] = bool(fields["dead_letter"])
    return Job.from_dict(fields)
