"""Worker: claims jobs from a broker under leases, runs them through a handler, and reports each outcome.

A worker keeps up to ``concurrency`` handler calls running at once (claimed ``claim_batch`` at a
time), so many jobs reach a model's dynamic batcher together. One background task renews every
lease it holds at a third of ``lease_s``; a lease that cannot be renewed (the job was cancelled,
or another worker took it over after the lease lapsed) cancels its handler, and the job is left
to whoever holds it now. A failed handler is retried with exponential backoff and jitter, except
for a bad input (``InvalidRequest``, ``SchemaViolation``, ``ModelNotFound``), which can never
succeed; the broker dead-letters a job whose attempts run out. A finished job (succeeded, or
failed for good) with a webhook is handed to ``WebhookDelivery``, whose failures never touch the job.

Shutdown (``aclose``): stop claiming, let running handlers finish for up to ``timeout_s``, cancel
the rest, stop renewing, then ``release`` each unfinished job so another worker runs it at once,
its attempt uncounted.

Example::

    async def handle(job: Job) -> Any:
        return await pipeline.run_job(job)    # decode, predict through the batcher, encode

    async with open_broker("sqlite:///var/jobs.db") as broker, Worker(broker, handle) as worker:
        await worker.run()                    # until worker.stop(); run(burst=True) drains and returns
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, Self

from asyncserve.exceptions import InvalidRequest, ModelNotFound, Unavailable
from asyncserve.jobs.base import MAX_CLAIM_LIMIT, check_claim
from asyncserve.jobs.broker import Broker, Job, JobStatus, Lease, is_seconds, is_whole_number

if TYPE_CHECKING:
    from asyncserve.jobs.webhooks import WebhookAttempt, WebhookDelivery

logger = logging.getLogger(__name__)

PERMANENT_ERRORS: tuple[type[Exception], ...] = (InvalidRequest, ModelNotFound)
"""Errors that no retry can cure (a bad input, an unknown model): the job fails at once."""
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0
_JITTER = random.Random()
"""The retries' jitter, apart from the process-wide generator: code that seeds ``random`` (a model, a test
framework) neither lines up every worker's retries nor sees its own sequence moved by them."""
_COUNTERS = ("claimed", "succeeded", "failed", "retried", "dead_lettered", "cancelled", "released", "lost", "expired")


class JobHandler(Protocol):
    """What a worker calls for each job: returns the job's JSON-able result, or raises."""

    def __call__(self, job: Job, /) -> Awaitable[Any]: ...


class WorkerState(Enum):
    NEW = "new"
    OPEN = "open"
    RUNNING = "running"
    STOPPING = "stopping"
    CLOSED = "closed"


_RUN_MISUSE = {
    WorkerState.NEW: "the worker is not open; use 'async with Worker(...) as worker: await worker.run()'",
    WorkerState.RUNNING: "{0!r} is running already; a worker runs one loop at a time",
    WorkerState.CLOSED: "{0!r} is closed; make a new Worker",
}


@dataclass(eq=False)
class _Running:
    """A job this worker holds: its lease, and whether its handler is still running."""

    lease: Lease
    started: float
    handling: bool = True
    lost: bool = False
    """The lease was lost and the handler cancelled: nothing to hand back."""


