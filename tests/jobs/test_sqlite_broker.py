"""What only the SQLite broker promises: durability, WAL, group commit, and sharing one file."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from asyncserve.exceptions import Overloaded
from asyncserve.jobs import JobRequest, JobStatus, SQLiteBroker
from asyncserve.jobs import sqlite_ops as ops
from tests.jobs.conftest import MakeBroker, Storage
from tests.jobs.durability import check_every_reported_job_survives


def request(inputs: object, **fields: object) -> JobRequest:
    return JobRequest(model="churn", inputs=inputs, **fields)  # type: ignore[arg-type]


# The schema of the databases made before jobs had an owner, as that version wrote it.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT, inputs TEXT, priority INTEGER NOT NULL,
    status TEXT NOT NULL, result TEXT, error TEXT, dead_letter INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL, webhook TEXT,
    webhook_attempts TEXT NOT NULL DEFAULT '[]', idempotency_key TEXT UNIQUE,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL,
    ttl_s REAL NOT NULL, not_before REAL NOT NULL, deadline_at REAL, lease_owner TEXT,
    fencing_token INTEGER NOT NULL DEFAULT 0, lease_expires_at REAL, due_at REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (priority DESC, not_before, id) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS jobs_leases ON jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, id);
CREATE INDEX IF NOT EXISTS jobs_model ON jobs (model, id);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (due_at) WHERE due_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS job_counts (status TEXT PRIMARY KEY, jobs INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO job_counts VALUES ('queued', 0), ('running', 0), ('succeeded', 0), ('failed', 0),
    ('cancelled', 0), ('expired', 0);
CREATE TRIGGER IF NOT EXISTS jobs_counted_insert AFTER INSERT ON jobs BEGIN
    UPDATE job_counts SET jobs = jobs + 1 WHERE status = NEW.status; END;
CREATE TRIGGER IF NOT EXISTS jobs_counted_update AFTER UPDATE OF status ON jobs
    WHEN OLD.status != NEW.status BEGIN
    UPDATE job_counts SET jobs = jobs - 1 WHERE status = OLD.status;
    UPDATE job_counts SET jobs = jobs + 1 WHERE status = NEW.status; END;
CREATE TRIGGER IF NOT EXISTS jobs_counted_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET jobs = jobs - 1 WHERE status = OLD.status; END;
"""
OLD_QUEUED, OLD_DONE = "0" * 31 + "1", "0" * 31 + "2"


