"""The prediction logger: a bounded buffer, batched background writes, retries, spill, flush on close.

How a record travels:

1. ``record()`` (synchronous, on the request path) encodes the record to JSON and appends it to
   the buffer, or, when the buffer is full, drops it and counts it or raises ``Overloaded``.
2. The writer task takes a batch when ``batch_size`` records wait, when the oldest has waited
   ``flush_interval_s``, when ``flush()`` asks, or when the logger closes.
3. It writes the batch to the sink, retrying with exponential backoff and jitter. A batch the
   sink still refuses is appended to the spill file (JSON Lines, fsynced), so nothing accepted is
   lost; only a failing spill (a full disk) loses records, and those are counted and logged.
4. ``aclose()`` stops accepting, writes out everything buffered, then closes the sink.

Invariant: ``accepted == written + spilled + lost + buffered``.
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
from asyncserve.predlog.sinks import LogSink

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

OverflowPolicy = Literal["refuse", "drop"]
DROP_WARNING_INTERVAL_S = 10.0
"""At most one warning about dropped records per this many seconds (each one gives the count)."""


class LoggerState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class LogStatistics:
    """Counts since the logger started. ``accepted == written + spilled + lost + buffered``."""

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
            While the sink keeps failing, later batches get one attempt each, so the buffer drains
            to the spill file at disk speed instead of filling up.
        retry_backoff_s: the first retry's delay; each later one doubles it.
        write_timeout_s: how long one sink write may take before it counts as failed.
        spill_path: the JSON Lines file that receives the batches the sink would not take.
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
        input_policy: InputPolicy = InputPolicy(),  # noqa: B008 (frozen, so sharing the default is safe)
        registry: CollectorRegistry | None = None,
    ) -> None:
        _validate(sink, max_buffer, batch_size, flush_interval_s, overflow, retries, retry_backoff_s, write_timeout_s)
        self.sink = sink
        self.max_buffer, self.batch_size, self.flush_interval_s = max_buffer, batch_size, flush_interval_s
        self.overflow, self.retries, self.retry_backoff_s = overflow, retries, retry_backoff_s
        self.write_timeout_s = write_timeout_s
        self.spill_path = Path(spill_path)
        self.input_policy = input_policy
        self._meter = SinkMeter(registry, sink.name, lambda: self._pending)
        self._delivery = Delivery(
            sink, self.spill_path, retries=retries, retry_backoff_s=retry_backoff_s,
            write_timeout_s=write_timeout_s, meter=self._meter,
        )  # fmt: skip
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
        """Open the sink and start the writer. Raises what the sink's ``open()`` raises."""
        if self._state is not LoggerState.NEW:
            raise RuntimeError(
                f"cannot start {self!r}: it is {self._state.value}; a logger starts once, so build a new one"
            )
        self._state = LoggerState.STARTING
        try:
            await self.sink.open()
        except BaseException:
            self._state = LoggerState.NEW
            raise
        if self._state is not LoggerState.STARTING:
            await self._delivery.aclose()
            raise RuntimeError(f"{self!r} was closed while it was starting")
        self._writer = asyncio.get_running_loop().create_task(self._run(), name=f"asyncserve-predlog-{self.sink.name}")
        self._writer.add_done_callback(self._writer_done)
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
        if writer is not None and not writer.done():
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
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
        )  # fmt: skip

    def __repr__(self) -> str:
        d = self._delivery
        return (
            f"<PredictionLogger sink={self.sink.name!r} state={self._state.value} accepted={self._accepted} "
            f"written={d.written} spilled={d.spilled} dropped={self._dropped} buffered={self._pending}>"
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
        await self._delivery.deliver(batch)
        # Cleared only now: if aclose() cancels the write, the batch is still here to be spilled.
        self._in_flight = []
        self._resolve_waiters()

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("prediction log %s: the writer crashed", self.sink.name, exc_info=task.exception())
            for _, waiter in self._waiters:
                if not waiter.done():
                    waiter.set_exception(RuntimeError(f"the writer of {self!r} crashed; see the log"))
            self._waiters = []


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
