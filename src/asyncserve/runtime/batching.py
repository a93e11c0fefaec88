"""Dynamic batching: merge concurrent requests' rows into one predict call, without waiting in vain.

The batcher *pulls*: a batch is formed when an execution slot is free, from whatever is queued.
- With nothing running (the executor idle), the queued rows go at once: a lone request on an idle
  server waits for nothing.
- With every slot busy, rows pile up in the queue and leave together when a slot frees up: under
  load, batches grow by themselves, no timer involved.
- Waiting with a free slot pays in two cases only: another batch is running
  (``max_concurrent_batches > 1``) and rows arrive fast enough to be worth it; or requests are
  already in, received but not yet parsed because the event loop is busy (``input_pending``: the
  core is busy with them anyway, and the batch that waits for them is larger and costs less per
  row). Then the batcher waits for more rows, until the batch is full, ``max_wait_s`` after the
  oldest row arrived, or the latest moment that still meets the tightest deadline in the batch
  (from the cost model), whichever comes first.

Every item carries its absolute deadline (``time.monotonic()``). Admission refuses at once (503
with ``Retry-After``) a request that finds the queue full or that cannot finish in time behind the
rows ahead of it; expired and cancelled items are dropped before they reach the model. When a
batch fails, it is bisected so that only the failing items' callers get the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncserve import tracing
from asyncserve.exceptions import DeadlineExceeded, InvalidRequest, Overloaded, ShuttingDown
from asyncserve.metrics import BatchMetrics
from asyncserve.runtime.cost import CostModel
from asyncserve.runtime.scheduler import Share
from asyncserve.tensors import Columns

logger = logging.getLogger(__name__)

Runner = Callable[[Columns, int, float], Awaitable[tuple[Columns, float, float]]]
"""Runs one batch: ``(columns, rows, deadline) -> (outputs, seconds the model took, seconds it waited for a
worker)``."""

LOOP_HOPS = 3
"""Event-loop turns a queued request waits for besides the model: at admission, each counts as the loop's lag."""

PRIORITY_LEVELS = 10
"""Priorities are 0 (the default, lowest) to 9 (served first)."""


@dataclass(frozen=True, kw_only=True)
class BatchSettings:
    """How one model's requests are batched; each field can be set on the Model class."""

    max_batch_size: int = 64
    """Most rows in one predict call."""
    max_wait_s: float = 0.002
    """Longest a row may wait for company, counted from its arrival; only spent when it pays."""
    max_concurrent_batches: int = 1
    """Batches running at once (executor slots this model may use)."""
    max_queue_size: int = 1024
    """Most rows waiting; more is refused at once with 503."""
    priority_aging_s: float = 0.1
    """A waiting row climbs one priority level per this many seconds, so low lanes never starve."""


@dataclass(eq=False, slots=True)
class Item:
    columns: Columns
    rows: int
    deadline: float
    priority: int
    arrived: float
    future: asyncio.Future[Columns]
    shape_key: tuple[tuple[int, ...], ...]
    timer: asyncio.TimerHandle
    """Fails the future at the deadline; cancelled once the item is answered."""
    trace: Any = None
    """The request's trace context, kept while tracing is on (``asyncserve/tracing.py``)."""

    def answer(self, outputs: Columns) -> None:
        if not self.future.done():
            self.future.set_result(outputs)
        self.timer.cancel()

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
        self.timer.cancel()

    @property
    def dead(self) -> bool:
        return self.future.done()


