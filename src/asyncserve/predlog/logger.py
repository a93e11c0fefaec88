"""The prediction logger: a bounded buffer, batched background writes, retries, spill, flush on close.

How a record travels:

1. ``record()`` (synchronous, on the request path) encodes the record to JSON and appends it to
   the buffer, or, when the buffer is full, drops it and counts it or raises ``Overloaded``.
2. The writer task takes a batch when ``batch_size`` records wait, when the oldest has waited
   ``flush_interval_s``, when ``flush()`` asks, or when the logger closes.
3. It writes the batch to the sink, each write within ``write_timeout_s``, retrying quick
   failures with exponential backoff and jitter (``delivery.py``). A batch the sink still
   refuses, or whose write timed out, is appended to the spill file (JSON Lines, fsynced), and
   later batches go straight there while the sink is failing; so nothing accepted is lost, and a
   hanging sink never fills the buffer. Only a failing spill (a full disk) loses records, and
   those are counted and logged.
4. The replay task (``replay.py``) tries the sink again every ``replay_interval_s`` and, once it
   answers, stores the spill file in it, chunk by chunk, in turn with the writer's new batches.
   Each record carries a unique ``log_id`` and the sinks store it once, so a write that timed out
   but landed in the end, then was spilled and replayed, is not stored twice.
5. ``aclose()`` stops accepting, writes out everything buffered, then closes the sink.

A sink that is down when the logger starts does not stop it: a warning is logged, records are
spilled, and the replay task opens the sink once it answers.

Invariant: ``accepted == written + spilled + lost + buffered``; ``replayed`` counts the spilled
records stored in the sink since (those of earlier runs included).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import orjson

from asyncserve.exceptions import ConfigurationError, Overloaded
from asyncserve.predlog.delivery import Delivery
from asyncserve.predlog.metrics import SinkMeter
from asyncserve.predlog.records import InputPolicy, LogRecord
from asyncserve.predlog.replay import Replayer
from asyncserve.predlog.sinks import LogSink

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

OverflowPolicy = Literal["refuse", "drop"]
DROP_WARNING_INTERVAL_S = 10.0
"""At most one warning about dropped records per this many seconds (each one gives the count)."""
START_WAIT_S = 1.0
"""How long ``start()`` waits for the sink to open; a sink slower than that opens in the background."""


class LoggerState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class LogStatistics:
    """Counts since the logger started. ``accepted == written + spilled + lost + buffered``.

    ``replayed`` counts records taken from the spill file and stored in the sink (spilled by
    this logger, or left by an earlier run).
    """

    accepted: int
    written: int
    spilled: int
    lost: int
    buffered: int
    dropped: int
    refused: int
    invalid: int
    retried: int
    failures: int
    replayed: int = 0


class PredictionLogger:
    """Logs predictions to a sink without ever making a request wait for it.

    Args:
        sink: where batches go (``JsonlSink``, ``SQLiteSink``, ``PostgresSink``, ``RedisStreamSink``,
            or ``open_sink(url)``). The logger opens it in ``start()`` and closes it in ``aclose()``.
        max_buffer: records accepted but not yet stored, at most; past it the ``overflow`` policy applies.
        batch_size: records per sink write, at most.
        flush_interval_s: how long the oldest buffered record waits for a batch to fill.
        overflow: ``"drop"`` drops a record that finds the buffer full (counted, and warned about);
            ``"refuse"`` raises ``Overloaded`` (503) instead, so that no prediction goes unlogged.
        retries: further attempts at a batch the sink refused, with exponential backoff and jitter.
            A write that timed out is not retried: its batch is spilled at once. Once a batch is
            spilled, later batches go straight to the spill file until the sink is back, so the
            buffer drains at disk speed instead of filling up.
        retry_backoff_s: the first retry's delay; each later one doubles it.
        write_timeout_s: how long one sink call (a write, or opening it) may take before it counts as failed.
        spill_path: the JSON Lines file that receives the batches the sink would not take; replayed
            into the sink once it is back (and at start, if an earlier run left records in it).
            It belongs to one sink: loggers of different sinks need different spill paths.
        replay_interval_s: while the sink is failing, how often it is tried again (by opening it
            if it never opened, and by replaying the spill file), scaled by a random factor in [0.5, 1].
        input_policy: how record inputs are kept (in full, hashed, or redacted).
        registry: a Prometheus registry for the ``asyncserve_predlog_*`` metrics, or ``None``.

    Example::

        async with PredictionLogger(open_sink("var/predictions.jsonl"), overflow="refuse") as log:
            log.check_room()                  # before the prediction: Overloaded if the log is full
            outputs = await predict(inputs)
            log.record(prediction_record(request_id=rid, model="churn", version="3",
                                         inputs=inputs, outputs=outputs, latency_ms={"model": 8.5}))
        # leaving the block writes out every accepted record
    """

    def __init__(
        self,
        sink: LogSink,
        *,
        max_buffer: int = 10_000,
        batch_size: int = 500,
        flush_interval_s: float = 1.0,
        overflow: OverflowPolicy = "drop",
        retries: int = 3,
        retry_backoff_s: float = 0.2,
        write_timeout_s: float | None = 10.0,
        spill_path: Path | str = Path("var/predlog-spill.jsonl"),
        replay_interval_s: float = 1.0,
        input_policy: InputPolicy = InputPolicy(),  # noqa: B008 (frozen, so sharing the default is safe)
        registry: CollectorRegistry | None = None,
    ) -> None:
        _validate(sink, max_buffer, batch_size, flush_interval_s, overflow, retries, retry_backoff_s, write_timeout_s)
        if replay_interval_s <= 0:
            raise ConfigurationError(f"replay_interval_s must be a number of seconds > 0, got {replay_interval_s}")
        self.sink = sink
        self.max_buffer, self.batch_size, self.flush_interval_s = max_buffer, batch_size, flush_interval_s
        self.overflow, self.retries, self.retry_backoff_s = overflow, retries, retry_backoff_s
        self.write_timeout_s = write_timeout_s
        self.spill_path = Path(spill_path)
        self.input_policy = input_policy
        self._meter = SinkMeter(registry, sink.name, lambda: self._pending)
        self._delivery = Delivery(
            sink, self.spill_path, retries=retries, retry_backoff_s=retry_backoff_s,
            write_timeout_s=write_timeout_s, meter=self._meter, on_spill=lambda: self._replayer.wake(),
        )  # fmt: skip
        self._replayer = Replayer(self._delivery, batch_size=batch_size, interval_s=replay_interval_s)
        self._replaying: asyncio.Task[None] | None = None
        self._state = LoggerState.NEW
        self._buffer: deque[tuple[float, LogRecord]] = deque()
        self._in_flight: list[LogRecord] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._taken = self._flush_target = 0
        self._last_drop_warning, self._dropped_since_warning = float("-inf"), 0
        self._accepted = self._dropped = self._refused = self._invalid = 0

    # Lifecycle

    async def __aenter__(self) -> PredictionLogger:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the sink, start the writer and the replay of the spill file (if an earlier run left one).

        A sink that cannot be opened does not stop the start, unless its store answers that the sink is
        misconfigured (``ConfigurationError``: a PostgreSQL database that does not exist), which no
        retry would mend. ``start()`` waits ``START_WAIT_S`` at
        most for the sink to open (a store that answers, even to refuse, takes milliseconds); a
        slower one goes on opening in the background, within ``write_timeout_s``, while records are
        accepted into the buffer. If the open fails, a warning is logged, records are spilled, and
        the sink is opened in the background once it answers, then the spill file replayed into it.
        """
        if self._state is not LoggerState.NEW:
            raise RuntimeError(
                f"cannot start {self!r}: it is {self._state.value}; a logger starts once, so build a new one"
            )
        self._state = LoggerState.STARTING
        opening = self._delivery.start_opening()
        try:
            await asyncio.wait({opening}, timeout=START_WAIT_S)
        except BaseException:
            opening.cancel()
            self._state = LoggerState.NEW
            raise
        if not opening.done():
            logger.info("prediction log sink %s is slow to open; records wait in the buffer meanwhile", self.sink.name)
        elif (misconfigured := self._delivery.misconfigured) is not None:
            self._state = LoggerState.CLOSED
            await self._delivery.aclose()
            raise misconfigured
        if self._state is not LoggerState.STARTING:
            await self._delivery.aclose()
            raise RuntimeError(f"{self!r} was closed while it was starting")
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._run(), name=f"asyncserve-predlog-{self.sink.name}")
        self._writer.add_done_callback(self._writer_done)
        self._replaying = loop.create_task(self._replayer.run(), name=f"asyncserve-predlog-replay-{self.sink.name}")
        self._replaying.add_done_callback(self._replayer_done)
        self._replayer.wake()
        self._state = LoggerState.RUNNING

    async def aclose(self, timeout_s: float | None = None) -> None:
        """Stop accepting, write out every buffered record, then close the sink. Safe to call twice.

        Past ``timeout_s`` the write in progress is cancelled and whatever is left is spilled, so
        records accepted before ``aclose()`` are either in the sink or in the spill file.
        """
        if self._state is LoggerState.CLOSING:
            await self._closed.wait()
            return
        if self._state is not LoggerState.RUNNING:
            self._state = LoggerState.CLOSED  # never started: the sink was never opened
            return
        self._state = LoggerState.CLOSING
        self._wakeup.set()
        # The replay stops first: what it has not replayed stays in the spill file for the next start.
        await _cancel(self._replaying)
        try:
            await self._drain(timeout_s)
        finally:
            await self._finish()

    async def _drain(self, timeout_s: float | None) -> None:
        if self._writer is None:  # pragma: no cover (running implies a writer)
            return
        done, _ = await asyncio.wait({self._writer}, timeout=timeout_s)
        if not done:
            logger.warning(
                "prediction log %s: flushing did not finish within %.1fs; spilling the %d records left",
                self.sink.name, timeout_s or 0.0, self._pending,
            )  # fmt: skip

    async def _finish(self) -> None:
        writer, self._writer = self._writer, None
        await _cancel(writer)
        leftovers = self._in_flight + [entry for _, entry in self._buffer]
        self._in_flight, self._buffer = [], deque()
        if leftovers:
            await self._delivery.spill(leftovers)
        await self._delivery.aclose()
        self._state = LoggerState.CLOSED
        self._resolve_waiters()
        self._closed.set()
        logger.info("prediction log %s closed: %r", self.sink.name, self.statistics())

    # The request path: synchronous and never waiting

    def record(self, record: Mapping[str, Any]) -> None:
        """Accept one record (see :func:`prediction_record`) for writing; returns at once.

        Raises:
            Overloaded: the buffer is full and the overflow policy is ``"refuse"``.
            RuntimeError: the logger is not running (not started yet, or closing).
        """
        self._require_running()
        if self._pending >= self.max_buffer:
            self._overflow()
            return
        try:
            entry = LogRecord.encode(record, self.input_policy)
        except (orjson.JSONEncodeError, TypeError, ValueError) as exc:
            # Never fail a prediction over its log record: count it and say why.
            self._invalid += 1
            self._meter.count("invalid")
            logger.error("prediction log %s: cannot encode a record as JSON (%s); not logged", self.sink.name, exc)
            return
        self._buffer.append((time.monotonic(), entry))
        self._accepted += 1
        self._meter.count("accepted")
        waiting = len(self._buffer)
        if waiting == 1 or waiting >= self.batch_size:
            self._wakeup.set()

    def has_room(self) -> bool:
        """Whether a record would be accepted now."""
        return self._state is LoggerState.RUNNING and self._pending < self.max_buffer

    def check_room(self) -> None:
        """With ``overflow="refuse"``, raise ``Overloaded`` if the buffer is full, before any work is done.

        Call it before computing a prediction, so that a full log turns the request away cheaply.
        With ``overflow="drop"`` it never raises: a record that finds the buffer full is dropped.
        """
        self._require_running()
        if self.overflow == "refuse" and self._pending >= self.max_buffer:
            self._refuse()

    def _overflow(self) -> None:
        if self.overflow == "refuse":
            self._refuse()
        self._dropped += 1
        self._dropped_since_warning += 1
        self._meter.count("dropped")
        now = time.monotonic()
        if now - self._last_drop_warning >= DROP_WARNING_INTERVAL_S:
            logger.warning(
                "prediction log %s is full (%d records): dropped %d records since the last warning, %d in all; "
                "the sink is falling behind",
                self.sink.name, self.max_buffer, self._dropped_since_warning, self._dropped,
            )  # fmt: skip
            self._last_drop_warning, self._dropped_since_warning = now, 0

    def _refuse(self) -> None:
        self._refused += 1
        self._meter.count("refused")
        raise Overloaded(
            f"the prediction log is full: {self.max_buffer} records are waiting for sink {self.sink.name!r}, "
            "which is falling behind; retry shortly",
            retry_after_s=self.flush_interval_s,
        )

    def _require_running(self) -> None:
        if self._state is not LoggerState.RUNNING:
            raise RuntimeError(
                f"{self!r} is {self._state.value}: records are accepted between start() and aclose() only"
            )

    # Observing and flushing

    @property
    def state(self) -> LoggerState:
        return self._state

    @property
    def _pending(self) -> int:
        return len(self._buffer) + len(self._in_flight)

    def statistics(self) -> LogStatistics:
        d = self._delivery
        return LogStatistics(
            accepted=self._accepted, written=d.written, spilled=d.spilled, lost=d.lost, buffered=self._pending,
            dropped=self._dropped, refused=self._refused, invalid=self._invalid, retried=d.retried, failures=d.failures,
            replayed=d.replayed,
        )  # fmt: skip

    def __repr__(self) -> str:
        d = self._delivery
        return (
            f"<PredictionLogger sink={self.sink.name!r} state={self._state.value} accepted={self._accepted} "
            f"written={d.written} spilled={d.spilled} replayed={d.replayed} dropped={self._dropped} "
            f"buffered={self._pending}>"
        )

    async def flush(self) -> None:
        """Write out now every record accepted so far; return once each is in the sink or spilled."""
        self._require_running()
        target = self._accepted
        if self._delivery.delivered >= target:
            return
        self._flush_target = max(self._flush_target, target)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((target, waiter))
        self._wakeup.set()
        await waiter

    def _resolve_waiters(self) -> None:
        finished = self._state is LoggerState.CLOSED
        still: list[tuple[int, asyncio.Future[None]]] = []
        for target, waiter in self._waiters:
            if waiter.done():
                continue
            if finished or self._delivery.delivered >= target:
                waiter.set_result(None)
            else:
                still.append((target, waiter))
        self._waiters = still

    # The writer task

    async def _run(self) -> None:
        while batch := await self._next_batch():
            await self._deliver(batch)

    async def _next_batch(self) -> list[LogRecord]:
        while not self._buffer:
            if self._state is not LoggerState.RUNNING:
                return []
            await self._wait(None)
        deadline = self._buffer[0][0] + self.flush_interval_s
        while not self._batch_due():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self._wait(remaining)
        count = min(self.batch_size, len(self._buffer))
        self._in_flight = [self._buffer.popleft()[1] for _ in range(count)]
        self._taken += count
        return self._in_flight

    def _batch_due(self) -> bool:
        return (
            len(self._buffer) >= self.batch_size
            or self._state is not LoggerState.RUNNING
            or self._flush_target > self._taken
        )

    async def _wait(self, timeout_s: float | None) -> None:
        # Cleared and awaited with no await in between: a set() from record() cannot be missed.
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wakeup.wait()

    async def _deliver(self, batch: list[LogRecord]) -> None:
        try:
            await self._delivery.deliver(batch)
        finally:
            # Cleared once the batch is stored or spilled, even if aclose() cancelled us after
            # that: a batch still here when the writer stops is spilled by aclose().
            if self._delivery.delivered >= self._taken:
                self._in_flight = []
        self._resolve_waiters()

    def _replayer_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "prediction log %s: the replay of the spill file crashed; it resumes at the next start",
                self.sink.name, exc_info=task.exception(),
            )  # fmt: skip

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("prediction log %s: the writer crashed", self.sink.name, exc_info=task.exception())
            for _, waiter in self._waiters:
                if not waiter.done():
                    waiter.set_exception(RuntimeError(f"the writer of {self!r} crashed; see the log"))
            self._waiters = []


