"""The worker against every broker: results, concurrency, retries, dead letters, leases, shutdown, webhooks.

Handlers block on events the test controls; ``run(burst=True)`` makes most tests straight-line
code. The only sleeps let a lease or a TTL that the test chose run out (``let_pass``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from asyncserve.config import WebhookSettings
from asyncserve.exceptions import InvalidRequest, ModelNotFound, SchemaViolation, Unavailable
from asyncserve.jobs import Broker, Job, JobRequest, JobStatus, MemoryBroker
from asyncserve.jobs.webhooks import WebhookDelivery, verify
from asyncserve.jobs.worker import JobHandler, Worker, WorkerState
from tests.conftest import serving_asgi
from tests.jobs.conftest import MakeBroker, Storage, let_pass

SECRET = "worker-test-secret-0123456789"
LEASE_S = 0.15
"""A lease short enough to lose in a test (renewed every 50 ms)."""


def request(inputs: object = None, **fields: object) -> JobRequest:
    return JobRequest(model=str(fields.pop("model", "churn")), inputs=inputs, **fields)  # type: ignore[arg-type]


def make_worker(broker: Broker, handler: JobHandler, **options: Any) -> Worker:
    """A worker with test-sized timings: quick polls, backoffs of milliseconds."""
    defaults: dict[str, Any] = {"poll_interval_s": 0.01, "base_backoff_s": 0.01, "max_backoff_s": 0.05}
    return Worker(broker, handler, **{**defaults, **options})


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    """The worker's ``run()`` in the background until the block ends; then stop, and shut down."""
    async with worker:
        task = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.stop()
            await task


async def wait_for(event: asyncio.Event) -> None:
    async with asyncio.timeout(5):
        await event.wait()


async def get(broker: Broker, job: Job) -> Job:
    found = await broker.get(job.id)
    assert found is not None
    return found


async def two_brokers(storage: Storage, make_broker: MakeBroker) -> tuple[Broker, Broker]:
    """Two brokers on one storage, as two processes have (in memory, the one broker twice)."""
    first = await make_broker()
    return first, first if storage.kind == "memory" else await make_broker()


class Blocker:
    """A handler that blocks until cancelled, noting when it started and when it was cancelled."""

    def __init__(self, expected: int = 1) -> None:
        self.expected, self.jobs = expected, list[str]()
        self.started, self.cancelled = asyncio.Event(), asyncio.Event()

    async def __call__(self, job: Job) -> Any:
        self.jobs.append(job.id)
        if len(self.jobs) == self.expected:
            self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@pytest.fixture
async def memory() -> AsyncIterator[Broker]:
    async with MemoryBroker() as broker:
        yield broker


# --- running jobs ---------------------------------------------------------------------------


async def test_a_burst_run_completes_every_queued_job_with_the_handlers_result(broker: Broker) -> None:
    jobs = await broker.enqueue_many([request({"x": i}) for i in range(20)])

    async def double(job: Job) -> Any:
        return {"y": job.inputs["x"] * 2}

    async with make_worker(broker, double, concurrency=4, claim_batch=3) as worker:
        await worker.run(burst=True)

    finals = [await get(broker, job) for job in jobs]
    assert [(j.status, j.result, j.attempts) for j in finals] == [
        (JobStatus.SUCCEEDED, {"y": 2 * i}, 1) for i in range(20)
    ]
    assert worker.statistics() == {"claimed": 20, "succeeded": 20, "failed": 0, "retried": 0, "dead_lettered": 0,
                                   "cancelled": 0, "released": 0, "lost": 0, "expired": 0, "running": 0}  # fmt: skip
    assert re.fullmatch(r"<Worker \S+ closed claimed=20 succeeded=20 failed=0 .* running=0>", repr(worker))


