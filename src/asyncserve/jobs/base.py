"""What every broker shares: its lifecycle, the checks on its arguments, and ``events()``.

A backend subclasses ``BrokerBase``, implements ``_enqueue`` and the other abstract methods, and
calls ``self._watchers.notify(ids)`` after every change it makes; ``events()`` re-reads a job
whenever it is told that job changed, and every ``poll_interval_s`` in case a change happened in
another process that could not tell us.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import contextlib
from collections import defaultdict
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, Self

from asyncserve.exceptions import InvalidRequest, Overloaded
from asyncserve.jobs.broker import (
    DEFAULT_KEEP_EXPIRED_S,
    Job,
    JobRequest,
    JobStatus,
    Lease,
    dump_json,
    is_job_id,
    is_seconds,
    is_whole_number,
)

if TYPE_CHECKING:
    from types import TracebackType

MAX_LIST_LIMIT = 1000
MAX_CLAIM_LIMIT = 1000


class BrokerState(Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class Watchers:
    """The ``events()`` iterators waiting in this process, by job id; ``notify`` wakes them."""

    def __init__(self) -> None:
        self._events: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    def __len__(self) -> int:
        return len(self._events)

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._events[job_id].add(event)
        try:
            yield event
        finally:
            waiting = self._events[job_id]
            waiting.discard(event)
            if not waiting:
                del self._events[job_id]

    def notify(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            for event in self._events.get(job_id, ()):
                event.set()

    def notify_all(self) -> None:
        self.notify(list(self._events))


class BrokerBase(abc.ABC):
    """The lifecycle (new -> open -> closed, once), ``enqueue``/``enqueue_many`` and ``events``;
    every other operation of the ``Broker`` protocol is abstract here."""

    def __init__(
        self,
        *,
        max_queued: int | None = None,
        keep_expired_s: float = DEFAULT_KEEP_EXPIRED_S,
        poll_interval_s: float = 1.0,
    ) -> None:
        if max_queued is not None and not (is_whole_number(max_queued) and max_queued >= 1):
            raise ValueError(f"max_queued must be an integer >= 1, or None for no bound, got {max_queued!r}")
        if not (is_seconds(keep_expired_s) and keep_expired_s >= 0):
            raise ValueError(f"keep_expired_s must be a number of seconds >= 0, got {keep_expired_s!r}")
        if not (is_seconds(poll_interval_s) and poll_interval_s > 0):
            raise ValueError(f"poll_interval_s must be a number of seconds > 0, got {poll_interval_s!r}")
        self.max_queued = max_queued
        self.keep_expired_s = float(keep_expired_s)
        self.poll_interval_s = float(poll_interval_s)
        self._state = BrokerState.NEW
        self._watchers = Watchers()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        if self._state is BrokerState.OPEN:
            raise RuntimeError(f"{self!r} is already open")
        if self._state is BrokerState.CLOSED:
            raise RuntimeError(f"cannot reopen {self!r} once it has been closed; make a new broker")
        await self._open()
        self._state = BrokerState.OPEN

    async def aclose(self) -> None:
        """Close the broker; running ``events()`` iterators end. Closing twice is harmless."""
        if self._state is not BrokerState.OPEN:
            self._state = BrokerState.CLOSED
            return
        self._state = BrokerState.CLOSED
        self._watchers.notify_all()
        await self._close()

    async def enqueue(self, request: JobRequest) -> tuple[Job, bool]:
        [(job, created)] = await self._enqueue(_checked_requests([request]))
        return job, created

    async def enqueue_many(self, requests: Sequence[JobRequest]) -> list[Job]:
        if not requests:
            return []
        return [job for job, _ in await self._enqueue(_checked_requests(requests))]

    async def events(self, job_id: str) -> AsyncGenerator[Job, None]:
        self._check_open()
        await self._before_watching()
        with self._watchers.watch(job_id) as changed:
            seen: tuple[JobStatus, int] | None = None
            while self._state is BrokerState.OPEN:
                changed.clear()  # before reading: a change after this read sets it again
                job = await self.get(job_id)
                if job is None:
                    return
                if (job.status, job.attempts) != seen:
                    seen = (job.status, job.attempts)
                    yield job
                if job.status.is_final:
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval_s):
                        await changed.wait()

    @abc.abstractmethod
    async def _enqueue(self, requests: Sequence[JobRequest]) -> builtins.list[tuple[Job, bool]]: ...

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    async def list(
        self,
        *,
        status: JobStatus | str | None = None,
        model: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
        owner: str | None = None,
    ) -> tuple[builtins.list[Job], str | None]: ...

    @abc.abstractmethod
    async def claim(
        self, worker_id: str, *, limit: int = 1, lease_s: float = 30.0, models: Sequence[str] | None = None
    ) -> builtins.list[Lease]: ...

    @abc.abstractmethod
    async def renew(self, lease: Lease, lease_s: float) -> bool: ...

    @abc.abstractmethod
    async def complete(self, lease: Lease, result: Any) -> bool: ...

    @abc.abstractmethod
    async def fail(self, lease: Lease, error: str, *, retry_in_s: float | None) -> bool: ...

    @abc.abstractmethod
    async def release(self, lease: Lease) -> bool: ...

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    async def record_webhook_attempt(self, job_id: str, attempt: Mapping[str, Any]) -> bool: ...

    @abc.abstractmethod
    async def expire(self) -> int: ...

    @abc.abstractmethod
    async def stats(self) -> dict[str, int]: ...

    async def _open(self) -> None:
        """Acquire the backend's resources (a connection, a thread); none by default."""
        return None

    async def _close(self) -> None:
        """Release what ``_open`` acquired; nothing by default."""
        return None

    async def _before_watching(self) -> None:
        """Called before ``events()`` reads the job the first time (Redis subscribes here)."""
        return None

    def _check_open(self) -> None:
        if self._state is BrokerState.NEW:
            raise RuntimeError(f"{self!r} is not open; use 'async with broker:' or call open() first")
        if self._state is BrokerState.CLOSED:
            raise RuntimeError(f"{self!r} is closed")