async def _cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait for it to end; a cancellation of the caller itself goes on up."""
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


def _validate(
    sink: object,
    max_buffer: int,
    batch_size: int,
    flush_interval_s: float,
    overflow: str,
    retries: int,
    retry_backoff_s: float,
    write_timeout_s: float | None,
) -> None:
    problems = [
        (not isinstance(sink, LogSink), f"sink must have name, open(), write() and aclose(), got {sink!r}"),
        (max_buffer < 1, f"max_buffer must be an integer >= 1, got {max_buffer}"),
        (not 1 <= batch_size <= max_buffer, f"batch_size must be from 1 to max_buffer={max_buffer}, got {batch_size}"),
        (flush_interval_s <= 0, f"flush_interval_s must be a number of seconds > 0, got {flush_interval_s}"),
        (overflow not in ("refuse", "drop"), f"overflow must be 'refuse' or 'drop', got {overflow!r}"),
        (retries < 0, f"retries must be an integer >= 0, got {retries}"),
        (retry_backoff_s < 0, f"retry_backoff_s must be a number of seconds >= 0, got {retry_backoff_s}"),
        (write_timeout_s is not None and write_timeout_s <= 0, f"write_timeout_s must be > 0, got {write_timeout_s}"),
    ]  # fmt: skip
    for broken, message in problems:
        if broken:
            raise ConfigurationError(message)