def make_old_database(path: Path) -> None:
    """A database as the version before owners left it: one queued job with a key, one finished job."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.executescript(OLD_SCHEMA)
        db.execute(
            "INSERT INTO jobs (id, model, inputs, priority, status, max_attempts, idempotency_key, created_at, "
            "updated_at, ttl_s, not_before) VALUES (?, 'churn', '{\"age\": 42}', 0, 'queued', 3, 'k', 1, 1, 60, 1)",
            (OLD_QUEUED,),
        )
        db.execute(
            "INSERT INTO jobs (id, model, inputs, priority, status, result, attempts, max_attempts, created_at, "
            "updated_at, finished_at, ttl_s, not_before, due_at) "
            "VALUES (?, 'churn', '1', 0, 'succeeded', '\"ok\"', 1, 3, 2, 3, 3, 1e12, 2, 1e12)",
            (OLD_DONE,),
        )


async def test_jobs_survive_kill_9_of_the_process_that_enqueued_them(
    make_sqlite_broker: MakeBroker, sqlite_storage: Storage
) -> None:
    await check_every_reported_job_survives(make_sqlite_broker, sqlite_storage.url)


async def test_the_database_is_in_wal_mode_and_syncs_every_commit(
    make_sqlite_broker: MakeBroker, sqlite_storage: Storage
) -> None:
    broker = await make_sqlite_broker()
    assert isinstance(broker, SQLiteBroker)

    def journal_mode() -> str:
        with contextlib.closing(sqlite3.connect(sqlite_storage.path)) as other:  # type: ignore[arg-type]
            mode: str = other.execute("PRAGMA journal_mode").fetchone()[0]
            return mode

    assert await asyncio.to_thread(journal_mode) == "wal"
    # synchronous is a setting of the connection: ask the broker's own (2 is FULL).
    assert await broker._read(ops.rows, "PRAGMA synchronous") == [(2,)]


async def test_concurrent_writes_share_their_commits(make_sqlite_broker: MakeBroker) -> None:
    broker = await make_sqlite_broker()
    assert isinstance(broker, SQLiteBroker)
    commits = broker.commits

    answers = await asyncio.gather(*(broker.enqueue(request(i)) for i in range(200)))

    assert len({job.id for job, _ in answers}) == 200
    assert broker.commits - commits < 20  # ~2: the first write alone, then everyone who queued behind it
    assert (await broker.stats())["queued"] == 200


async def test_a_failing_write_rolls_back_alone_in_its_group(make_sqlite_broker: MakeBroker) -> None:
    broker = await make_sqlite_broker(max_queued=3)
    assert isinstance(broker, SQLiteBroker)
    commits = broker.commits

    first, second, third = await asyncio.gather(
        broker.enqueue_many([request(1), request(2)]),
        broker.enqueue_many([request(3), request(4)]),
        broker.enqueue(request(5)),
        return_exceptions=True,
    )

    assert broker.commits == commits + 1  # one transaction for the three writes
    assert isinstance(second, Overloaded)
    assert [job.inputs for job in first] == [1, 2]  # type: ignore[union-attr]
    assert third[0].inputs == 5  # type: ignore[index]
    assert sorted(job.inputs for job in (await broker.list())[0]) == [1, 2, 5]


async def test_closing_commits_the_writes_already_accepted(make_sqlite_broker: MakeBroker) -> None:
    broker = await make_sqlite_broker()
    writes = [asyncio.create_task(broker.enqueue(request(i))) for i in range(20)]
    await asyncio.sleep(0)  # every write is now waiting for its commit

    await broker.aclose()

    ids = [job.id for job, _ in await asyncio.gather(*writes)]
    reopened = await make_sqlite_broker()
    assert [await reopened.get(job_id) is not None for job_id in ids] == [True] * 20


async def test_two_brokers_on_one_file_never_grant_a_job_twice(make_sqlite_broker: MakeBroker) -> None:
    api, worker = await make_sqlite_broker(), await make_sqlite_broker()
    await api.enqueue_many([request(i) for i in range(30)])

    taken: list[str] = []
    while batches := [lease for b in await asyncio.gather(api.claim("a", limit=4), worker.claim("b", limit=4))
                      for lease in b]:  # fmt: skip
        taken += [lease.job_id for lease in batches]

    assert len(taken) == len(set(taken)) == 30
    assert (await worker.enqueue(request(0, idempotency_key="k")))[0] == (
        await api.enqueue(request(1, idempotency_key="k"))
    )[0]  # fmt: skip


async def test_events_see_changes_made_by_another_process(make_sqlite_broker: MakeBroker) -> None:
    watcher, worker = await make_sqlite_broker(poll_interval_s=0.02), await make_sqlite_broker()
    job, _ = await worker.enqueue(request(1))

    async with contextlib.aclosing(watcher.events(job.id)) as events, asyncio.timeout(5):
        assert (await anext(events)).status is JobStatus.QUEUED
        [lease] = await worker.claim("w1")
        assert (await anext(events)).status is JobStatus.RUNNING
        await worker.complete(lease, "ok")
        assert (await anext(events)).result == "ok"


@pytest.mark.parametrize("models", [None, ("churn", "fraud")])
async def test_claim_walks_the_claim_index(make_sqlite_broker: MakeBroker, models: tuple[str, ...] | None) -> None:
    broker = await make_sqlite_broker()
    assert isinstance(broker, SQLiteBroker)
    in_models = "AND model IN ('churn', 'fraud')" if models else ""
    statement = (
        "EXPLAIN QUERY PLAN SELECT id FROM jobs INDEXED BY jobs_claim WHERE status = 'queued' AND not_before <= 1 "
        f"AND (deadline_at IS NULL OR deadline_at > 1) {in_models} ORDER BY priority DESC, not_before, id LIMIT 8"
    )

    plan = " ".join(str(row[-1]) for row in await broker._read(ops.rows, statement))

    assert "USING INDEX jobs_claim" in plan
    assert "TEMP B-TREE" not in plan


async def test_a_database_made_before_owners_is_upgraded_when_opened(
    make_sqlite_broker: MakeBroker, sqlite_storage: Storage
) -> None:
    assert sqlite_storage.path is not None
    await asyncio.to_thread(make_old_database, sqlite_storage.path)

    broker = await make_sqlite_broker()

    old = await broker.get(OLD_QUEUED)
    assert old is not None
    assert (old.owner, old.idempotency_key, old.inputs, old.status) == (None, "k", {"age": 42}, JobStatus.QUEUED)
    assert (await broker.get(OLD_DONE)).result == "ok"  # type: ignore[union-attr]
    assert await broker.stats() == {"queued": 1, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0,
                                    "expired": 0}  # fmt: skip
    assert await broker.enqueue(request(2, idempotency_key="k")) == (old, False)
    mine, created = await broker.enqueue(request(3, idempotency_key="k", owner="a"))
    assert created
    assert (mine.owner, mine.idempotency_key) == ("a", "k")
    assert [job.id for job in (await broker.list(owner="a"))[0]] == [mine.id]
    assert [job.id for job in (await broker.list())[0]] == [mine.id, OLD_DONE, OLD_QUEUED]
    # The counting triggers came back with the new table.
    [lease] = await broker.claim("w1")
    assert lease.job_id == OLD_QUEUED
    assert await broker.complete(lease, "done")
    assert (await broker.stats())["succeeded"] == 2

    again = await make_sqlite_broker()  # opening an upgraded database changes nothing
    assert await again.get(OLD_QUEUED) == await broker.get(OLD_QUEUED)
    assert isinstance(again, SQLiteBroker)
    tables = await again._read(ops.rows, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
    assert tables == [("job_counts",), ("jobs",)]


async def test_idempotency_lookups_and_owner_listings_walk_their_indexes(make_sqlite_broker: MakeBroker) -> None:
    broker = await make_sqlite_broker()
    assert isinstance(broker, SQLiteBroker)

    async def plan(statement: str, *params: object) -> str:
        return " ".join(str(row[-1]) for row in await broker._read(ops.rows, f"EXPLAIN QUERY PLAN {statement}", params))

    lookup = await plan(f"{ops.SELECT} WHERE idempotency_key IN (?, ?)", "k1", "k2")
    listing = await plan(f"{ops.SELECT} WHERE owner = ? AND id < ? ORDER BY id DESC LIMIT ?", "a", "f" * 32, 3)

    assert "USING INDEX jobs_idempotency" in lookup
    assert "USING INDEX jobs_owner" in listing
    assert "TEMP B-TREE" not in listing
