"""Delivering batches: to the sink, each call within its time limit, with retries, or else to the spill file.

A sink's failure never leaves this module: it is counted, logged with the sink's name, and
either retried (a quick failure, with backoff) or answered by spilling the batch at once (a
write that timed out: a sink that hangs gets no second long try). From then on the sink counts
as *failing*, and every batch goes straight to the spill file, at disk speed, until the replay
(``replay.py``) finds that the sink answers again. Only a failing spill (a
full disk) loses a batch, and that is counted as ``lost`` and logged as an error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from asyncserve.exceptions import ConfigurationError
from asyncserve.predlog.metrics import SinkMeter
from asyncserve.predlog.records import LogRecord
from asyncserve.predlog.sinks import LogSink
from asyncserve.predlog.spill import SpillFile

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
CANCEL_GRACE_S = 1.0
"""How long a sink call past its time limit may take to end once cancelled; past it, it is left
running (and the sink counts as failing until it ends)."""
CLOSE_TIMEOUT_S = 10.0

SinkCall = Callable[[], Coroutine[Any, Any, None]]


class SinkTimeout(Exception):
    """A sink call did not end within its time limit (or a previous one is still running)."""


class Delivery:
    """Writes batches to ``sink`` one call at a time; what the sink will not take goes to ``spill_path``.

    Every sink call (``open``, ``write``) runs as a task that is cancelled past ``write_timeout_s``
    and then waited for ``CANCEL_GRACE_S`` at most: a client library that waits for a server's
    answer to its cancellation cannot hold the writer. A call that raised quickly is retried
    ``retries`` times, after ``retry_backoff_s``, then twice that, and so on (capped at 30 s), each
    scaled by a random factor in [0.5, 1] so that many servers do not retry in step. A call that
    timed out is not retried: its batch is spilled at once. Either way the sink then counts as
    failing (``sink_failing``) and later batches are spilled without trying it, until it answers
    the replay's ``probe()`` (a write of no records), so a dead or frozen sink never fills the buffer.

    Example::

        delivery = Delivery(sink, Path("var/spill.jsonl"), retries=3, retry_backoff_s=0.2, write_timeout_s=10)
        await delivery.open()              # False (and a warning) if the sink is down
        await delivery.deliver(batch)      # never raises for the sink's sake
    """

    def __init__(
        self,
        sink: LogSink,
        spill_path: Path,
        *,
        retries: int,
        retry_backoff_s: float,
        write_timeout_s: float | None,
        meter: SinkMeter | None = None,
        on_spill: Callable[[], None] = lambda: None,
    ) -> None:
        self.sink = sink
        self.spill_path = spill_path
        self.retries, self.retry_backoff_s, self.write_timeout_s = retries, retry_backoff_s, write_timeout_s
        self.spill_file = SpillFile(spill_path)
        self._meter = meter or SinkMeter(None, sink.name, lambda: 0)
        self._on_spill = on_spill
        # One sink call at a time: the writer's batches and the replay's chunks take turns.
        self._lock = asyncio.Lock()
        self._stuck: asyncio.Task[None] | None = None
        self._late_open: asyncio.Task[None] | None = None
        self._opening: asyncio.Task[bool] | None = None
        self.opened = False
        self.misconfigured: ConfigurationError | None = None
        """Set when the sink's store answered that it is misconfigured (a database that does not exist)."""
        self.sink_failing = False
        self._background_failed = False
        self.written = self.spilled = self.lost = self.replayed = self.retried = self.failures = 0

    @property
    def delivered(self) -> int:
        """Records done with: written, spilled or lost."""
        return self.written + self.spilled + self.lost

    def start_opening(self) -> asyncio.Task[bool]:
        """Begin opening the sink, in a task of its own: until it ends, the first batch waits for it."""
        self._opening = asyncio.ensure_future(self.open())
        return self._opening

    async def ensure_open(self) -> bool:
        """Whether the sink is open, after an attempt to open it if it is not (or after the one under way)."""
        if self.opened:
            return True
        if self._opening is None or self._opening.done():
            self._opening = asyncio.ensure_future(self.open())
        return await asyncio.shield(self._opening)

    async def open(self) -> bool:
        """Open the sink within the time limit; on failure log a warning, count the sink failing, return False.

        Only the first of consecutive failures is a warning; the replay's later attempts log at debug level.
        """
        if self._late_open is not None and self._late_open.done() and _succeeded(self._late_open):
            self.opened = True  # an open abandoned past its time limit did succeed in the end
            return True
        stuck_before = self._stuck
        try:
            await self._call(self.sink.open)
        except ConfigurationError as exc:
            # The store answered that the sink is misconfigured (no such database): start-up fails on it.
            self.misconfigured = exc
            return False
        except Exception as exc:
            self._late_open = self._stuck if self._stuck is not stuck_before else None
            self._count_failure()
            logger.log(
                logging.DEBUG if self.sink_failing else logging.WARNING,
                "prediction log sink %s is unreachable (%r): records are spilled to %s and replayed once it is back",
                self.sink.name, exc, self.spill_path,
            )  # fmt: skip
            self.sink_failing = True
            return False
        self.opened = True
        return True

    async def deliver(self, batch: Sequence[LogRecord]) -> None:
        """Write ``batch`` to the sink, or spill it; returns when the batch is stored one way or the other."""
        if not self.opened and self._opening is not None and not self._opening.done():
            await asyncio.shield(self._opening)  # the first open is under way: its outcome decides
        if self.opened and not self.sink_failing and await self._write_with_retries(batch):
            self.written += len(batch)
            self._meter.count("written", len(batch))
        else:
            await self.spill(batch)

    async def _write_with_retries(self, batch: Sequence[LogRecord]) -> bool:
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                self.retried += 1
                await asyncio.sleep(self.backoff_s(attempt - 1))
            try:
                await self._write(batch)
            except SinkTimeout as exc:
                self._failed(f"write {len(batch)} records (attempt {attempt} of {attempts}); spilling", exc)
                break
            except Exception as exc:
                self._failed(f"write {len(batch)} records (attempt {attempt} of {attempts})", exc)
                continue
            return True
        self.sink_failing = True
        return False

    async def probe(self) -> bool:
        """Whether a failing sink answers again (to a write of no records); if so it is healthy again."""
        if not await self._background(lambda: self._call(lambda: self.sink.write(())), "answer"):
            return False
        if self.sink_failing:
            self.sink_failing = False
            logger.info("prediction log sink %s is back; replaying the spill file %s", self.sink.name, self.spill_path)
        return True

    async def replay(self, records: Sequence[LogRecord]) -> bool:
        """One attempt at writing ``records`` taken from the spill file."""
        if not await self._background(lambda: self._write(records), f"replay {len(records)} spilled records"):
            return False
        self.replayed += len(records)
        self._meter.count("replayed", len(records))
        return True

    async def _background(self, attempt: SinkCall, what: str) -> bool:
        """One attempt of the replay's; of consecutive failures only the first is a warning."""
        try:
            await attempt()
        except Exception as exc:
            self._failed(what, exc, quiet=self._background_failed)
            self._background_failed = True
            if isinstance(exc, SinkTimeout):
                self.sink_failing = True  # it hangs: the writer must not wait for it too
            return False
        self._background_failed = False
        return True

    def backoff_s(self, retry: int) -> float:
        """The delay before retry number ``retry`` (1, 2, ...)."""
        delay = min(self.retry_backoff_s * 2.0 ** (retry - 1), MAX_BACKOFF_S)
        return delay * random.uniform(0.5, 1.0)

    async def _write(self, batch: Sequence[LogRecord]) -> None:
        started = time.perf_counter()
        await self._call(lambda: self.sink.write(batch))
        self._meter.write_time(time.perf_counter() - started)

    async def _call(self, call: SinkCall) -> None:
        """Run one sink call within ``write_timeout_s``; raise ``SinkTimeout`` past it, else what it raised."""
        async with self._lock:
            if self._stuck is not None and not self._stuck.done():
                raise SinkTimeout("the previous call to the sink, cancelled after its time limit, has not ended yet")
            self._stuck = None
            task = asyncio.ensure_future(call())
            try:
                done, _ = await asyncio.wait({task}, timeout=self.write_timeout_s)
            except asyncio.CancelledError:
                self._abandon(task)
                raise
            if not done and not await self._succeeded_once_cancelled(task):
                raise SinkTimeout(f"no answer within {self.write_timeout_s}s")
            task.result()

    async def _succeeded_once_cancelled(self, task: asyncio.Task[None]) -> bool:
        """Cancel a call past its time limit: True if it had succeeded after all, False otherwise."""
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
        if not done:
            self._abandon(task)
            return False
        return _succeeded(task)

    def _abandon(self, task: asyncio.Task[None]) -> None:
        task.cancel()
        task.add_done_callback(_retrieve)
        self._stuck = task

    def _count_failure(self) -> None:
        self.failures += 1
        self._meter.failure()

    def _failed(self, what: str, exc: BaseException, *, quiet: bool = False) -> None:
        self._count_failure()
        level = logging.DEBUG if quiet else logging.WARNING
        logger.log(level, "prediction log sink %s failed to %s: %r", self.sink.name, what, exc)

    async def spill(self, batch: Sequence[LogRecord]) -> None:
        """Append ``batch`` to the spill file (fsynced), or count it lost if even that fails.

        Once begun, the append finishes even if the caller is cancelled, so that the counts say
        where the batch is: spilled (``delivered`` includes it) or not.
        """
        task = asyncio.ensure_future(self.spill_file.append(batch))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait({task})
            self._count_spill(task, batch)
            raise
        self._count_spill(task, batch)

    def _count_spill(self, task: asyncio.Task[None], batch: Sequence[LogRecord]) -> None:
        exc = task.exception() if not task.cancelled() else asyncio.CancelledError()
        if exc is not None:
            self.lost += len(batch)
            self._meter.count("lost", len(batch))
            logger.error(
                "prediction log %s: could not spill %d records to %s (%r); they are lost (%d lost in all)",
                self.sink.name, len(batch), self.spill_path, exc, self.lost,
            )  # fmt: skip
            return
        self.spilled += len(batch)
        self._meter.count("spilled", len(batch))
        logger.warning(
            "prediction log %s: spilled %d records to %s (%d spilled in all)",
            self.sink.name, len(batch), self.spill_path, self.spilled,
        )  # fmt: skip
        self._on_spill()

    async def aclose(self) -> None:
        """Close the sink (within the write timeout, or ``CLOSE_TIMEOUT_S``) and the spill file.

        A failure is logged, never raised. An open still under way is cancelled, and so, again, is a
        sink call left running past its time limit.
        """
        for task in (self._opening, self._stuck):
            if task is not None and not task.done():
                task.cancel()
        if self.opened:
            try:
                async with asyncio.timeout(min(self.write_timeout_s or CLOSE_TIMEOUT_S, CLOSE_TIMEOUT_S)):
                    await self.sink.aclose()
            except Exception as exc:
                logger.warning("prediction log sink %s failed to close: %r", self.sink.name, exc)
        try:
            await self.spill_file.aclose()
        except OSError as exc:
            logger.warning("prediction log spill file %s failed to close: %r", self.spill_path, exc)


def _succeeded(task: asyncio.Task[None]) -> bool:
    return not task.cancelled() and task.exception() is None


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so that asyncio does not report it as never retrieved
