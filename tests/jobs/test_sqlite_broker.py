"""What only the SQLite broker promises: durability, WAL, group commit, and sharing one file."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import pytest

from asyncserve.exceptions import Overloaded
from asyncserve.jobs import JobRequest, JobStatus, SQLiteBroker
from asyncserve.jobs import sqlite_ops as ops
from tests.jobs.conftest import MakeBroker, Storage
from tests.jobs.durability import check_every_reported_job_survives


def request(inputs: object, **fields: object) -> JobRequest:
    return JobRequest(model="churn", inputs=inputs, **fields)  # type: ignore[arg-type]


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
