"""What only the Redis broker promises: the documented key layout, streams and consumer groups,
pub/sub events across processes, and surviving the death of the process that enqueued."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from asyncserve.jobs import JobRequest, JobStatus
from asyncserve.jobs import keys as k
from asyncserve.jobs.redis_scripts import SCRIPTS
from tests.jobs.conftest import MakeBroker, Storage, let_pass
from tests.jobs.durability import check_every_reported_job_survives

pytestmark = pytest.mark.redis


def request(inputs: object, **fields: object) -> JobRequest:
    return JobRequest(model="churn", inputs=inputs, **fields)  # type: ignore[arg-type]


@pytest.fixture
async def client(redis_storage: Storage) -> AsyncIterator[redis.asyncio.Redis]:
    assert redis_storage.redis_url is not None
    client = redis.asyncio.Redis.from_url(redis_storage.redis_url, decode_responses=True)
    yield client
    await client.aclose()


def test_the_scripts_use_only_the_shared_names() -> None:
    allowed = set(k.JOB_FIELDS) | {k.QUEUE_FIELD, k.ENTRY_FIELD} | {s.value for s in JobStatus} | {"ok", "overloaded"}
    allowed |= {value for value in vars(k).values() if isinstance(value, str)}  # key segments, the group
    allowed.add("name")  # of a consumer group, in XINFO GROUPS' answer
    for name, source in SCRIPTS.items():
        words = set(re.findall(r"'([a-z_]+)'", source))
        assert words <= allowed, f"the {name} script uses names that keys.py does not define: {words - allowed}"


async def test_jobs_survive_kill_9_of_the_process_that_enqueued_them(
    make_redis_broker: MakeBroker, redis_storage: Storage
) -> None:
    await check_every_reported_job_survives(make_redis_broker, redis_storage.url)


async def test_the_keys_are_laid_out_as_documented(
    make_redis_broker: MakeBroker, redis_storage: Storage, client: redis.asyncio.Redis
) -> None:
    broker, prefix = await make_redis_broker(), str(redis_storage.prefix)
    job, _ = await broker.enqueue(request(1, priority=5, idempotency_key="order-17", ttl_s=60.0))
    queue = k.queue_key(prefix, "churn", 5)

    record = await client.hgetall(k.job_key(prefix, job.id))
    assert set(record) <= {*k.JOB_FIELDS, k.QUEUE_FIELD, k.ENTRY_FIELD}
    assert record[k.QUEUE_FIELD] == queue
    assert [entry[1] for entry in await client.xrange(queue) or []] == [{k.STREAM_ID_FIELD: job.id}]
    assert [group["name"] for group in await client.xinfo_groups(queue)] == [k.GROUP]
    assert await client.get(k.idempotency_key(prefix, "order-17")) == job.id
    for index in (k.key(prefix, k.JOBS), k.status_key(prefix, "queued"), k.model_key(prefix, "churn")):
        assert await client.zrange(index, 0, -1) == [job.id]
    assert await client.smembers(k.key(prefix, k.QUEUES)) == {queue}

    [lease] = await broker.claim("worker-1", lease_s=30)
    assert (await client.xpending(queue, k.GROUP))["consumers"] == [{"name": "worker-1", "pending": 1}]
    assert await client.zscore(k.key(prefix, k.LEASES), job.id) == pytest.approx(lease.expires_at)

    await broker.complete(lease, {"p": 0.5})
    assert await client.xlen(queue) == 0
    assert (await client.xpending(queue, k.GROUP))["pending"] == 0
    assert await client.pttl(k.job_key(prefix, job.id)) > 60_000  # the result expires by itself, too
    assert await client.zrange(k.status_key(prefix, "succeeded"), 0, -1) == [job.id]


async def test_a_dead_consumers_entry_moves_to_the_worker_that_takes_it_over(
    make_redis_broker: MakeBroker, redis_storage: Storage, client: redis.asyncio.Redis
) -> None:
    broker = await make_redis_broker()
    await broker.enqueue(request(1))
    queue = k.queue_key(str(redis_storage.prefix), "churn", 0)
    await broker.claim("dead-worker", lease_s=0.05)
    await let_pass(0.08)

    [lease] = await broker.claim("live-worker", lease_s=30)

    assert lease.job.attempts == 2
    assert (await client.xpending(queue, k.GROUP))["consumers"] == [{"name": "live-worker", "pending": 1}]


async def test_two_brokers_share_the_work_without_granting_a_job_twice(make_redis_broker: MakeBroker) -> None:
    api, worker_a, worker_b = await make_redis_broker(), await make_redis_broker(), await make_redis_broker()
    await api.enqueue_many([request(i, priority=i % 3) for i in range(60)])

    taken: list[str] = []
    while batches := [lease for b in await asyncio.gather(worker_a.claim("a", limit=7), worker_b.claim("b", limit=7))
                      for lease in b]:  # fmt: skip
        taken += [lease.job_id for lease in batches]

    assert len(taken) == len(set(taken)) == 60


async def test_events_reach_a_watcher_in_another_process_by_pub_sub(make_redis_broker: MakeBroker) -> None:
    # The watcher polls only every 30 s: each step below can only arrive by pub/sub.
    watcher, worker = await make_redis_broker(poll_interval_s=30), await make_redis_broker()
    job, _ = await worker.enqueue(request(1))

    async with contextlib.aclosing(watcher.events(job.id)) as events, asyncio.timeout(5):
        assert (await anext(events)).status is JobStatus.QUEUED
        [lease] = await worker.claim("w1")
        assert (await anext(events)).status is JobStatus.RUNNING
        await worker.complete(lease, "ok")
        assert (await anext(events)).result == "ok"


async def test_an_owners_keys_are_laid_out_as_documented(
    make_redis_broker: MakeBroker, redis_storage: Storage, client: redis.asyncio.Redis
) -> None:
    broker, prefix = await make_redis_broker(keep_expired_s=0), str(redis_storage.prefix)
    owner = "Zoë:team"  # 9 bytes in UTF-8, as Lua counts them
    job, _ = await broker.enqueue(request(1, idempotency_key="order-17", owner=owner, ttl_s=0.05))
    plain, _ = await broker.enqueue(request(2, idempotency_key="order-17"))
    owned_key = k.idempotency_key(prefix, "order-17", owner)

    assert owned_key == f"{prefix}:idem-of:9:Zoë:team:order-17"
    assert await client.get(owned_key) == job.id  # the name the script made is the one keys.py makes
    assert await client.get(k.idempotency_key(prefix, "order-17")) == plain.id
    assert await client.hget(k.job_key(prefix, job.id), "owner") == owner
    assert await client.zrange(k.owner_key(prefix, owner), 0, -1) == [job.id]

    [lease] = await broker.claim("w1")
    await broker.complete(lease, "ok")
    assert await client.pttl(owned_key) > 0  # the key expires with its job's record, should expire() not run
    await let_pass(0.08)
    assert await broker.expire() == 1  # keep_expired_s=0: the job is removed at once, and so are its names

    assert await client.exists(owned_key, k.job_key(prefix, job.id)) == 0
    assert await client.zrange(k.owner_key(prefix, owner), 0, -1) == []
    assert await client.get(k.idempotency_key(prefix, "order-17")) == plain.id