class _Queue:
    """Priority lanes of FIFO items, with the rows each lane holds and the tightest deadline among the items
    (kept, not recounted: they are read per request)."""

    def __init__(self) -> None:
        self.lanes: list[deque[Item]] = [deque() for _ in range(PRIORITY_LEVELS)]
        self.lane_rows = [0] * PRIORITY_LEVELS
        self.rows = 0
        self._tightest: float | None = math.inf
        """The least deadline of the items queued (dead ones too); None: to be found again."""

    def push(self, item: Item) -> None:
        self.lanes[item.priority].append(item)
        self.lane_rows[item.priority] += item.rows
        self.rows += item.rows
        if self._tightest is not None and item.deadline < self._tightest:
            self._tightest = item.deadline

    def pop_head(self, lane: deque[Item]) -> Item:
        item = lane.popleft()
        self.lane_rows[item.priority] -= item.rows
        self.rows -= item.rows
        if self._tightest is not None and item.deadline <= self._tightest:
            # Items leave from the heads, oldest first, and deadlines mostly grow with arrival: the
            # queue is scanned again about once a batch, not once a request.
            self._tightest = None
        return item

    def tightest_deadline(self) -> float:
        """The least deadline of the items queued (``math.inf`` when there are none)."""
        if self._tightest is None:
            self._tightest = min((item.deadline for lane in self.lanes for item in lane), default=math.inf)
        return self._tightest

    def rows_at_or_above(self, priority: int) -> int:
        return self.rows if priority == 0 else sum(self.lane_rows[priority:])  # (0, the default: every lane)

    def oldest_arrival(self) -> float:
        """When the oldest head of a lane arrived (the queue must hold an item)."""
        return min([lane[0].arrived for lane in filter(None, self.lanes)])

    def clear(self) -> list[Item]:
        items = [item for lane in self.lanes for item in lane]
        for lane in self.lanes:
            lane.clear()
        self.lane_rows = [0] * PRIORITY_LEVELS
        self.rows = 0
        self._tightest = math.inf
        return items