async def test_no_more_handlers_run_at_once_than_the_concurrency(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    await broker.enqueue_many([request(i) for i in range(10)])
    active = peak = 0
    three_running = asyncio.Event()

    async def handler(job: Job) -> Any:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        if active == 3:
            three_running.set()
        await three_running.wait()  # the first three hold their slots until all three run
        active -= 1

    limits: list[int] = []
    claim = broker.claim

    async def counting_claim(worker_id: str, **options: Any) -> Any:
        limits.append(options["limit"])
        return await claim(worker_id, **options)

    monkeypatch.setattr(broker, "claim", counting_claim)
    async with make_worker(broker, handler, concurrency=3, claim_batch=2) as worker:
        async with asyncio.timeout(5):
            await worker.run(burst=True)

    assert (peak, worker.succeeded) == (3, 10)
    assert limits[:2] == [2, 1]  # a batch of claim_batch, then what the free slots take
    assert max(limits) <= 2


async def test_the_log_has_one_line_per_job(memory: Broker, caplog: pytest.LogCaptureFixture) -> None:
    job, _ = await memory.enqueue(request())
    caplog.set_level(logging.INFO, logger="asyncserve.jobs.worker")

    async def handler(job: Job) -> Any:
        return "done"

    async with make_worker(memory, handler) as worker:
        await worker.run(burst=True)

    [line] = [r.getMessage() for r in caplog.records if job.id in r.getMessage()]
    assert re.fullmatch(rf" *\d+\.\d{{3}}s succeeded job {job.id} churn attempt 1/3", line)


async def test_a_worker_for_some_models_runs_only_their_jobs(memory: Broker) -> None:
    mine, _ = await memory.enqueue(request(model="churn"))
    other, _ = await memory.enqueue(request(model="fraud"))

    async def handler(job: Job) -> Any:
        return job.model

    async with make_worker(memory, handler, models=["churn"]) as worker:
        await worker.run(burst=True)  # returns though a job for another model is queued

    assert ((await get(memory, mine)).result, (await get(memory, other)).status) == ("churn", JobStatus.QUEUED)


# --- failures -------------------------------------------------------------------------------


async def test_a_failing_handler_is_retried_with_backoff_then_dead_lettered(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    job, _ = await broker.enqueue(request(max_attempts=3))
    calls: list[float] = []

    async def handler(job: Job) -> Any:
        calls.append(time.monotonic())
        raise ValueError(f"boom {len(calls)}")

    async with make_worker(broker, handler, base_backoff_s=0.02, max_backoff_s=1.0) as worker:
        await worker.run(burst=True)  # waits out the backoffs: the job is queued until it is dead

    final = await get(broker, job)
    assert (final.status, final.dead_letter, final.attempts) == (JobStatus.FAILED, True, 3)
    assert final.error == "ValueError: boom 3"  # the type and message, never a traceback
    assert (worker.retried, worker.dead_lettered, worker.failed) == (2, 1, 0)
    # Backoff: 0.02 * 2 ** (attempt - 1), times a jitter in [0.5, 1] (less a little for clocks).
    assert [later - earlier for earlier, later in itertools.pairwise(calls)] >= [0.009, 0.019]
    tracebacks = [r for r in caplog.records if r.exc_info is not None and job.id in r.getMessage()]
    assert len(tracebacks) == 3


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequest("inputs.age must be a number"),
        SchemaViolation("inputs.age", "must be >= 0"),
        ModelNotFound("no model 'churn'"),
    ],
    ids=lambda error: type(error).__name__,
)
async def test_a_bad_input_fails_at_once_without_retry(broker: Broker, error: Exception) -> None:
    job, _ = await broker.enqueue(request(max_attempts=3))

    async def handler(job: Job) -> Any:
        raise error

    async with make_worker(broker, handler) as worker:
        await worker.run(burst=True)

    final = await get(broker, job)
    assert (final.status, final.dead_letter, final.attempts) == (JobStatus.FAILED, False, 1)
    assert final.error == f"{type(error).__name__}: {error}"
    assert (worker.failed, worker.retried) == (1, 0)


