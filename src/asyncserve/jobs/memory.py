"""MemoryBroker: every job in a dict of this process, with the exact semantics of the durable brokers."""

from __future__ import annotations

import builtins
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import orjson

from asyncserve.jobs.base import (
    BrokerBase,
    check_claim,
    check_lease,
    check_lease_s,
    check_listing,
    check_retry_in_s,
    encode_attempt,
    encode_result,
    lease_expired_error,
    overloaded,
    scoped_key,
)
from asyncserve.jobs.broker import DEFAULT_KEEP_EXPIRED_S, Job, JobRequest, JobStatus, Lease, new_job_id

_FINISHED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class MemoryBroker(BrokerBase):
    """An in-process broker: nothing survives the process. For tests, and for trying things out.

    Like httpx's ``MockTransport``, it is a public fake: it keeps the whole broker contract (the
    same suite tests it), round-trips inputs and results through JSON as the durable brokers do,
    and every method is atomic because none of them awaits while it changes the jobs.

    Example::

        async with MemoryBroker() as broker:
            job, _ = await broker.enqueue(JobRequest(model="churn", inputs={"age": 42}))
            [lease] = await broker.claim("w1", lease_s=5)
            await broker.complete(lease, {"p": 0.9})
            assert (await broker.get(job.id)).result == {"p": 0.9}
    """

    def __init__(
        self,
        *,
        max_queued: int | None = 100_000,
        keep_expired_s: float = DEFAULT_KEEP_EXPIRED_S,
        poll_interval_s: float = 1.0,
    ) -> None:
        super().__init__(max_queued=max_queued, keep_expired_s=keep_expired_s, poll_interval_s=poll_interval_s)
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[tuple[str | None, str], str] = {}
        """Job ids by (owner, idempotency key): a key is unique per owner."""
        self._counts: Counter[JobStatus] = Counter()

    def __repr__(self) -> str:
        return f"MemoryBroker(jobs={len(self._jobs)}, state={self._state.value!r})"

    async def _enqueue(self, requests: Sequence[JobRequest]) -> builtins.list[tuple[Job, bool]]:
        self._check_open()
        fresh = [r for r in requests if (key := scoped_key(r)) is None or key not in self._by_key]
        queued = self._counts[JobStatus.QUEUED]
        if self.max_queued is not None and queued + len(fresh) > self.max_queued:
            raise overloaded(queued, len(fresh), self.max_queued)
        results = [self._insert(request, time.time()) for request in requests]
        self._watchers.notify(job.id for job, created in results if created)
        return results

    def _insert(self, request: JobRequest, now: float) -> tuple[Job, bool]:
        scoped = scoped_key(request)
        if scoped is not None and scoped in self._by_key:
            return self._jobs[self._by_key[scoped]], False
        deadline = None if request.queue_timeout_s is None else now + request.queue_timeout_s
        job = Job(
            id=new_job_id(), model=request.model, version=request.version, inputs=orjson.loads(request.inputs_json),
            priority=request.priority, max_attempts=request.max_attempts, webhook=request.webhook,
            idempotency_key=request.idempotency_key, owner=request.owner, created_at=now, updated_at=now,
            ttl_s=request.ttl_s, not_before=now, deadline_at=deadline,
        )  # fmt: skip
        self._put(job)
        if scoped is not None:
            self._by_key[scoped] = job.id
        return job, True

    async def get(self, job_id: str) -> Job | None:
        self._check_open()
        return self._jobs.get(job_id)

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
        ids = sorted((i for i in self._jobs if cursor is None or i < cursor), reverse=True)
        matching = (job for job in map(self._jobs.__getitem__, ids) if _listed(job, wanted, model, owner))
        page = [job for job, _ in zip(matching, range(limit + 1), strict=False)]
        return page[:limit], page[limit - 1].id if len(page) > limit else None

    async def claim(
        self, worker_id: str, *, limit: int = 1, lease_s: float = 30.0, models: Sequence[str] | None = None
    ) -> builtins.list[Lease]:
        self._check_open()
        wanted = check_claim(worker_id, limit, lease_s, models)
        now = time.time()
        granted: builtins.list[Job] = []
        for job in self._ordered(j for j in self._jobs.values() if _lease_expired(j, now) and _wants(wanted, j)):
            if job.attempts >= job.max_attempts:
                error = lease_expired_error(job.attempts, job.max_attempts, job.lease_owner)
                self._finish(job, JobStatus.FAILED, now, error=error, dead_letter=True)
            elif len(granted) < limit:
                granted.append(self._grant(job, worker_id, now, lease_s))
        for job in self._ordered(j for j in self._jobs.values() if _claimable(j, now) and _wants(wanted, j)):
            if len(granted) == limit:
                break
            granted.append(self._grant(job, worker_id, now, lease_s))
        return [Lease.of(job) for job in granted]

    async def renew(self, lease: Lease, lease_s: float) -> bool:
        check_lease_s(lease_s)
        if (job := self._held(lease)) is None:
            return False
        self._put(replace(job, lease_expires_at=time.time() + lease_s))
        return True

    async def complete(self, lease: Lease, result: Any) -> bool:
        result_json = encode_result(lease.job_id, result)
        if (job := self._held(lease)) is None:
            return False
        self._finish(job, JobStatus.SUCCEEDED, time.time(), result=orjson.loads(result_json))
        return True

    async def fail(self, lease: Lease, error: str, *, retry_in_s: float | None) -> bool:
        check_retry_in_s(retry_in_s)
        if (job := self._held(lease)) is None:
            return False
        now = time.time()
        if retry_in_s is None or job.attempts >= job.max_attempts:
            self._finish(job, JobStatus.FAILED, now, error=str(error), dead_letter=retry_in_s is not None)
        else:
            self._requeue(replace(job, error=str(error)), now, now + retry_in_s)
        return True

    async def release(self, lease: Lease) -> bool:
        if (job := self._held(lease)) is None:
            return False
        now = time.time()
        self._requeue(replace(job, attempts=job.attempts - 1), now, now)
        return True

    async def cancel(self, job_id: str) -> Job | None:
        self._check_open()
        job = self._jobs.get(job_id)
        if job is None or job.status.is_final:
            return job
        return self._finish(job, JobStatus.CANCELLED, time.time())

    async def record_webhook_attempt(self, job_id: str, attempt: Mapping[str, Any]) -> bool:
        self._check_open()
        recorded = orjson.loads(encode_attempt(attempt))
        if (job := self._jobs.get(job_id)) is None:
            return False
        self._put(replace(job, webhook_attempts=(*job.webhook_attempts, recorded)))
        return True

    async def expire(self) -> int:
        self._check_open()
        now, expired = time.time(), 0
        for job in list(self._jobs.values()):
            if _result_expired(job, now) or (_queue_deadline_passed(job, now)):
                self._expire(job, now)
                expired += 1
        for job in list(self._jobs.values()):
            if job.status is JobStatus.EXPIRED and job.updated_at + self.keep_expired_s <= now:
                self._remove(job)
        return expired

    async def stats(self) -> dict[str, int]:
        self._check_open()
        return {status.value: self._counts[status] for status in JobStatus}

    # --- transitions: each one stores the new snapshot and wakes the job's watchers -------------

    def _put(self, job: Job) -> Job:
        if (old := self._jobs.get(job.id)) is not None:
            self._counts[old.status] -= 1
        self._counts[job.status] += 1
        self._jobs[job.id] = job
        self._watchers.notify([job.id])
        return job

    def _held(self, lease: Lease) -> Job | None:
        """The job, if ``lease`` still holds it: running under the lease's fencing token."""
        self._check_open()
        check_lease(lease)
        job = self._jobs.get(lease.job_id)
        if job is None or job.status is not JobStatus.RUNNING or job.fencing_token != lease.token:
            return None
        return job

    def _ordered(self, jobs: Any) -> builtins.list[Job]:
        return sorted(jobs, key=lambda job: (-job.priority, job.not_before, job.id))

    def _grant(self, job: Job, owner: str, now: float, lease_s: float) -> Job:
        return self._put(
            replace(job, status=JobStatus.RUNNING, attempts=job.attempts + 1, fencing_token=job.fencing_token + 1,
                    lease_owner=owner, lease_expires_at=now + lease_s, started_at=now, updated_at=now)
        )  # fmt: skip

    def _requeue(self, job: Job, now: float, not_before: float) -> None:
        self._put(
            replace(job, status=JobStatus.QUEUED, not_before=not_before, lease_owner=None, lease_expires_at=None,
                    updated_at=now)
        )  # fmt: skip

    def _finish(self, job: Job, status: JobStatus, now: float, **changes: Any) -> Job:
        return self._put(
            replace(job, status=status, finished_at=now, updated_at=now, lease_owner=None, lease_expires_at=None,
                    **changes)
        )  # fmt: skip

    def _expire(self, job: Job, now: float) -> None:
        self._put(
            replace(job, status=JobStatus.EXPIRED, inputs=None, result=None, lease_owner=None, lease_expires_at=None,
                    finished_at=job.finished_at or now, updated_at=now)
        )  # fmt: skip

    def _remove(self, job: Job) -> None:
        del self._jobs[job.id]
        self._counts[job.status] -= 1
        if job.idempotency_key is not None:
            self._by_key.pop((job.owner, job.idempotency_key), None)
        self._watchers.notify([job.id])


def _listed(job: Job, status: JobStatus | None, model: str | None, owner: str | None) -> bool:
    return (
        (status is None or job.status is status)
        and (model is None or job.model == model)
        and (owner is None or job.owner == owner)
    )


def _wants(models: tuple[str, ...] | None, job: Job) -> bool:
    return models is None or job.model in models


def _lease_expired(job: Job, now: float) -> bool:
    return job.status is JobStatus.RUNNING and job.lease_expires_at is not None and job.lease_expires_at <= now


def _claimable(job: Job, now: float) -> bool:
    return (
        job.status is JobStatus.QUEUED and job.not_before <= now and (job.deadline_at is None or job.deadline_at > now)
    )


def _result_expired(job: Job, now: float) -> bool:
    return job.status in _FINISHED and job.expires_at is not None and job.expires_at <= now


def _queue_deadline_passed(job: Job, now: float) -> bool:
    return job.status is JobStatus.QUEUED and job.deadline_at is not None and job.deadline_at <= now
