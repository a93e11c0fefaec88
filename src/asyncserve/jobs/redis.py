"""RedisBroker: Redis Streams and consumer groups, for many API and worker processes on many machines.

Needs ``asyncserve[redis]``. The key layout is documented in :mod:`asyncserve.jobs.keys` and every
state change is a Lua script in :mod:`asyncserve.jobs.redis_scripts`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from asyncserve.exceptions import ConfigurationError
from asyncserve.jobs import keys
from asyncserve.jobs.base import (
    BrokerBase,
    check_claim,
    check_lease,
    check_lease_s,
    check_listing,
    check_retry_in_s,
    encode_attempt,
    encode_result,
    overloaded,
)
from asyncserve.jobs.broker import (
    DEFAULT_KEEP_EXPIRED_S,
    Job,
    JobRequest,
    JobStatus,
    Lease,
    is_whole_number,
    new_job_id,
)
from asyncserve.jobs.redis_scripts import SCRIPTS

logger = logging.getLogger(__name__)

_FLOATS = {"created_at", "updated_at", "started_at", "finished_at", "ttl_s", "not_before", "deadline_at",
           "lease_expires_at"}  # fmt: skip
_INTS = {"priority", "attempts", "max_attempts", "fencing_token"}
_JSON = {"inputs", "result", "webhook_attempts"}
_EXPIRE_BATCH = 500


def _import_redis() -> Any:
    try:
        import redis.asyncio
    except ImportError:
        raise ConfigurationError("the Redis job broker needs redis: pip install 'asyncserve[redis]'") from None
    return redis.asyncio


class RedisBroker(BrokerBase):
    """Jobs in Redis: a stream per model and priority, read by one consumer group of workers.

    ``claim`` is one Lua script: it takes back jobs whose lease expired (``XCLAIM`` of their
    pending entry, found through the ``leases`` sorted set), then reads queued jobs with
    ``XREADGROUP``, priority 9 down to 0 and oldest first across models. The pending-entries list
    is the record of who holds what (``XPENDING``); the job hash, with its fencing token, is the
    authority. Retries wait in a sorted set and return to the back of their stream when due. A
    finished job's record expires from Redis by itself (``PEXPIRE``) should ``expire()`` never run.
    ``events()`` listens on one pub/sub channel per broker over one connection per process; the
    other commands share a pool of at most ``max_connections`` (callers wait for a free one).

    Durability is Redis's: a job is stored when ``enqueue`` returns and survives the asyncserve
    process; it survives a Redis restart only with Redis persistence (``appendonly yes``).
    Needs Redis 6.2 or newer, and a single Redis (not a cluster: the scripts touch many keys).

    Example::

        async with RedisBroker("redis://cache:6379/0", prefix="asyncserve") as broker:
            job, created = await broker.enqueue(JobRequest(model="churn", inputs={"age": 42}))

        # redis-cli XPENDING asyncserve:queue:churn:0 workers
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = keys.DEFAULT_PREFIX,
        max_queued: int | None = None,
        keep_expired_s: float = DEFAULT_KEEP_EXPIRED_S,
        poll_interval_s: float = 1.0,
        max_connections: int = 50,
    ) -> None:
        super().__init__(max_queued=max_queued, keep_expired_s=keep_expired_s, poll_interval_s=poll_interval_s)
        self._redis = _import_redis()
        if not prefix or not prefix.isprintable() or " " in prefix:
            raise ConfigurationError(f"prefix must be a non-empty Redis key prefix without spaces, got {prefix!r}")
        if not is_whole_number(max_connections) or max_connections < 2:
            raise ConfigurationError(f"max_connections must be an integer >= 2, got {max_connections!r}")
        self.url = url
        self.prefix = prefix
        self.max_connections = max_connections
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._listener_lock = asyncio.Lock()

    def __repr__(self) -> str:
        # The URL may hold a password: the repr names the prefix only.
        return f"RedisBroker(prefix={self.prefix!r}, state={self._state.value!r})"

    async def _open(self) -> None:
        # A bounded pool that makes callers wait for a connection, rather than fail, past its size.
        pool = self._redis.BlockingConnectionPool.from_url(self.url, max_connections=self.max_connections)
        client = self._redis.Redis.from_pool(pool)
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self._scripts = {name: client.register_script(source) for name, source in SCRIPTS.items()}

    async def _close(self) -> None:
        await self._stop_listening()
        client, self._client = self._client, None
        await client.aclose()

    async def _script(self, name: str, *args: Any, client: Any = None) -> Any:
        self._check_open()
        return await self._scripts[name](keys=[], args=[self.prefix, self.keep_expired_s, *args], client=client)

    async def _enqueue(self, requests: Sequence[JobRequest]) -> builtins.list[tuple[Job, bool]]:
        specs = orjson.dumps([_spec(request, new_job_id()) for request in requests])
        max_queued = "" if self.max_queued is None else self.max_queued
        answer = await self._script("enqueue", max_queued, specs)
        if answer[0] == b"overloaded":
            raise overloaded(int(answer[1]), int(answer[2]), self.max_queued or 0)
        return [(_job(fields), bool(created)) for created, fields in answer[1]]

    async def get(self, job_id: str) -> Job | None:
        self._check_open()
        fields = await self._client.hgetall(keys.job_key(self.prefix, job_id))
        return _job(fields) if fields else None

    async def list(
        self,
        *,
        status: JobStatus | str | None = None,
        model: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
        owner: str | None = None,
    ) -> tuple[builtins.list[Job], str | None]:
        self._check_open()
        wanted = check_listing(status, cursor, limit, owner)
        index, narrows = self._list_index(wanted, model, owner)
        found: builtins.list[Job] = []
        upper = f"({cursor}" if cursor else "+"
        # When the jobs are filtered after reading, read in bigger chunks: fewer round trips.
        chunk = max(limit + 1, 200) if narrows else limit + 1
        while len(found) <= limit:
            ids = await self._client.zrevrangebylex(index, upper, "-", start=0, num=chunk)
            found += [job for job in await self._read_many(ids) if _matches(job, wanted, model, owner)]
            if len(ids) < chunk:
                break
            upper = f"({ids[-1].decode()}"
        return found[:limit], found[limit - 1].id if len(found) > limit else None

    def _list_index(self, status: JobStatus | None, model: str | None, owner: str | None) -> tuple[str, bool]:
        """The index ``list`` walks (the narrowest at hand), and whether a filter is left to apply."""
        if owner is not None:  # one client's jobs: walking another index could read everyone's
            return keys.owner_key(self.prefix, owner), status is not None or model is not None
        if status is not None:
            return keys.status_key(self.prefix, status.value), model is not None
        if model:
            return keys.model_key(self.prefix, model), False
        return keys.key(self.prefix, keys.JOBS), False

    async def _read_many(self, ids: Sequence[bytes]) -> builtins.list[Job]:
        async with self._client.pipeline(transaction=False) as pipeline:
            for job_id in ids:
                pipeline.hgetall(keys.job_key(self.prefix, job_id.decode()))
            records = await pipeline.execute()
        return [_job(fields) for fields in records if fields]  # a record Redis already dropped is skipped

    async def claim(
        self, worker_id: str, *, limit: int = 1, lease_s: float = 30.0, models: Sequence[str] | None = None
    ) -> builtins.list[Lease]:
        wanted = check_claim(worker_id, limit, lease_s, models)
        granted = await self._script("claim", worker_id, limit, float(lease_s), *(wanted or ()))
        return [Lease.of(_job(fields)) for fields in granted]

    async def renew(self, lease: Lease, lease_s: float) -> bool:
        check_lease(lease)
        check_lease_s(lease_s)
        return bool(await self._script("renew", lease.job_id, lease.token, float(lease_s)))

    async def complete(self, lease: Lease, result: Any) -> bool:
        check_lease(lease)
        result_json = encode_result(lease.job_id, result)
        return bool(await self._script("complete", lease.job_id, lease.token, result_json))

    async def fail(self, lease: Lease, error: str, *, retry_in_s: float | None) -> bool:
        check_lease(lease)
        check_retry_in_s(retry_in_s)
        retry = "" if retry_in_s is None else float(retry_in_s)
        return bool(await self._script("fail", lease.job_id, lease.token, str(error), retry))

    async def release(self, lease: Lease) -> bool:
        check_lease(lease)
        return bool(await self._script("release", lease.job_id, lease.token))

    async def cancel(self, job_id: str) -> Job | None:
        fields = await self._script("cancel", job_id)
        return _job(fields) if fields else None

    async def record_webhook_attempt(self, job_id: str, attempt: Mapping[str, Any]) -> bool:
        return bool(await self._script("record_attempt", job_id, encode_attempt(attempt)))

    async def expire(self) -> int:
        total = 0
        while True:
            expired, seen = await self._script("expire", _EXPIRE_BATCH)
            total += int(expired)
            if int(seen) < _EXPIRE_BATCH:
                return total

    async def stats(self) -> dict[str, int]:
        self._check_open()
        async with self._client.pipeline(transaction=False) as pipeline:
            for status in JobStatus:
                pipeline.zcard(keys.status_key(self.prefix, status.value))
            counts = await pipeline.execute()
        return {status.value: int(count) for status, count in zip(JobStatus, counts, strict=True)}

    # --- events: one subscription per broker, fanned out to the watchers ------------------------

    async def _before_watching(self) -> None:
        async with self._listener_lock:
            if self._listener is not None and not self._listener.done():
                return
            await self._stop_listening()
            pubsub = self._client.pubsub()
            self._pubsub = pubsub
            await pubsub.subscribe(keys.events_channel(self.prefix))
            # Wait for Redis to confirm: from then on no change can be missed.
            async with asyncio.timeout(10):
                while (message := await pubsub.get_message(timeout=1.0)) is None or message["type"] != "subscribe":
                    pass
            self._listener = asyncio.create_task(self._listen(pubsub), name=f"{self!r} events")
            self._listener.add_done_callback(self._listener_done)

    async def _listen(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if message is not None and message["type"] == "message":
                self._watchers.notify([message["data"].decode()])

    def _listener_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # The watchers fall back on polling; the next events() call subscribes again.
            logger.warning("%r: the events subscription failed: %r", self, task.exception())
            self._watchers.notify_all()

    async def _stop_listening(self) -> None:
        listener, pubsub, self._listener, self._pubsub = self._listener, self._pubsub, None, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener
        if pubsub is not None:
            await pubsub.aclose()


def _spec(request: JobRequest, job_id: str) -> dict[str, Any]:
    """What the enqueue script needs to create one job."""
    fields: dict[str, Any] = {
        "id": job_id, "model": request.model, "inputs": request.inputs_json.decode(),
        "priority": str(request.priority), "max_attempts": str(request.max_attempts), "ttl_s": repr(request.ttl_s),
        "version": request.version, "webhook": request.webhook, "idempotency_key": request.idempotency_key,
        "owner": request.owner,
    }  # fmt: skip
    spec: dict[str, Any] = {"id": job_id, "model": request.model, "priority": str(request.priority)}
    spec["fields"] = [item for name, value in fields.items() if value is not None for item in (name, value)]
    if request.idempotency_key is not None:
        spec["idem"] = request.idempotency_key
    if request.owner is not None:
        spec["owner"] = request.owner
    if request.queue_timeout_s is not None:
        spec["timeout"] = request.queue_timeout_s
    return spec


def _job(record: Mapping[bytes, bytes] | Sequence[bytes]) -> Job:
    """A Job from a hash: HGETALL's mapping (redis-py) or its flat list (from a script)."""
    pairs = record.items() if isinstance(record, Mapping) else zip(record[::2], record[1::2], strict=True)
    fields: dict[str, Any] = {}
    for raw_name, raw in pairs:
        name, value = raw_name.decode(), raw.decode()
        if name in _FLOATS:
            fields[name] = float(value)
        elif name in _INTS:
            fields[name] = int(value)
        elif name in _JSON:
            fields[name] = orjson.loads(value)
        elif name == "dead_letter":
            fields[name] = value == "1"
        else:
            fields[name] = value
    return Job.from_dict(fields)


def _matches(job: Job, status: JobStatus | None, model: str | None, owner: str | None) -> bool:
    return (
        (status is None or job.status is status)
        and (model is None or job.model == model)
        and (owner is None or job.owner == owner)
    )