def _checked_requests(requests: Sequence[JobRequest]) -> Sequence[JobRequest]:
    for request in requests:
        if not isinstance(request, JobRequest):
            raise TypeError(f"enqueue takes JobRequest objects, got {type(request).__name__}")
    return requests


def scoped_key(request: JobRequest) -> tuple[str | None, str] | None:
    """The request's idempotency key within its owner's keys, as ``(owner, key)``; None if it has no key.

    The memory and SQLite brokers look keys up by this pair: the same key of two owners is two keys.
    """
    return None if request.idempotency_key is None else (request.owner, request.idempotency_key)


def check_claim(worker_id: str, limit: int, lease_s: float, models: Sequence[str] | None) -> tuple[str, ...] | None:
    """The claim's ``models`` as a tuple (None: all), after checking every argument."""
    if not (_is_text(worker_id) and 0 < len(worker_id) <= 200):
        raise ValueError(f"worker_id must be a string of 1 to 200 characters, got {worker_id!r}")
    if not (is_whole_number(limit) and 1 <= limit <= MAX_CLAIM_LIMIT):
        raise ValueError(f"limit must be an integer from 1 to {MAX_CLAIM_LIMIT}, got {limit!r}")
    check_lease_s(lease_s)
    if models is None:
        return None
    if isinstance(models, str) or not models or not all(isinstance(model, str) for model in models):
        raise ValueError(f"models must be a non-empty sequence of model names, or None for all, got {models!r}")
    return tuple(models)


def _is_text(value: object) -> bool:
    return isinstance(value, str)


def check_lease_s(lease_s: float) -> None:
    if not (is_seconds(lease_s) and lease_s > 0):
        raise ValueError(f"lease_s must be a number of seconds > 0, got {lease_s!r}")


def check_lease(lease: Lease) -> None:
    if not isinstance(lease, Lease):
        raise TypeError(f"expected the Lease that claim() returned, got {type(lease).__name__}")


def check_retry_in_s(retry_in_s: float | None) -> None:
    if retry_in_s is not None and not (is_seconds(retry_in_s) and retry_in_s >= 0):
        raise ValueError(f"retry_in_s must be a number of seconds >= 0, or None not to retry, got {retry_in_s!r}")


def check_listing(
    status: JobStatus | str | None, cursor: str | None, limit: int, owner: str | None = None
) -> JobStatus | None:
    """``status`` as a JobStatus, after checking the arguments a client sends to ``GET /v1/jobs``."""
    if not (is_whole_number(limit) and 1 <= limit <= MAX_LIST_LIMIT):
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}, got {limit!r}")
    if cursor is not None and not is_job_id(cursor):
        raise InvalidRequest(f"cursor must be a cursor that a previous page returned, got {cursor!r}")
    if owner is not None and not _is_text(owner):
        raise InvalidRequest(f"owner must be an owner's name (a string), or None for every owner, got {owner!r}")
    if status is None:
        return None
    try:
        return JobStatus(status)
    except ValueError:
        raise InvalidRequest(f"status must be one of {', '.join(s.value for s in JobStatus)}, got {status!r}") from None


def overloaded(queued: int, adding: int, max_queued: int) -> Overloaded:
    return Overloaded(
        f"the job queue holds {queued} queued jobs and takes at most {max_queued} (max_queued); "
        f"{adding} more do not fit, retry later"
    )


def encode_result(job_id: str, result: Any) -> bytes:
    """A worker's result as JSON; a result that is not JSON-able is the worker's bug (TypeError)."""
    try:
        return dump_json(result, f"the result of job {job_id}")
    except InvalidRequest as exc:
        raise TypeError(exc.message) from None


def encode_attempt(attempt: Mapping[str, Any]) -> bytes:
    try:
        return dump_json(dict(attempt), "a webhook attempt")
    except InvalidRequest as exc:
        raise TypeError(exc.message) from None


def lease_expired_error(attempts: int, max_attempts: int, owner: str | None) -> str:
    """The error of a job whose last attempt's lease expired (Redis's claim script writes the same)."""
    return f"the lease of attempt {attempts} of {max_attempts} expired: worker {owner} stopped renewing it"