class Batcher:
    """Queues rows for one model and feeds them to ``runner`` in batches.

    Example::

        batcher = Batcher("iris", runner, BatchSettings(max_batch_size=32), metrics)
        batcher.start()
        outputs = await batcher.submit(columns, rows=1, deadline=time.monotonic() + 1.0)
        await batcher.aclose()
    """

    def __init__(
        self,
        label: str,
        runner: Runner,
        settings: BatchSettings,
        metrics: BatchMetrics,
        *,
        loop_delay_s: Callable[[], float] = lambda: 0.0,
        input_pending: Callable[[], bool] = lambda: False,
        share: Share | None = None,
    ) -> None:
        self.label = label
        self._share = share
        """This model's use of a shared executor's workers (None: the runner needs no worker, an async model)."""
        self._holds_worker = False
        """Whether the dispatcher holds a worker from the scheduler for the batch it is forming."""
        self._worker_wait_s = 0.0
        """How long the dispatcher waited for the worker it holds."""
        self._loop_delay_s = loop_delay_s
        self._input_pending = input_pending
        """Whether requests already received wait for the event loop to parse them: rows on their way."""
        self.settings = settings
        self.cost = CostModel()
        self._runner = runner
        self._metrics = metrics
        self._queue = _Queue()
        self._wake: asyncio.Future[None] | None = None
        """What the dispatcher awaits while it waits for rows (None otherwise): ``enqueue`` resolves it."""
        # With a scheduler, it caps the model's batches (max_concurrent_batches) and the dispatcher waits
        # there: a batcher that waited on slots of its own first would not be in line when a worker frees up.
        self._slots = asyncio.Semaphore(settings.max_concurrent_batches if share is None else 1 << 30)
        self._running: dict[asyncio.Task[float], float] = {}
        """Running batches and when each is expected to end (time.monotonic())."""
        if share is not None:
            share.running_until = self._running
        self._dispatcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        """The running loop, from ``start`` (asking for it on every request costs a system call)."""
        self._closing = False
        self._arrival_rate = _RateMeter()
        metrics.queue_rows.set_function(lambda: self._queue.rows)
        metrics.running.set_function(lambda: len(self._running))
        if share is not None:
            metrics.executor_share.set_function(share.executor_share)

    @property
    def queued_rows(self) -> int:
        """Rows waiting in the queue right now."""
        return self._queue.rows

    # Submitting

    async def submit(self, columns: Columns, rows: int, deadline: float, priority: int = 0) -> Columns:
        """Queue ``rows`` rows and wait for their outputs, at most until ``deadline``."""
        return await self.enqueue(columns, rows, deadline, priority)

    def enqueue(self, columns: Columns, rows: int, deadline: float, priority: int = 0) -> asyncio.Future[Columns]:
        """Queue ``rows`` rows; the future gets their outputs, or DeadlineExceeded at ``deadline``.

        Refusals (a full queue, a deadline out of reach) raise at once. Cancelling the future
        withdraws the rows: the batcher drops them before they reach the model.
        """
        now = time.monotonic()
        self._admit(rows, priority, deadline, now)
        loop = self._loop or asyncio.get_running_loop()
        future = loop.create_future()
        # A bare timer rather than asyncio.timeout(): it is cheaper, needs no task to cancel, and
        # expiring the future also marks the item dead, so the batcher drops it. The batcher
        # cancels it when it answers; a withdrawn item's timer just finds its future done.
        timer = loop.call_at(loop.time() + (deadline - now), _expire, future, self.label)
        item = Item(columns, rows, deadline, priority, now, future, _shape_key(columns), timer)
        if tracing.tracer is not None:
            item.trace = tracing.current_context()
        self._queue.push(item)
        self._arrival_rate.add(rows, now)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        return future

    def _admit(self, rows: int, priority: int, deadline: float, now: float) -> None:
        if self._closing:
            raise ShuttingDown(f"model {self.label!r} is shutting down")
        if rows > self.settings.max_batch_size:
            raise InvalidRequest(
                f"the request has {rows} rows but model {self.label!r} takes at most "
                f"{self.settings.max_batch_size} per call; split it into smaller requests"
            )
        if self._queue.rows + rows > self.settings.max_queue_size:
            self._shed("queue_full")
            raise Overloaded(
                f"model {self.label!r} has {self._queue.rows} rows queued (limit {self.settings.max_queue_size}); "
                "retry later",
                retry_after_s=self._drain_time_s(self._queue.rows),
            )
        expected = self._expected_latency_s(self._queue.rows_at_or_above(priority) + rows)
        if expected is not None:
            # A lagging event loop delays the request's every hop: the batch's start, the result's
            # hand-back from the executor, the task's wake-up, the answer. Count a few of them.
            expected += LOOP_HOPS * self._loop_delay_s()
        if expected is not None and now + expected > deadline:
            self._shed("deadline_unreachable")
            raise Overloaded(
                f"model {self.label!r} cannot answer within the request's deadline: about {expected:.3f}s of work "
                f"is ahead of it; retry later or allow more time with X-Request-Timeout",
                retry_after_s=self._drain_time_s(self._queue.rows),
            )

    def _expected_latency_s(self, rows_ahead: int) -> float | None:
        """Time until ``rows_ahead`` rows are done: until a slot frees up, then their batches."""
        if not self.cost.fitted:
            return None
        size = self.settings.max_batch_size
        batches = math.ceil(rows_ahead / size)
        queued = (
            self.cost.per_row_s * rows_ahead + self.cost.per_batch_s * batches
        ) / self.settings.max_concurrent_batches
        return queued + self._until_a_slot_frees_s()

    def _until_a_slot_frees_s(self) -> float:
        if len(self._running) < self.settings.max_concurrent_batches:
            # A slot of its own is free; a worker may still have to free up (other models' batches).
            return 0.0 if self._share is None else self._share.expected_wait_s()
        now = time.monotonic()
        return max(0.0, min(self._running.values()) - now)

    def _drain_time_s(self, rows: int) -> float:
        return self._expected_latency_s(rows) or 1.0

    # Dispatching

    def start(self) -> None:
        if self._dispatcher is not None:
            raise RuntimeError(f"the batcher of {self.label!r} is already running")
        self._loop = asyncio.get_running_loop()
        self._dispatcher = self._loop.create_task(self._dispatch(), name=f"batcher-{self.label}")
        self._dispatcher.add_done_callback(_log_crash)

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch, reason = await self._next_batch()
            except BaseException:
                self._slots.release()
                self._give_worker_back(0.0)
                raise
            # The worker held (if any) goes with the batch, which gives it back when it ends.
            worker_wait_s, self._holds_worker, self._worker_wait_s = self._worker_wait_s, False, 0.0
            task = asyncio.get_running_loop().create_task(self._execute(batch, reason, worker_wait_s))
            # When the batch is expected to end, from the cost model as it is now (read at admission).
            self._running[task] = time.monotonic() + self.cost.seconds(sum(item.rows for item in batch))
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[float]) -> None:
        # The worker goes back once the batch's task is done, after its answers were handed out: the
        # batch that follows is formed from the rows that came meanwhile, as when nothing ran.
        self._running.pop(task, None)
        self._slots.release()
        compute_s = task.result() if not task.cancelled() and task.exception() is None else 0.0
        self._metrics.compute_seconds.inc(compute_s)
        if self._share is not None:
            self._share.release(compute_s)
        _log_crash(task)

    async def _next_batch(self) -> tuple[list[Item], str]:
        """Wait until a batch should leave, and take it out of the queue."""
        looked_at = -1  # the queue's rows when the loop last looked at its sockets for more (-1: not yet)
        while True:
            self._drop_dead_heads()
            if self._queue.rows == 0:
                self._give_worker_back(0.0)  # nothing left to run: another model may use it
                await self._wait_for_rows(None)
                continue
            if not self._holds_worker and self._share is not None:
                # Rows pile up while the model waits its turn for a worker, and leave together.
                await self._wait_for_worker(self._share)
                continue
            if self._queue.rows >= self.settings.max_batch_size:
                return self._take(), "full"
            input_pending = self._input_pending()  # (asked once per decision: no await comes in between)
            if not self._running and not input_pending:
                if self._queue.rows == looked_at or self._waited_enough():
                    return self._take(), "idle"
                # Everything read is parsed, but requests may have reached the sockets since the loop last
                # polled them: the clients of a batch just answered send again at once, some faster than
                # others. One turn of the loop polls the sockets and parses what came; the batch leaves
                # once a look brings no new rows (at one request at a time, after a single turn), or
                # max_wait_s after its oldest row (rows that trickle in one a turn).
                looked_at = self._queue.rows
                await asyncio.sleep(0)
                continue
            release_at, reason = self._release_time(input_pending)
            now = time.monotonic()
            if release_at <= now:
                return self._take(), reason
            await self._wait_for_rows(release_at - now)

    def _waited_enough(self) -> bool:
        """Whether the oldest row queued has waited ``max_wait_s``."""
        return time.monotonic() >= self._queue.oldest_arrival() + self.settings.max_wait_s

    async def _wait_for_rows(self, timeout_s: float | None) -> None:
        """Until rows arrive, or ``timeout_s`` passes (never, if None).

        A future and a timer, not an ``asyncio.Event`` under ``asyncio.timeout``: the dispatcher waits
        again after nearly every request, and a timeout that cancels the task and raises costs several
        times more. The dispatcher decides again after every wake-up, so a spurious one is harmless.
        """
        loop = self._loop or asyncio.get_running_loop()
        wake = self._wake = loop.create_future()
        timer = None if timeout_s is None else loop.call_later(timeout_s, _wake_up, wake)
        try:
            await wake
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()

    async def _wait_for_worker(self, share: Share) -> None:
        asked = time.monotonic()
        granted = share.acquire()
        if granted is not None:
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    share.release(0.0)  # granted in the same turn the dispatcher was cancelled
                raise
        self._worker_wait_s = time.monotonic() - asked if granted is not None else 0.0
        self._holds_worker = True

    def _give_worker_back(self, compute_s: float) -> None:
        if self._holds_worker and self._share is not None:
            self._holds_worker = False
            self._share.release(compute_s)

    def _release_time(self, input_pending: bool) -> tuple[float, str]:
        """When a partial batch must leave, and why, while another batch runs or requests are yet to be parsed
        (``input_pending``)."""
        now = time.monotonic()
        by_wait = self._queue.oldest_arrival() + self.settings.max_wait_s
        if input_pending:
            # Requests are in that the loop has yet to parse: the batch waits for them as long as
            # they keep bringing rows, each within max_wait_s of the last (rows queued while the
            # previous batch ran are old, yet they would leave alone with a batch too small).
            by_wait = max(by_wait, self._arrival_rate.last + self.settings.max_wait_s)
        else:
            missing = self.settings.max_batch_size - self._queue.rows
            if not self._arrival_rate.expects(missing, by_wait - now):
                return now, "idle"  # rows do not come fast enough for waiting to pay
        if self.cost.fitted:
            by_deadline = self._queue.tightest_deadline() - self.cost.seconds(self.settings.max_batch_size)
            if by_deadline < by_wait:
                return by_deadline, "deadline"
        return by_wait, "wait"

    def _drop_dead_heads(self) -> None:
        for lane in filter(None, self._queue.lanes):  # (the lanes in use, picked out in C: most are empty)
            while lane and lane[0].future.done():  # (Item.dead, without a call per head)
                self._queue.pop_head(lane)
                self._shed("cancelled")

    def _take(self) -> list[Item]:
        """The next batch: lanes by effective priority (aged), oldest first, rows of one shape, up to the limit.

        Within a lane the order stays first in, first out: a head of another row shape (or too many
        rows to fit) ends that lane's share of this batch rather than being overtaken.
        """
        now = time.monotonic()
        aging = self.settings.priority_aging_s
        lanes = sorted(
            (lane for lane in self._queue.lanes if lane),
            key=lambda lane: lane[0].priority + (now - lane[0].arrived) / aging,
            reverse=True,
        )
        batch: list[Item] = []
        room = self.settings.max_batch_size
        key = lanes[0][0].shape_key
        for lane in lanes:
            while lane and lane[0].rows <= room and lane[0].shape_key == key:
                item = self._queue.pop_head(lane)
                batch.append(item)
                room -= item.rows
        return batch

    # Executing

    async def _execute(self, batch: list[Item], reason: str, worker_wait_s: float) -> float:
        """Run a batch; the seconds it computed (``_batch_done`` gives its worker back with them)."""
        live = self._live(batch)
        if not live:
            return 0.0
        self._metrics.reason(reason).inc()
        now = time.monotonic()
        self._metrics.queue_wait.observe_each([now - item.arrived for item in live])
        with tracing.batch(self.label, live, reason):
            return await self._run(live, isolate=True, worker_wait_s=worker_wait_s)

    def _live(self, items: list[Item]) -> list[Item]:
        """Drop the items nobody waits for any more, those whose deadline passed, and those whose
        deadline will pass before the batch can end (the model's time goes to the others)."""
        now = time.monotonic()
        ends_at = now + self.cost.seconds(sum(item.rows for item in items)) if self.cost.fitted else now
        live = []
        for item in items:
            if item.dead:
                self._shed("cancelled")
            elif item.deadline <= now:
                self._shed("expired")
                item.fail(DeadlineExceeded(f"the deadline passed before model {self.label!r} could start"))
            elif item.deadline < ends_at:
                self._shed("would_expire")
                item.fail(
                    DeadlineExceeded(f"model {self.label!r} cannot finish its next batch before the request's deadline")
                )
            else:
                live.append(item)
        return live

    async def _run(self, items: list[Item], *, isolate: bool, worker_wait_s: float = 0.0) -> float:
        """Run one batch; the seconds it occupied its worker (for the scheduler's fair order)."""
        rows = sum(item.rows for item in items)
        deadline = max(item.deadline for item in items)
        self._metrics.batch_rows.observe(rows)
        started = time.monotonic()
        try:
            # The cost model learns the batch's time as the batcher sees it (hand-offs to and from the
            # executor included, which a busy event loop makes longer), less any time the batch waited
            # in the pool for a worker: that wait is the pool's, not this model's. The wait for the
            # scheduler's turn came before ``started``: it is the queue's, and never counted here.
            outputs, _, waited = await self._runner(_concatenate(items), rows, deadline)
            seconds = time.monotonic() - started - waited
            self._metrics.worker_wait.observe(worker_wait_s + waited)
        except DeadlineExceeded as exc:
            _fail(items, exc)
        except Exception as exc:
            if isolate and len(items) > 1:
                return await self._isolate(items)
            _fail(items, exc)
        else:
            self.cost.observe(rows, seconds)
            self._metrics.observe_cost(self.cost.per_row_s, self.cost.per_batch_s)
            _resolve(items, outputs)
            return seconds
        return time.monotonic() - started

    async def _isolate(self, items: list[Item]) -> float:
        """Bisect a failed batch so that only the items that make the model fail get its error."""
        self._metrics.isolations.inc()
        middle = len(items) // 2
        compute_s = 0.0
        for half in (items[:middle], items[middle:]):
            live = self._live(half)
            if live:
                compute_s += await self._run(live, isolate=len(live) > 1)
        return compute_s

    def _shed(self, reason: str) -> None:
        self._metrics.shed(reason).inc()

    # Closing

    async def aclose(self) -> None:
        """Refuse new rows, finish running batches, fail what is still queued."""
        self._closing = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        if self._running:
            await asyncio.wait(self._running)
        _fail(self._queue.clear(), ShuttingDown(f"model {self.label!r} shut down before this request ran"))

    def __repr__(self) -> str:
        return (
            f"Batcher({self.label!r}, queued_rows={self._queue.rows}, running={len(self._running)}, cost={self.cost!r})"
        )