class Worker:
    """Runs jobs from ``broker`` through ``handler``; an async context manager.

    Args:
        broker: an open broker (the worker neither opens nor closes it).
        handler: ``async def handler(job) -> result``; many calls run at once.
        worker_id: the lease owner's name (default: host, pid and a random suffix).
        concurrency: the most handler calls running at once.
        claim_batch: the most jobs claimed in one ``claim`` (never more than the free slots).
        lease_s: each lease's length; renewed every ``lease_s / 3`` while the handler runs.
        base_backoff_s, max_backoff_s: a retry waits ``base_backoff_s * 2 ** (attempt - 1)``, capped at
            ``max_backoff_s``, times a random factor in [0.5, 1] (at least an ``Unavailable``'s retry_after_s).
        poll_interval_s: how long an idle worker waits before asking the broker again.
        models: claim only jobs for these models (default: all).
        webhooks: sends the webhooks of finished jobs (default: none are sent).
        expire_every_s: how often to call ``broker.expire()``.

    Usage::

        async with Worker(broker, handle, concurrency=32) as worker:
            loop.add_signal_handler(signal.SIGTERM, worker.stop)
            await worker.run()
        # leaving the block waited for running jobs and handed the rest back
    """

    def __init__(
        self,
        broker: Broker,
        handler: JobHandler,
        *,
        worker_id: str | None = None,
        concurrency: int = 16,
        claim_batch: int = 16,
        lease_s: float = 30.0,
        max_backoff_s: float = 60.0,
        base_backoff_s: float = 1.0,
        poll_interval_s: float = 0.05,
        models: Sequence[str] | None = None,
        webhooks: WebhookDelivery | None = None,
        expire_every_s: float = 5.0,
    ) -> None:
        worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        _require(is_whole_number(claim_batch) and 1 <= claim_batch <= MAX_CLAIM_LIMIT, "claim_batch",
                 f"an integer from 1 to {MAX_CLAIM_LIMIT}", claim_batch)  # fmt: skip
        self.models = check_claim(worker_id, claim_batch, lease_s, models)
        _require(callable(handler), "handler", "an async function of a Job", handler)
        _require(is_whole_number(concurrency) and concurrency >= 1, "concurrency", "an integer >= 1", concurrency)
        for name, value in (("base_backoff_s", base_backoff_s), ("max_backoff_s", max_backoff_s)):
            _require(is_seconds(value) and value >= 0, name, "a number of seconds >= 0", value)
        _require(max_backoff_s >= base_backoff_s, "max_backoff_s", "a number of seconds >= base_backoff_s",
                 max_backoff_s)  # fmt: skip
        for name, value in (("poll_interval_s", poll_interval_s), ("expire_every_s", expire_every_s)):
            _require(is_seconds(value) and value > 0, name, "a number of seconds > 0", value)
        self.broker, self.handler, self.worker_id = broker, handler, worker_id
        self.concurrency, self.claim_batch, self.lease_s = concurrency, claim_batch, float(lease_s)
        self.base_backoff_s, self.max_backoff_s = float(base_backoff_s), float(max_backoff_s)
        self.poll_interval_s, self.expire_every_s, self.webhooks = poll_interval_s, expire_every_s, webhooks
        self.claimed = self.succeeded = self.failed = self.retried = self.dead_lettered = 0
        self.cancelled = self.released = self.lost = self.expired = 0
        self._state = WorkerState.NEW
        self._running: dict[asyncio.Task[None], _Running] = {}  # owns every job task
        self._renewer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # a slot freed up, or stop() was called
        self._loop_idle = asyncio.Event()  # run() is not inside its loop
        self._loop_idle.set()
        self._next_expire_at = 0.0
        self._claim_failures = 0

    def __repr__(self) -> str:
        counters = " ".join(f"{name}={value}" for name, value in self.statistics().items())
        return f"<Worker {self.worker_id} {self._state.value} {counters}>"

    @property
    def state(self) -> WorkerState:
        return self._state

    def statistics(self) -> dict[str, int]:
        """The counters since the worker was built, and how many jobs it runs now."""
        return {**{name: getattr(self, name) for name in _COUNTERS}, "running": len(self._running)}

    async def __aenter__(self) -> Self:
        if self._state is not WorkerState.NEW:
            raise RuntimeError(f"Cannot reopen a worker that is {self._state.value}; make a new Worker")
        self._state = WorkerState.OPEN
        self._renewer = asyncio.create_task(self._renew_forever(), name=f"{self.worker_id} lease renewer")
        self._renewer.add_done_callback(_log_crash)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def run(self, *, burst: bool = False) -> None:
        """Claim and run jobs until ``stop()`` (or ``aclose()``); jobs still running when it returns
        are left to ``aclose``.

        With ``burst=True``, return instead once nothing runs and no job for ``models`` is queued
        (jobs waiting out a retry's backoff included). A broker error while claiming is logged
        and retried, except in burst mode, where it is raised.
        """
        if not self._begin_run():
            return
        try:
            while self._state is WorkerState.RUNNING:
                self._wake.clear()  # before looking: a slot freed from now on wakes the wait below
                await self._expire_if_due()
                if await self._claim_more(burst):
                    continue  # a full batch: there may be more waiting
                if burst and not self._running and not await self._queued_left():
                    return
                await self._idle(self.poll_interval_s)
        finally:
            if self._state is WorkerState.RUNNING:
                self._state = WorkerState.OPEN
            self._loop_idle.set()

    def stop(self) -> None:
        """Stop claiming: ``run()`` returns soon after. Safe from a loop.add_signal_handler callback, and twice."""
        if self._state in (WorkerState.OPEN, WorkerState.RUNNING):
            self._state = WorkerState.STOPPING
            self._wake.set()

    async def aclose(self, timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
        """Shut down gracefully within ``timeout_s``; no job is left running or lost.

        In order: stop claiming (and wait for ``run()`` to leave its loop); let running handlers
        finish until the time is up; cancel the rest; stop renewing leases; release each job whose
        handler was cancelled, so another worker runs it at once. Closing twice is harmless.
        """
        if self._state in (WorkerState.NEW, WorkerState.CLOSED):
            self._state = WorkerState.CLOSED
            return
        self.stop()
        deadline = asyncio.get_running_loop().time() + timeout_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._loop_idle.wait()
                if self._running:
                    await asyncio.wait(set(self._running))
        unfinished = [entry for entry in self._running.values() if not entry.lost]
        for task in self._running:
            task.cancel()  # a handler that swallows CancelledError delays shutdown: handlers must not
        await asyncio.gather(*self._running, return_exceptions=True)
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        self._state = WorkerState.CLOSED
        if unfinished:
            released = await self._hand_back(unfinished)
            logger.warning("%s: %d jobs still running %gs after shutdown began were cancelled, %d released to the "
                           "broker", self.worker_id, len(unfinished), timeout_s, released)  # fmt: skip

    def retry_delay_s(self, attempt: int, error: BaseException | None = None) -> float:
        """The backoff before retrying after failed attempt number ``attempt`` (1 for the first)."""
        delay = min(self.base_backoff_s * 2.0 ** (attempt - 1), self.max_backoff_s) * _JITTER.uniform(0.5, 1.0)
        if isinstance(error, Unavailable):
            delay = max(delay, min(error.retry_after_s, self.max_backoff_s))
        return delay

    # --- the claim loop -----------------------------------------------------------------------

    def _begin_run(self) -> bool:
        """Enter RUNNING; False if the worker was stopped first (a signal can come before run())."""
        if (misuse := _RUN_MISUSE.get(self._state)) is not None:
            raise RuntimeError(misuse.format(self))
        if self._state is WorkerState.STOPPING:
            return False
        self._state = WorkerState.RUNNING
        self._loop_idle.clear()
        return True

    async def _claim_more(self, burst: bool) -> bool:
        """Claim what the free slots take and start it; True if the broker may hold more."""
        limit = min(self.claim_batch, self.concurrency - len(self._running))
        if limit <= 0:
            return False
        try:
            leases = await self.broker.claim(self.worker_id, limit=limit, lease_s=self.lease_s, models=self.models)
        except Exception:
            if burst:
                raise
            self._claim_failures += 1
            delay_s = self.retry_delay_s(self._claim_failures)
            logger.exception("%s: claiming jobs failed; trying again in %.2fs", self.worker_id, delay_s)
            await self._idle(delay_s)
            return False
        self._claim_failures = 0
        if self._state is not WorkerState.RUNNING:  # stopped while claiming: not ours to start
            await self._hand_back([_Running(lease, time.perf_counter()) for lease in leases])
            return False
        for lease in leases:
            self._start(lease)
        return len(leases) == limit

    async def _queued_left(self) -> bool:
        if self.models is None:
            return (await self.broker.stats()).get(JobStatus.QUEUED.value, 0) > 0
        for model in self.models:
            if (await self.broker.list(status=JobStatus.QUEUED, model=model, limit=1))[0]:
                return True
        return False

    async def _idle(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()

    async def _expire_if_due(self) -> None:
        now = asyncio.get_running_loop().time()
        if now < self._next_expire_at:
            return
        self._next_expire_at = now + self.expire_every_s
        try:
            expired = await self.broker.expire()
        except Exception:
            logger.exception("%s: expiring jobs failed; trying again in %gs", self.worker_id, self.expire_every_s)
            return
        self.expired += expired
        if expired:
            logger.info("%s: expired %d jobs", self.worker_id, expired)

    # --- one job --------------------------------------------------------------------------------

    def _start(self, lease: Lease) -> None:
        entry = _Running(lease, time.perf_counter())
        task = asyncio.create_task(self._process(entry), name=f"job {lease.job_id}")
        self._running[task] = entry
        task.add_done_callback(self._job_done)
        self.claimed += 1

    def _job_done(self, task: asyncio.Task[None]) -> None:
        entry = self._running.pop(task)
        self._wake.set()
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("job %s: reporting its outcome to the broker failed; its lease will lapse and it will "
                         "run again", entry.lease.job_id, exc_info=error)  # fmt: skip

    async def _process(self, entry: _Running) -> None:
        try:
            result = await self.handler(entry.lease.job)
        except Exception as error:
            entry.handling = False
            await self._report_failure(entry, error)
        else:
            entry.handling = False
            await self._report_success(entry, result)

    async def _report_success(self, entry: _Running, result: Any) -> None:
        try:
            stored = await self.broker.complete(entry.lease, result)
        except TypeError as error:  # the result is not JSON: the handler's bug, no retry will fix it
            await self._report_failure(entry, error, permanent=True)
            return
        if not stored:
            self._lost(entry, "finished, but its lease had been taken back (cancelled, or run by another worker)")
            return
        self.succeeded += 1
        self._log(entry, "succeeded")
        await self._send_webhook(entry.lease)

    async def _report_failure(self, entry: _Running, error: Exception, *, permanent: bool = False) -> None:
        job, text = entry.lease.job, f"{type(error).__name__}: {error}"
        permanent = permanent or isinstance(error, PERMANENT_ERRORS)
        retry_in_s = None if permanent else self.retry_delay_s(job.attempts, error)
        if not await self.broker.fail(entry.lease, text, retry_in_s=retry_in_s):
            self._lost(entry, f"failed ({text}), but its lease had been taken back")
            return
        if retry_in_s is None:
            self.failed += 1
            self._log(entry, "failed", f": {text} (not retried: it cannot succeed)", error)
        elif job.attempts >= job.max_attempts:
            self.dead_lettered += 1
            self._log(entry, "dead-lettered", f": {text} (attempts spent)", error)
        else:
            self.retried += 1
            self._log(entry, "retrying", f" in {retry_in_s:.2f}s: {text}", error)
            return
        await self._send_webhook(entry.lease)

    def _lost(self, entry: _Running, detail: str) -> None:
        self.lost += 1
        self._log(entry, "lost", f": {detail}")

    def _log(self, entry: _Running, outcome: str, detail: str = "", error: BaseException | None = None) -> None:
        """The job's one line (arq style); a failure's carries its traceback, at warning level."""
        job, level = entry.lease.job, logging.INFO if error is None else logging.WARNING
        logger.log(level, "%6.3fs %s job %s %s attempt %d/%d%s", time.perf_counter() - entry.started, outcome,
                   job.id, job.model, job.attempts, job.max_attempts, detail, exc_info=error)  # fmt: skip

    async def _send_webhook(self, lease: Lease) -> None:
        """Hand a finished job to the webhook sender; whatever goes wrong is logged, never raised."""
        if self.webhooks is None or lease.job.webhook is None:
            return
        job_id = lease.job_id
        try:
            job = await self.broker.get(job_id)
            if job is None or job.webhook is None or not job.status.is_final:
                return

            async def record(attempt: WebhookAttempt) -> None:
                await self.broker.record_webhook_attempt(job_id, attempt.to_dict())

            self.webhooks.schedule(job.webhook, job.to_dict(), on_attempt=record)
        except Exception:
            logger.exception("job %s: its webhook could not be scheduled; the job keeps its result", job_id)

    # --- leases ---------------------------------------------------------------------------------

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            await self._renew_all()

    async def _renew_all(self) -> None:
        """Renew every running handler's lease at once; cancel the handlers whose lease is gone."""
        held = [(task, entry) for task, entry in self._running.items() if entry.handling]
        if not held:
            return
        renewals = (self.broker.renew(entry.lease, self.lease_s) for _, entry in held)
        answers = await asyncio.gather(*renewals, return_exceptions=True)
        for (task, entry), answer in zip(held, answers, strict=True):
            if isinstance(answer, BaseException):
                logger.warning("job %s: renewing its lease failed (%r); trying again", entry.lease.job_id, answer)
            elif not answer and entry.handling:  # the handler may have finished while we renewed
                entry.handling, entry.lost = False, True
                task.cancel()
                self.cancelled += 1
                self._log(entry, "cancelled", ": its lease is gone (the job was cancelled, or another worker has it)")

    async def _hand_back(self, entries: Sequence[_Running]) -> int:
        """Release the jobs to the broker (each queued again, its attempt uncounted); how many were."""
        releases = (self.broker.release(entry.lease) for entry in entries)
        answers = await asyncio.gather(*releases, return_exceptions=True)
        for entry, answer in zip(entries, answers, strict=True):
            if isinstance(answer, BaseException):
                logger.error("job %s: releasing it failed; its lease will lapse and it will run again",
                             entry.lease.job_id, exc_info=answer)  # fmt: skip
            elif answer:
                self.released += 1
                self._log(entry, "released", " (handed back untried)")
        return sum(answer is True for answer in answers)


def _require(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.error("%s crashed; leases are no longer renewed", task.get_name(), exc_info=error)