async def test_a_result_that_is_not_json_fails_the_job_without_retry(memory: Broker) -> None:
    job, _ = await memory.enqueue(request())

    async def handler(job: Job) -> Any:
        return object()

    async with make_worker(memory, handler) as worker:
        await worker.run(burst=True)

    final = await get(memory, job)
    assert (final.status, final.attempts) == (JobStatus.FAILED, 1)
    assert final.error is not None
    assert final.error.startswith(f"TypeError: the result of job {job.id} must be JSON-serialisable")


async def test_the_retry_delay_doubles_with_jitter_up_to_the_cap(memory: Broker) -> None:
    worker = make_worker(memory, Blocker(), base_backoff_s=1.0, max_backoff_s=5.0)

    for attempt, (low, high) in {1: (0.5, 1), 2: (1, 2), 3: (2, 4), 4: (2.5, 5), 30: (2.5, 5)}.items():
        delays = [worker.retry_delay_s(attempt) for _ in range(50)]
        assert low <= min(delays) <= max(delays) <= high
    assert worker.retry_delay_s(1, Unavailable("loading", retry_after_s=3.0)) >= 3.0
    assert worker.retry_delay_s(1, Unavailable("loading", retry_after_s=600.0)) == 5.0


async def test_a_broker_error_while_claiming_is_logged_and_retried(
    memory: Broker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    job, _ = await memory.enqueue(request())
    claim, done = memory.claim, asyncio.Event()

    async def failing_once(worker_id: str, **options: Any) -> Any:
        monkeypatch.setattr(memory, "claim", claim)
        raise ConnectionError("the broker went away")

    async def handler(job: Job) -> Any:
        done.set()
        return "done"

    monkeypatch.setattr(memory, "claim", failing_once)
    async with running(make_worker(memory, handler)):
        await wait_for(done)

    assert "claiming jobs failed" in caplog.text
    monkeypatch.setattr(memory, "claim", failing_once)
    async with make_worker(memory, handler) as worker:
        with pytest.raises(ConnectionError):
            await worker.run(burst=True)  # burst mode raises instead
    assert (await get(memory, job)).status is JobStatus.SUCCEEDED


# --- leases -------------------------------------------------------------------------------------


async def test_one_task_renews_every_running_lease_so_long_jobs_keep_them(broker: Broker) -> None:
    jobs = await broker.enqueue_many([request(i) for i in range(3)])
    started, finish, calls = asyncio.Event(), asyncio.Event(), list[str]()

    async def long(job: Job) -> Any:
        calls.append(job.id)
        if len(calls) == 3:
            started.set()
        await finish.wait()
        return "finished"

    async with running(make_worker(broker, long, lease_s=LEASE_S, concurrency=3)) as worker:
        await wait_for(started)
        renewers = [task for task in asyncio.all_tasks() if task.get_name().endswith("lease renewer")]
        await let_pass(3 * LEASE_S)  # three leases' worth: unrenewed, each would have lapsed
        finish.set()

    assert len(renewers) == 1
    assert {((await get(broker, j)).result, (await get(broker, j)).attempts) for j in jobs} == {("finished", 1)}
    assert (worker.succeeded, worker.cancelled, worker.lost) == (3, 0, 0)


async def test_cancelling_a_running_job_cancels_its_handler_and_nothing_completes_it(broker: Broker) -> None:
    job, _ = await broker.enqueue(request())
    handler = Blocker()

    async with running(make_worker(broker, handler, lease_s=LEASE_S)) as worker:
        await wait_for(handler.started)
        await broker.cancel(job.id)
        await wait_for(handler.cancelled)  # the next renewal finds the lease gone

    final = await get(broker, job)
    assert (final.status, final.result) == (JobStatus.CANCELLED, None)
    assert (worker.cancelled, worker.succeeded, worker.released) == (1, 0, 0)


async def test_a_lease_taken_over_after_it_lapsed_cancels_the_handler_and_the_job_completes_once(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, _ = await broker.enqueue(request())
    handler = Blocker()

    async def renewal_paused(*args: Any) -> bool:
        return True  # the worker believes it renewed; the broker lets the lease lapse

    # concurrency=1: the blocked handler holds the one slot, so this worker cannot reclaim the job itself.
    async with running(make_worker(broker, handler, lease_s=LEASE_S, concurrency=1)) as worker:
        await wait_for(handler.started)
        monkeypatch.setattr(broker, "renew", renewal_paused)
        await let_pass(LEASE_S + 0.1)
        [lease] = await broker.claim("another-worker", lease_s=30.0)  # takes the lapsed job over
        monkeypatch.undo()
        await wait_for(handler.cancelled)
        assert await broker.complete(lease, "theirs")

    final = await get(broker, job)
    assert (final.status, final.result, final.attempts) == (JobStatus.SUCCEEDED, "theirs", 2)
    assert (worker.cancelled, worker.succeeded, worker.lost, worker.released) == (1, 0, 0, 0)


async def test_a_result_for_a_job_cancelled_meanwhile_is_not_stored(
    memory: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    job, _ = await memory.enqueue(request())
    caplog.set_level(logging.INFO, logger="asyncserve.jobs.worker")

    async def handler(job: Job) -> Any:
        await memory.cancel(job.id)
        return "too late"

    async with make_worker(memory, handler) as worker:
        await worker.run(burst=True)

    final = await get(memory, job)
    assert (final.status, final.result) == (JobStatus.CANCELLED, None)
    assert (worker.lost, worker.succeeded) == (1, 0)
    [record] = [r for r in caplog.records if job.id in r.getMessage()]
    assert record.levelno == logging.INFO
    assert "lost job" in record.getMessage()


async def test_two_workers_share_the_work_and_each_job_completes_once(
    storage: Storage, make_broker: MakeBroker
) -> None:
    first, second = await two_brokers(storage, make_broker)
    jobs = await first.enqueue_many([request(i) for i in range(30)])
    handled: dict[str, list[str]] = {"a": [], "b": []}
    both_working = asyncio.Event()

    def handler_of(name: str) -> JobHandler:
        async def handler(job: Job) -> Any:
            handled[name].append(job.id)
            if handled["a"] and handled["b"]:
                both_working.set()
            await both_working.wait()  # neither drains the queue alone
            return name

        return handler

    options: dict[str, Any] = {"concurrency": 4, "claim_batch": 2}
    async with (
        make_worker(first, handler_of("a"), worker_id="a", **options) as a,
        make_worker(second, handler_of("b"), worker_id="b", **options) as b,
    ):
        async with asyncio.timeout(10):
            await asyncio.gather(a.run(burst=True), b.run(burst=True))

    finals = [await get(first, job) for job in jobs]
    assert {(j.status, j.attempts) for j in finals} == {(JobStatus.SUCCEEDED, 1)}
    assert sorted(handled["a"] + handled["b"]) == sorted(job.id for job in jobs)  # each job ran once
    assert [j.result for j in finals].count("a") == a.succeeded == len(handled["a"]) > 0
    assert [j.result for j in finals].count("b") == b.succeeded == len(handled["b"]) > 0


# --- shutdown -------------------------------------------------------------------------------


async def test_aclose_releases_running_jobs_which_another_worker_then_completes(
    storage: Storage, make_broker: MakeBroker
) -> None:
    first, second = await two_brokers(storage, make_broker)
    jobs = await first.enqueue_many([request(i) for i in range(2)])
    handler = Blocker(expected=2)

    async with make_worker(first, handler, concurrency=2) as worker:
        run = asyncio.create_task(worker.run())
        await wait_for(handler.started)
        await worker.aclose(timeout_s=0)
        await run
    assert (worker.state, worker.released, worker.statistics()["running"]) == (WorkerState.CLOSED, 2, 0)
    assert handler.cancelled.is_set()
    assert {((await get(first, job)).status, (await get(first, job)).attempts) for job in jobs} == {
        (JobStatus.QUEUED, 0)
    }

    async def finish(job: Job) -> Any:
        return "finished"

    async with make_worker(second, finish) as other:
        await other.run(burst=True)
    assert {((await get(first, job)).result, (await get(first, job)).attempts) for job in jobs} == {("finished", 1)}


async def test_aclose_lets_running_handlers_finish_within_its_time_limit(broker: Broker) -> None:
    job, _ = await broker.enqueue(request())
    started, finish = asyncio.Event(), asyncio.Event()

    async def slow(job: Job) -> Any:
        started.set()
        await finish.wait()
        return "finished"

    async with make_worker(broker, slow) as worker:
        run = asyncio.create_task(worker.run())
        await wait_for(started)
        worker.stop()
        finish.set()  # the handler resumes only once aclose is waiting for it
        await worker.aclose(timeout_s=5)
        await run

    assert (await get(broker, job)).result == "finished"
    assert (worker.succeeded, worker.released, worker.cancelled) == (1, 0, 0)


async def test_the_lifecycle_refuses_misuse(memory: Broker) -> None:
    worker = make_worker(memory, Blocker())
    with pytest.raises(RuntimeError, match="not open; use 'async with"):
        await worker.run()
    async with worker:
        worker.stop()
        await worker.run()  # stopped: returns at once
        assert worker.state is WorkerState.STOPPING
    with pytest.raises(RuntimeError, match="Cannot reopen"):
        await worker.__aenter__()
    with pytest.raises(RuntimeError, match="is closed"):
        await worker.run()
    await worker.aclose()  # twice is harmless

    async with make_worker(memory, Blocker()) as busy:
        run = asyncio.create_task(busy.run())
        await asyncio.sleep(0)  # let run() start its loop
        with pytest.raises(RuntimeError, match="running already"):
            await busy.run()
        busy.stop()
        await run


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("concurrency", 0, "concurrency must be an integer >= 1, got 0"),
        ("claim_batch", 0, "claim_batch must be an integer from 1 to 1000, got 0"),
        ("lease_s", 0, "lease_s must be a number of seconds > 0, got 0"),
        ("base_backoff_s", -1, "base_backoff_s must be a number of seconds >= 0, got -1"),
        ("max_backoff_s", 0.001, "max_backoff_s must be a number of seconds >= base_backoff_s, got 0.001"),
        ("poll_interval_s", 0, "poll_interval_s must be a number of seconds > 0, got 0"),
        ("expire_every_s", float("nan"), "expire_every_s must be a number of seconds > 0, got nan"),
        ("models", [], "models must be a non-empty sequence of model names"),
        ("worker_id", "x" * 201, "worker_id must be a string of 1 to 200 characters"),
    ],
)
async def test_bad_options_are_refused_with_the_rule(memory: Broker, option: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_worker(memory, Blocker(), **{option: value})


# --- expiry and webhooks ----------------------------------------------------------------------


async def test_the_worker_expires_results_past_their_ttl(broker: Broker) -> None:
    job, _ = await broker.enqueue(request(ttl_s=0.05))

    async def handler(job: Job) -> Any:
        return "done"

    async with make_worker(broker, handler, expire_every_s=0.01) as worker:
        await worker.run(burst=True)
        assert (await get(broker, job)).status is JobStatus.SUCCEEDED
        await let_pass(0.1)
        await worker.run(burst=True)  # expire() is due again

    assert (await get(broker, job)).status is JobStatus.EXPIRED
    assert worker.expired == 1


class Receiver:
    """A webhook receiver: records each request (path, headers, body) and answers ``status``."""

    def __init__(self) -> None:
        self.status = 200
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        self.requests.append((scope["path"], {k.decode(): v.decode() for k, v in scope["headers"]}, body))
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
async def receiver_server() -> AsyncIterator[tuple[Receiver, str]]:
    receiver = Receiver()
    async with serving_asgi(receiver) as url:
        yield receiver, url


@pytest.fixture
def hook(receiver_server: tuple[Receiver, str]) -> tuple[Receiver, str]:
    receiver, url = receiver_server
    receiver.status, receiver.requests = 200, []
    return receiver, url


def webhook_settings(**overrides: Any) -> WebhookSettings:
    return WebhookSettings(secret=SECRET, allowed_hosts=frozenset({"127.0.0.1"}), backoff_s=0.001, max_backoff_s=0.01,
                           **overrides)  # fmt: skip


async def test_a_finished_job_is_posted_signed_to_its_webhook_and_the_attempt_recorded(
    broker: Broker, hook: tuple[Receiver, str]
) -> None:
    receiver, url = hook
    ok, _ = await broker.enqueue(request({"x": 1}, webhook=f"{url}/ok"))
    bad, _ = await broker.enqueue(request({"x": -1}, webhook=f"{url}/bad"))
    flaky, _ = await broker.enqueue(request({"x": 2}, webhook=f"{url}/flaky"))  # fails once, then succeeds
    await broker.enqueue(request({"x": 3}))  # no webhook
    failures: list[str] = []

    async def handler(job: Job) -> Any:
        if job.inputs["x"] < 0:
            raise InvalidRequest("x must be >= 0")
        if job.inputs["x"] == 2 and not failures:
            failures.append(job.id)
            raise Unavailable("warming up", retry_after_s=0.0)
        return {"y": job.inputs["x"] * 10}

    async with (
        WebhookDelivery(webhook_settings()) as webhooks,
        make_worker(broker, handler, webhooks=webhooks) as worker,
    ):
        await worker.run(burst=True)
    # Leaving the WebhookDelivery block waited for its deliveries.

    sent = {path: (headers, body) for path, headers, body in receiver.requests}
    assert sorted(sent) == ["/bad", "/flaky", "/ok"]  # final jobs only, each once
    for path, job in (("/ok", ok), ("/bad", bad), ("/flaky", flaky)):
        headers, body = sent[path]
        assert verify(SECRET, headers, body)
        final = await get(broker, job)
        assert orjson.loads(body) == {**final.to_dict(), "webhook_attempts": []}
        [attempt] = final.webhook_attempts
        assert (attempt["attempt"], attempt["status_code"], attempt["error"]) == (1, 200, None)
    assert (orjson.loads(sent["/ok"][1])["status"], orjson.loads(sent["/ok"][1])["result"]) == ("succeeded", {"y": 10})
    assert orjson.loads(sent["/bad"][1])["error"] == "InvalidRequest: x must be >= 0"
    assert (await get(broker, flaky)).attempts == 2
    assert (worker.succeeded, worker.failed, worker.retried) == (3, 1, 1)


async def test_a_failed_webhook_leaves_the_jobs_result_alone(memory: Broker, hook: tuple[Receiver, str]) -> None:
    receiver, url = hook
    receiver.status = 500
    job, _ = await memory.enqueue(request(webhook=f"{url}/down"))

    async def handler(job: Job) -> Any:
        return "kept"

    async with (
        WebhookDelivery(webhook_settings(max_attempts=2)) as webhooks,
        make_worker(memory, handler, webhooks=webhooks) as worker,
    ):
        await worker.run(burst=True)

    final = await get(memory, job)
    assert (final.status, final.result) == (JobStatus.SUCCEEDED, "kept")
    assert [(a["attempt"], a["status_code"]) for a in final.webhook_attempts] == [(1, 500), (2, 500)]
    assert worker.succeeded == 1


async def test_a_webhook_that_cannot_be_scheduled_is_logged_and_the_job_keeps_its_result(
    memory: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    job, _ = await memory.enqueue(request(webhook="http://127.0.0.1:9/hook"))
    closed = WebhookDelivery(webhook_settings())  # never opened: schedule() raises

    async def handler(job: Job) -> Any:
        return "kept"

    async with make_worker(memory, handler, webhooks=closed) as worker:
        await worker.run(burst=True)

    assert (await get(memory, job)).result == "kept"
    assert f"job {job.id}: its webhook could not be scheduled" in caplog.text