class _RateMeter:
    """Arrival rate in rows per second, smoothed over recent arrivals."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self._smoothing = smoothing
        self.last = -math.inf
        """When rows last arrived (``time.monotonic()``)."""
        self._rows_per_s = 0.0

    def add(self, rows: int, now: float) -> None:
        # The first arrival finds an infinite gap (``last`` is -inf): it adds 0 rows/s to a rate of 0,
        # as no gap can be measured yet. Asked per request: no branch for it.
        gap = now - self.last
        self._rows_per_s += self._smoothing * (rows / (gap if gap > 1e-6 else 1e-6) - self._rows_per_s)
        self.last = now

    def expects(self, rows: int, within_s: float) -> bool:
        """Whether at least one more row is likely within ``within_s`` (waiting for ``rows`` may pay)."""
        return rows > 0 and within_s > 0 and self._rows_per_s * within_s >= 1.0


def _expire(future: asyncio.Future[Columns], label: str) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded(f"model {label!r} did not answer before the request's deadline"))


def _wake_up(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_result(None)


def _shape_key(columns: Columns) -> tuple[tuple[int, ...], ...]:
    # Rows can share a batch only if every input has the same row shape (dimensions declared -1 vary).
    return tuple([column.shape[1:] for column in columns.values()])


def _concatenate(items: list[Item]) -> Columns:
    if len(items) == 1:
        return items[0].columns
    return {name: np.concatenate([item.columns[name] for item in items]) for name in items[0].columns}


def _resolve(items: list[Item], outputs: Columns) -> None:
    start = 0
    for item in items:
        end = start + item.rows
        item.answer({name: column[start:end] for name, column in outputs.items()})
        start = end


def _fail(items: list[Item], exc: BaseException) -> None:
    for item in items:
        item.fail(exc)


def _log_crash(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("batching task %s crashed", task.get_name(), exc_info=task.exception())
