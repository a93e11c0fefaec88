"""Delivering one batch: to the sink, with retries, backoff and jitter, or else to the spill file.

A sink's failure never leaves this module: it is counted, logged with the sink's name and
retried, and past the retries the batch is spilled. Only a failing spill (a full disk) loses a
batch, and that is counted as ``lost`` and logged as an error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

from asyncserve.predlog.files import JsonlSink
from asyncserve.predlog.metrics import SinkMeter
from asyncserve.predlog.records import LogRecord
from asyncserve.predlog.sinks import LogSink

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


class Delivery:
    """Writes batches to ``sink`` one at a time; what the sink will not take goes to ``spill_path``.

    ``retries`` further attempts follow a failed write, after ``retry_backoff_s``, then twice that,
    and so on (capped at 30 s), each scaled by a random factor in [0.5, 1] so that many servers do
    not retry in step. Once a batch has exhausted its retries the sink counts as failing, and
    later batches get a single attempt each until one succeeds: a dead sink then drains the
    buffer to the spill file at disk speed instead of letting it fill up.

    Example::

        delivery = Delivery(sink, Path("var/spill.jsonl"), retries=3, retry_backoff_s=0.2, write_timeout_s=10)
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
    ) -> None:
        self.sink = sink
        self.spill_path = spill_path
        self.retries, self.retry_backoff_s, self.write_timeout_s = retries, retry_backoff_s, write_timeout_s
        self._spill_file = JsonlSink(spill_path, rotate_bytes=None, fsync=True)
        self._meter = meter or SinkMeter(None, sink.name, lambda: 0)
        self.sink_failing = False
        self.written = self.spilled = self.lost = self.retried = self.failures = 0

    @property
    def delivered(self) -> int:
        """Records done with: written, spilled or lost."""
        return self.written + self.spilled + self.lost

    async def deliver(self, batch: Sequence[LogRecord]) -> None:
        """Write ``batch`` to the sink, or spill it; returns when the batch is stored one way or the other."""
        if await self._write_with_retries(batch):
            self.written += len(batch)
            self._meter.count("written", len(batch))
        else:
            await self.spill(batch)

    async def _write_with_retries(self, batch: Sequence[LogRecord]) -> bool:
        attempts = 1 if self.sink_failing else self.retries + 1
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                self.retried += 1
                await asyncio.sleep(self.backoff_s(attempt - 1))
            if await self._try_write(batch, attempt, attempts):
                if self.sink_failing:
                    logger.info("prediction log sink %s recovered", self.sink.name)
                self.sink_failing = False
                return True
        self.sink_failing = True
        return False

    def backoff_s(self, retry: int) -> float:
        """The delay before retry number ``retry`` (1, 2, ...)."""
        delay = min(self.retry_backoff_s * 2.0 ** (retry - 1), MAX_BACKOFF_S)
        return delay * random.uniform(0.5, 1.0)

    async def _try_write(self, batch: Sequence[LogRecord], attempt: int, attempts: int) -> bool:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await self.sink.write(batch)
        except Exception as exc:
            self.failures += 1
            self._meter.failure()
            logger.warning(
                "prediction log sink %s failed to write %d records (attempt %d of %d): %r",
                self.sink.name, len(batch), attempt, attempts, exc,
            )  # fmt: skip
            return False
        self._meter.write_time(time.perf_counter() - started)
        return True

    async def spill(self, batch: Sequence[LogRecord]) -> None:
        """Append ``batch`` to the spill file (fsynced), or count it lost if even that fails."""
        try:
            await self._spill_file.write(batch)
        except Exception as exc:
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

    async def aclose(self) -> None:
        """Close the sink and the spill file; a failure to close is logged, never raised."""
        for sink in (self.sink, self._spill_file):
            try:
                await sink.aclose()
            except Exception as exc:
                logger.warning("prediction log sink %s failed to close: %r", sink.name, exc)
