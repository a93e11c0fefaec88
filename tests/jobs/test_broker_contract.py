"""The broker contract: every test runs against MemoryBroker, SQLiteBroker and RedisBroker alike.

Durations a test controls (leases, backoffs, TTLs) are tens of milliseconds, and ``let_pass``
waits them out; everything else synchronises on the brokers' own answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import numpy as np
import pytest

from asyncserve.exceptions import InvalidRequest, Overloaded
from asyncserve.jobs import Broker, Job, JobRequest, JobStatus, Lease
from asyncserve.jobs.base import lease_expired_error
from tests.jobs.conftest import MakeBroker, let_pass

SHORT_S = 0.05
"""A lease, backoff or TTL that the test lets run out."""
PAST_S = 0.08
"""How long the test waits for SHORT_S to be over."""


def request(inputs: object = None, **fields: object) -> JobRequest:
    return JobRequest(model=str(fields.pop("model", "churn")), inputs=inputs, **fields)  # type: ignore[arg-type]


async def next_event(events: AsyncGenerator[Job, None]) -> Job:
    async with asyncio.timeout(5):
        return await anext(events)


async def claim_one(broker: Broker, worker: str = "w1", lease_s: float = 30.0) -> Lease:
    [lease] = await broker.claim(worker, lease_s=lease_s)
    return lease


# --- enqueue, get, list ---------------------------------------------------------------------


async def test_enqueue_stores_a_queued_job_that_get_returns(broker: Broker) -> None:
    submitted = request({"age": 42, "name": "Zoë", "tags": ["a", None]}, version="3", priority=7, ttl_s=60.0,
                        max_attempts=5, webhook="https://example.com/hook")  # fmt: skip
    job, created = await broker.enqueue(submitted)

    assert created
    assert (job.model, job.version, job.priority, job.status) == ("churn", "3", 7, JobStatus.QUEUED)
    assert job.inputs == {"age": 42, "name": "Zoë", "tags": ["a", None]}
    assert (job.attempts, job.max_attempts, job.fencing_token, job.dead_letter) == (0, 5, 0, False)
    assert (job.webhook, job.ttl_s, job.webhook_attempts) == ("https://example.com/hook", 60.0, ())
    assert job.created_at == job.updated_at == job.not_before
    assert (job.started_at, job.finished_at, job.lease_owner, job.lease_expires_at, job.result) == (None,) * 5
    assert await broker.get(job.id) == job
    assert Job.from_dict(job.to_dict()) == job


async def test_get_of_an_unknown_id_is_none(broker: Broker) -> None:
    assert await broker.get("0" * 32) is None


async def test_list_pages_newest_first_with_a_cursor(broker: Broker) -> None:
    jobs = [(await broker.enqueue(request(i)))[0] for i in range(5)]
    newest_first = [job.id for job in reversed(jobs)]

    first, cursor = await broker.list(limit=2)
    second, cursor2 = await broker.list(limit=2, cursor=cursor)
    third, cursor3 = await broker.list(limit=2, cursor=cursor2)

    assert [job.id for job in first + second + third] == newest_first
    assert cursor3 is None
    assert await broker.list(limit=5) == (list(reversed(jobs)), None)


async def test_list_filters_by_status_and_model(broker: Broker) -> None:
    a1, _ = await broker.enqueue(request(1, model="a"))
    b1, _ = await broker.enqueue(request(2, model="b"))
    a2, _ = await broker.enqueue(request(3, model="a"))
    lease = await claim_one(broker)  # a1, the oldest
    await broker.complete(lease, "done")

    assert [job.id for job in (await broker.list(model="a"))[0]] == [a2.id, a1.id]
    assert [job.id for job in (await broker.list(status="queued"))[0]] == [a2.id, b1.id]
    assert [job.id for job in (await broker.list(status=JobStatus.QUEUED, model="a"))[0]] == [a2.id]
    page, cursor = await broker.list(status="queued", model="a", limit=1)
    assert ([job.id for job in page], cursor) == ([a2.id], None)
    assert (await broker.list(status="succeeded", model="b"))[0] == []


async def test_list_refuses_a_bad_cursor_status_or_limit(broker: Broker) -> None:
    with pytest.raises(InvalidRequest, match="cursor must be"):
        await broker.list(cursor="nope")
    with pytest.raises(InvalidRequest, match="status must be one of queued, running"):
        await broker.list(status="done")
    with pytest.raises(InvalidRequest, match="limit must be an integer from 1 to 1000, got 0"):
        await broker.list(limit=0)


async def test_idempotency_key_returns_the_same_job_under_50_concurrent_submits(broker: Broker) -> None:
    answers = await asyncio.gather(*(broker.enqueue(request(i, idempotency_key="order-17")) for i in range(50)))

    assert len({job.id for job, _ in answers}) == 1
    assert sum(created for _, created in answers) == 1
    [(first, _)] = [answer for answer in answers if answer[1]]
    assert all(job == first for job, _ in answers)
    assert (await broker.list())[0] == [first]
    assert (await broker.stats())["queued"] == 1


async def test_enqueue_many_stores_all_in_order_and_honours_idempotency(broker: Broker) -> None:
    earlier, _ = await broker.enqueue(request("x", idempotency_key="k1"))

    jobs = await broker.enqueue_many(
        [
            request(0),
            request(1, idempotency_key="k1"),
            request(2, idempotency_key="k2"),
            request(3, idempotency_key="k2"),
        ]
    )

    assert [job.inputs for job in jobs] == [0, "x", 2, 2]
    assert jobs[1] == earlier
    assert jobs[2] == jobs[3]
    assert jobs[0].id < jobs[2].id
    assert (await broker.stats())["queued"] == 3
    assert await broker.enqueue_many([]) == []


# --- owners ---------------------------------------------------------------------------------


async def test_the_owner_is_stored_and_returned_by_get_list_and_claim(broker: Broker) -> None:
    owned, _ = await broker.enqueue(request(1, owner="team-ä", idempotency_key="k"))
    anonymous, _ = await broker.enqueue(request(2))

    assert (owned.owner, owned.idempotency_key, anonymous.owner) == ("team-ä", "k", None)
    assert await broker.get(owned.id) == owned
    assert Job.from_dict(owned.to_dict()) == owned
    assert [job.owner for job in (await broker.list())[0]] == [None, "team-ä"]
    lease = await claim_one(broker)
    assert (lease.job_id, lease.job.owner) == (owned.id, "team-ä")
    assert await broker.complete(lease, "ok")
    assert (await broker.get(owned.id)).owner == "team-ä"  # type: ignore[union-attr]


async def test_an_idempotency_key_is_per_owner(broker: Broker) -> None:
    a, a_created = await broker.enqueue(request(1, idempotency_key="order-17", owner="a"))
    b, b_created = await broker.enqueue(request(2, idempotency_key="order-17", owner="b"))
    nobody, nobody_created = await broker.enqueue(request(3, idempotency_key="order-17"))

    assert (a_created, b_created, nobody_created) == (True, True, True)
    assert len({a.id, b.id, nobody.id}) == 3
    assert [job.idempotency_key for job in (a, b, nobody)] == ["order-17"] * 3  # the key as the client gave it
    assert await broker.enqueue(request(4, idempotency_key="order-17", owner="a")) == (a, False)
    assert await broker.enqueue(request(5, idempotency_key="order-17", owner="b")) == (b, False)
    assert await broker.enqueue(request(6, idempotency_key="order-17")) == (nobody, False)
    # An owner and key that, run together, would spell another pair's.
    ab, _ = await broker.enqueue(request(7, idempotency_key="c", owner="a:b"))
    bc, _ = await broker.enqueue(request(8, idempotency_key="b:c", owner="a"))
    assert ab.id != bc.id
    assert (await broker.stats())["queued"] == 5


async def test_an_idempotency_key_is_per_owner_under_concurrent_submits(broker: Broker) -> None:
    answers = await asyncio.gather(
        *(broker.enqueue(request(i, idempotency_key="order-17", owner=("a", "b", None)[i % 3])) for i in range(60))
    )

    by_owner = {owner: {job.id for job, _ in answers if job.owner == owner} for owner in ("a", "b", None)}
    assert all(len(ids) == 1 for ids in by_owner.values())
    assert sum(created for _, created in answers) == 3
    assert (await broker.stats())["queued"] == 3


async def test_enqueue_many_honours_idempotency_per_owner(broker: Broker) -> None:
    earlier, _ = await broker.enqueue(request("x", idempotency_key="k1", owner="a"))

    jobs = await broker.enqueue_many(
        [
            request(0, idempotency_key="k1", owner="a"),
            request(1, idempotency_key="k1", owner="b"),
            request(2, idempotency_key="k1"),
            request(3, idempotency_key="k2", owner="b"),
            request(4, idempotency_key="k2", owner="b"),
            request(5, idempotency_key="k2", owner="a"),
        ]
    )

    assert [job.inputs for job in jobs] == ["x", 1, 2, 3, 3, 5]
    assert [job.owner for job in jobs] == ["a", "b", None, "b", "b", "a"]
    assert jobs[0] == earlier
    assert jobs[3] == jobs[4]
    assert len({job.id for job in jobs}) == 5
    assert (await broker.stats())["queued"] == 5


async def test_list_filters_by_owner_across_pages(broker: Broker) -> None:
    owners = ["a", "b", None, "a", "a", "b", "a", None, "a"]
    jobs = [(await broker.enqueue(request(i, owner=owner, model="m" if i % 2 else "n")))[0]
            for i, owner in enumerate(owners)]  # fmt: skip
    of_a = [job.id for job in reversed(jobs) if job.owner == "a"]

    pages, cursor = [], None
    while True:
        page, cursor = await broker.list(owner="a", limit=2, cursor=cursor)
        pages.append([job.id for job in page])
        if cursor is None:
            break

    assert pages == [of_a[0:2], of_a[2:4], of_a[4:]]
    assert [job.id for job in (await broker.list(owner="b"))[0]] == [jobs[5].id, jobs[1].id]
    assert [job.id for job in (await broker.list(owner="a", model="m"))[0]] == [jobs[3].id]
    assert len((await broker.list())[0]) == len(jobs)  # None: every owner's jobs, and those of none
    assert (await broker.list(owner="nobody"))[0] == []

    lease = await claim_one(broker)  # jobs[0], the oldest, of "a"
    await broker.complete(lease, "ok")
    page, cursor = await broker.list(owner="a", status="queued", limit=3)
    assert ([job.id for job in page], cursor) == (of_a[:3], of_a[2])
    page, cursor = await broker.list(owner="a", status="queued", limit=3, cursor=cursor)
    assert ([job.id for job in page], cursor) == ([of_a[3]], None)
    assert [job.id for job in (await broker.list(owner="a", status="succeeded"))[0]] == [jobs[0].id]


async def test_list_refuses_an_owner_that_is_no_string(broker: Broker) -> None:
    with pytest.raises(InvalidRequest, match="owner must be an owner's name"):
        await broker.list(owner=7)  # type: ignore[arg-type]


async def test_an_owners_key_is_free_again_once_its_job_is_removed(make_broker: MakeBroker) -> None:
    broker = await make_broker(keep_expired_s=0)
    job, _ = await broker.enqueue(request(1, ttl_s=SHORT_S, idempotency_key="k", owner="a"))
    other, _ = await broker.enqueue(request(2, idempotency_key="k", owner="b"))
    await broker.complete(await claim_one(broker), "ok")
    await let_pass(PAST_S)

    assert await broker.expire() == 1
    assert await broker.get(job.id) is None
    again, created = await broker.enqueue(request(3, idempotency_key="k", owner="a"))
    assert created
    assert again.id != job.id
    assert await broker.enqueue(request(4, idempotency_key="k", owner="b")) == (other, False)
    assert [j.id for j in (await broker.list(owner="a"))[0]] == [again.id]


async def test_max_queued_refuses_with_overloaded_and_stores_nothing(make_broker: MakeBroker) -> None:
    broker = await make_broker(max_queued=3)
    await broker.enqueue_many([request(1), request(2, idempotency_key="k")])

    with pytest.raises(Overloaded, match="holds 2 queued jobs and takes at most 3"):
        await broker.enqueue_many([request(3), request(4)])
    assert (await broker.stats())["queued"] == 2
    assert (await broker.enqueue(request(5, idempotency_key="k")))[1] is False  # a duplicate still answers
    await broker.enqueue(request(6))
    with pytest.raises(Overloaded):
        await broker.enqueue(request(7))


async def test_inputs_and_results_round_trip_as_json(broker: Broker) -> None:
    job, _ = await broker.enqueue(request(np.arange(3)))
    lease = await claim_one(broker)
    assert await broker.complete(lease, {"scores": np.array([0.5, 0.25]), "label": "ü"})

    done = await broker.get(job.id)
    assert done is not None
    assert (done.inputs, done.result) == ([0, 1, 2], {"scores": [0.5, 0.25], "label": "ü"})
    with pytest.raises(InvalidRequest, match="inputs must be JSON-serialisable"):
        request(object())


# --- claim ----------------------------------------------------------------------------------


async def test_claim_takes_highest_priority_then_oldest_up_to_limit(broker: Broker) -> None:
    jobs = await broker.enqueue_many([request(i, priority=p) for i, p in enumerate([0, 5, 9, 5, 1])])

    first = await broker.claim("w1", limit=3, lease_s=30)
    rest = await broker.claim("w1", limit=10, lease_s=30)

    assert [lease.job.inputs for lease in first] == [2, 1, 3]
    assert [lease.job.inputs for lease in rest] == [4, 0]
    assert await broker.claim("w1", limit=10, lease_s=30) == []
    assert {lease.job_id for lease in first + rest} == {job.id for job in jobs}


async def test_claim_takes_the_oldest_across_models(broker: Broker) -> None:
    await broker.enqueue_many([request(i, model=m) for i, m in enumerate(["a", "b", "a", "c", "b"])])

    taken = await broker.claim("w1", limit=5, lease_s=30)

    assert [lease.job.inputs for lease in taken] == [0, 1, 2, 3, 4]


async def test_claim_grants_a_lease_and_filters_by_model(broker: Broker) -> None:
    await broker.enqueue(request(1, model="a"))
    b, _ = await broker.enqueue(request(2, model="b"))

    [lease] = await broker.claim("worker-7", limit=5, lease_s=30, models=["b", "z"])

    job = lease.job
    assert (lease.job_id, lease.owner, lease.token, lease.expires_at) == (b.id, "worker-7", 1, job.lease_expires_at)
    assert (job.status, job.attempts, job.fencing_token, job.lease_owner) == (JobStatus.RUNNING, 1, 1, "worker-7")
    assert job.started_at is not None
    assert job.lease_expires_at == pytest.approx(job.started_at + 30)
    assert await broker.get(b.id) == job
    assert await broker.claim("worker-8", models=["b"]) == []


async def test_claim_checks_its_arguments(broker: Broker) -> None:
    with pytest.raises(ValueError, match="limit must be an integer from 1 to 1000, got 0"):
        await broker.claim("w1", limit=0)
    with pytest.raises(ValueError, match="lease_s must be a number of seconds > 0"):
        await broker.claim("w1", lease_s=0)
    with pytest.raises(ValueError, match="models must be a non-empty sequence"):
        await broker.claim("w1", models=[])
    with pytest.raises(ValueError, match="worker_id must be a string"):
        await broker.claim("")


# --- leases and fencing tokens --------------------------------------------------------------


async def test_complete_stores_the_result_once(broker: Broker) -> None:
    job, _ = await broker.enqueue(request(1, ttl_s=60.0))
    lease = await claim_one(broker)

    assert await broker.complete(lease, {"p": 0.9})
    assert not await broker.complete(lease, {"p": 0.1})
    assert not await broker.fail(lease, "late", retry_in_s=1)

    done = await broker.get(job.id)
    assert done is not None
    assert (done.status, done.result, done.error, done.lease_owner) == (JobStatus.SUCCEEDED, {"p": 0.9}, None, None)
    assert done.finished_at is not None
    assert done.expires_at == pytest.approx(done.finished_at + 60)


async def test_a_stale_token_after_reclaim_changes_nothing(broker: Broker) -> None:
    job, _ = await broker.enqueue(request(1))
    stale = await claim_one(broker, "w1", lease_s=SHORT_S)
    await let_pass(PAST_S)  # w1 stalls past its lease

    fresh = await claim_one(broker, "w2", lease_s=30)
    assert (fresh.job_id, fresh.token, fresh.job.attempts, fresh.owner) == (job.id, 2, 2, "w2")
    before = await broker.get(job.id)

    assert not await broker.complete(stale, "from w1")
    assert not await broker.fail(stale, "from w1", retry_in_s=0)
    assert not await broker.renew(stale, 30)
    assert not await broker.release(stale)
    assert await broker.get(job.id) == before
    assert await broker.complete(fresh, "from w2")
    assert (await broker.get(job.id)).result == "from w2"  # type: ignore[union-attr]


async def test_a_stale_token_after_cancel_changes_nothing(broker: Broker) -> None:
    job, _ = await broker.enqueue(request(1))
    lease = await claim_one(broker)

    cancelled = await broker.cancel(job.id)

    assert cancelled is not None
    assert cancelled.status is JobStatus.CANCELLED
    assert cancelled.lease_owner is None
    assert cancelled.finished_at is not None
    assert not await broker.complete(lease, "too late")
    assert not await broker.fail(lease, "too late", retry_in_s=0)
    assert not await broker.renew(lease, 30)
    assert await broker.get(job.id) == cancelled
    assert await broker.claim("w2") == []


async def test_renew_keeps_a_lease_alive(broker: Broker) -> None:
    job, _ = await broker.enqueue(request(1))
    lease = await claim_one(broker, lease_s=SHORT_S)

    assert await broker.renew(lease, 30)
    await let_pass(PAST_S)

    assert await broker.claim("w2") == []
    renewed = await broker.get(job.id)
    assert renewed is not None
    assert renewed.lease_expires_at is not None
    assert renewed.lease_expires_at > lease.expires_at + 20
    assert await broker.complete(lease, "ok")


async def test_an_expired_lease_on_the_last_attempt_dead_letters_the_job(broker: Broker) -> None:
    job, _ = await broker.enqueue(request(1, max_attempts=2))
    await claim_one(broker, "w1", lease_s=SHORT_S)
    await let_pass(PAST_S)
    await claim_one(broker, "w2", lease_s=SHORT_S)  # attempt 2 of 2 takes it back
    await let_pass(PAST_S)

    assert await broker.claim("w3") == []
    dead = await broker.get(job.id)
    assert dead is not None
    assert (dead.status, dead.dead_letter, dead.attempts) == (JobStatus.FAILED, True, 2)
    assert dead.error == lease_expired_error(2, 2, "w2")


async def test_retries_wait_their_backoff_then_dead_letter_after_max_attempts(broker: Broker) -> None:
    job, _ = await broker.enqueue(request(1, max_attempts=2))
    lease = await claim_one(broker)

    assert await broker.fail(lease, "timeout talking to the GPU", retry_in_s=SHORT_S)
    waiting = await broker.get(job.id)
    assert waiting is not None
    assert (waiting.status, waiting.error, waiting.lease_owner) == (
        JobStatus.QUEUED,
        "timeout talking to the GPU",
        None,
    )
    assert waiting.not_before == pytest.approx(waiting.updated_at + SHORT_S)
    assert await broker.claim("w1") == []  # still backing off
    await let_pass(PAST_S)

    second = await claim_one(broker)
    assert (second.job.attempts, second.token) == (2, 2)
    assert await broker.fail(second, "out of memory", retry_in_s=SHORT_S)  # no attempts left

    dead = await broker.get(job.id)
    assert dead is not None
    assert (dead.status, dead.dead_letter, dead.error) == (JobStatus.FAILED, True, "out of memory")
    assert dead.finished_at is not None


async def test_fail_without_retry_fails_at_once_without_dead_letter(broker: Broker) -> None:
    job, _ = await broker.enqueue(request(1, max_attempts=5))
    lease = await claim_one(broker)

    assert await broker.fail(lease, "inputs do not match the model", retry_in_s=None)

    failed = await broker.get(job.id)
    assert failed is not None
    assert (failed.status, failed.dead_letter, failed.attempts) == (JobStatus.FAILED, False, 1)
    assert failed.error == "inputs do not match the model"


async def test_release_hands_the_job_back_without_counting_the_attempt(broker: Broker) -> None:
    job, _ = await broker.enqueue(request(1, max_attempts=1))
    lease = await claim_one(broker)

    assert await broker.release(lease)
    assert not await broker.complete(lease, "after release")

    again = await claim_one(broker, "w2")
    assert (again.job_id, again.job.attempts, again.token) == (job.id, 1, 2)


# --- cancel, expiry -------------------------------------------------------------------------


async def test_cancel_stops_queued_jobs_and_leaves_finished_ones(broker: Broker) -> None:
    queued, _ = await broker.enqueue(request(1))
    done, _ = await broker.enqueue(request(2))
    cancelled = await broker.cancel(queued.id)
    assert cancelled is not None
    assert cancelled.status is JobStatus.CANCELLED
    lease = await claim_one(broker)
    assert lease.job_id == done.id  # the cancelled job is never claimed
    await broker.complete(lease, "ok")
    finished = await broker.get(done.id)

    assert await broker.cancel(done.id) == finished
    assert await broker.cancel(queued.id) == cancelled
    assert await broker.cancel("0" * 32) is None


async def test_a_finished_job_expires_after_its_ttl_then_is_removed(make_broker: MakeBroker) -> None:
    broker = await make_broker(keep_expired_s=SHORT_S)
    job, _ = await broker.enqueue(request({"big": "inputs"}, ttl_s=SHORT_S, idempotency_key="k"))
    await broker.complete(await claim_one(broker), {"big": "result"})
    assert await broker.expire() == 0
    await let_pass(PAST_S)

    assert await broker.expire() == 1
    tombstone = await broker.get(job.id)
    assert tombstone is not None
    assert (tombstone.status, tombstone.inputs, tombstone.result) == (JobStatus.EXPIRED, None, None)
    assert (await broker.enqueue(request(2, idempotency_key="k")))[0].id == job.id  # the key is still taken
    await let_pass(PAST_S)

    assert await broker.expire() == 0  # removing a tombstone is not expiring a job
    assert await broker.get(job.id) is None
    assert (await broker.enqueue(request(3, idempotency_key="k")))[1] is True


async def test_a_queued_job_past_its_deadline_expires_unclaimed(make_broker: MakeBroker) -> None:
    broker = await make_broker(keep_expired_s=0)
    late, _ = await broker.enqueue(request(1, queue_timeout_s=SHORT_S))
    patient, _ = await broker.enqueue(request(2, queue_timeout_s=60))
    await let_pass(PAST_S)

    [lease] = await broker.claim("w1", limit=5)
    assert lease.job_id == patient.id
    assert await broker.expire() in (0, 1)  # Redis expires it as its claim meets it, the others here
    assert await broker.get(late.id) is None  # keep_expired_s=0: removed at once
    assert await broker.expire() == 0
    assert await broker.complete(lease, "ok")


# --- events, stats, webhooks, lifecycle -----------------------------------------------------


async def test_events_yield_every_status_change_in_order(broker: Broker) -> None:
    job, _ = await broker.enqueue(request(1, max_attempts=2))
    async with contextlib.aclosing(broker.events(job.id)) as events:
        assert (await next_event(events)).status is JobStatus.QUEUED
        lease = await claim_one(broker)
        assert ((e := await next_event(events)).status, e.attempts) == (JobStatus.RUNNING, 1)
        await broker.fail(lease, "flaky", retry_in_s=0)
        assert ((e := await next_event(events)).status, e.error) == (JobStatus.QUEUED, "flaky")
        lease = await claim_one(broker)
        assert ((e := await next_event(events)).status, e.attempts) == (JobStatus.RUNNING, 2)
        await broker.complete(lease, 42)
        assert ((e := await next_event(events)).status, e.result) == (JobStatus.SUCCEEDED, 42)
        with pytest.raises(StopAsyncIteration):
            await next_event(events)


async def test_events_of_an_unknown_job_end_at_once(broker: Broker) -> None:
    assert [job async for job in broker.events("0" * 32)] == []


async def test_stats_count_jobs_by_status(broker: Broker) -> None:
    jobs = await broker.enqueue_many([request(i) for i in range(4)])
    await broker.complete(await claim_one(broker), "ok")
    await claim_one(broker)
    await broker.cancel(jobs[3].id)

    assert await broker.stats() == {"queued": 1, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 1,
                                    "expired": 0}  # fmt: skip


async def test_webhook_attempts_are_recorded_in_order(broker: Broker) -> None:
    job, _ = await broker.enqueue(request(1, webhook="https://example.com/hook"))
    await broker.complete(await claim_one(broker), "ok")

    assert await broker.record_webhook_attempt(job.id, {"attempt": 1, "status_code": 503, "error": "HTTP 503"})
    assert await broker.record_webhook_attempt(job.id, {"attempt": 2, "status_code": 200, "error": None})
    assert not await broker.record_webhook_attempt("0" * 32, {"attempt": 1})

    recorded = await broker.get(job.id)
    assert recorded is not None
    assert [a["status_code"] for a in recorded.webhook_attempts] == [503, 200]
    assert (recorded.status, recorded.result) == (JobStatus.SUCCEEDED, "ok")  # the job itself is untouched


async def test_misuse_of_the_lifecycle_raises_a_sentence(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    job, _ = await broker.enqueue(request(1))
    events = broker.events(job.id)
    assert (await next_event(events)).status is JobStatus.QUEUED
    waiting = asyncio.ensure_future(anext(events))

    await broker.aclose()

    with pytest.raises(StopAsyncIteration):
        await waiting  # closing the broker ends its event streams
    with pytest.raises(RuntimeError, match="is closed"):
        await broker.get(job.id)
    with pytest.raises(RuntimeError, match="cannot reopen"):
        await broker.open()
    await broker.aclose()  # twice is harmless
