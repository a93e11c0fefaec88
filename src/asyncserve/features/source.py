"""FeatureSource: the base of every feature source, and everything sources share.

A source answers "the rows for these keys" in one round trip (``_fetch``); the base class turns
that into a lookup that many concurrent requests share:

- **Cross-request batching**: keys asked for while a round trip is running wait, merged and
  de-duplicated, and leave together in the next one (``... WHERE key = ANY($1)``, one ``MGET``,
  one batch call). Like the model batcher it pulls: an idle source sends a lone key at once.
- **Single flight and caching**: a key already on its way is not asked again; with
  ``cache_ttl_s`` an answer (a missing row included) is kept that long.
- **Timeouts, retries, circuit breaking**: each round trip is capped by ``timeout_s``; reads are
  retried with jittered exponential backoff; after ``breaker_failures`` failed round trips in a
  row the source fails fast for ``breaker_reset_s``, then lets one trial through.
- Each request waits only until its own deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import random
import time
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asyncserve import tracing
from asyncserve.cache import TTLCache
from asyncserve.exceptions import ConfigurationError, FeatureTimeout, FeatureUnavailable

if TYPE_CHECKING:  # importing asyncserve must not import prometheus_client
    from asyncserve.metrics import SourceMetrics

logger = logging.getLogger(__name__)

Key = Hashable
Row = Mapping[str, Any]
Rows = dict[Key, Row | None]
"""The answer of a lookup: each key's row, or None when the source has no row for it."""


@dataclass(frozen=True, kw_only=True)
class SourcePolicy:
    """How a source is called; every field can be given to any source's constructor."""

    timeout_s: float = 1.0
    """Longest one round trip may take."""
    retries: int = 2
    """Extra attempts after a failed round trip (reads are idempotent)."""
    backoff_s: float = 0.02
    """First retry delay; doubled each attempt, with +-50% jitter."""
    cache_ttl_s: float | None = None
    """Keep answers this long; None turns the cache off."""
    cache_size: int = 100_000
    max_batch_keys: int = 1000
    """Most keys in one round trip."""
    max_concurrent_fetches: int = 4
    """Round trips in flight at once; keys asked for meanwhile wait and are batched."""
    breaker_failures: int = 5
    breaker_reset_s: float = 5.0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ConfigurationError("a source needs timeout_s > 0, retries >= 0 and backoff_s >= 0")
        if self.max_batch_keys < 1 or self.max_concurrent_fetches < 1 or self.breaker_failures < 1:
            raise ConfigurationError("max_batch_keys, max_concurrent_fetches and breaker_failures must be >= 1")


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Counts failed round trips in a row; past the limit, refuses calls until ``reset_s`` passed.

    Then it is half open: calls go through, and the next round trip closes it again or reopens it.
    """

    def __init__(self, failures: int, reset_s: float) -> None:
        self._limit, self._reset_s = failures, reset_s
        self._failures = 0
        self._opened_at = 0.0

    @property
    def state(self) -> BreakerState:
        if self._failures < self._limit:
            return BreakerState.CLOSED
        if time.monotonic() - self._opened_at >= self._reset_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def succeeded(self) -> None:
        self._failures = 0

    def failed(self) -> None:
        self._failures += 1
        if self._failures >= self._limit:
            self._opened_at = time.monotonic()


class FeatureSource:
    """Base class of feature sources. Subclasses implement ``_fetch`` and, if needed, ``_open``/``_close``.

    Example of a source of one's own::

        class Scores(FeatureSource):
            async def _fetch(self, keys):
                return {key: {"score": await my_service.score(key)} for key in keys}

        scores = Scores("scores", timeout_s=0.2, cache_ttl_s=60)
    """

    def __init__(self, name: str, **policy: Any) -> None:
        self.name = name
        self.policy = SourcePolicy(**policy)
        self.breaker = CircuitBreaker(self.policy.breaker_failures, self.policy.breaker_reset_s)
        self.cache: TTLCache[Row | None] | None = (
            TTLCache(self.policy.cache_ttl_s, self.policy.cache_size) if self.policy.cache_ttl_s else None
        )
        self.round_trips = 0
        self._metrics: SourceMetrics | None = None
        self._pending: dict[Key, asyncio.Future[Row | None]] = {}
        self._in_flight: dict[Key, asyncio.Future[Row | None]] = {}
        # asyncio primitives bind to a loop only when first used, so they can be made here.
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.policy.max_concurrent_fetches)
        self._dispatcher: asyncio.Task[None] | None = None
        self._round_trip_tasks: set[asyncio.Task[None]] = set()
        self._round_trip_context: contextvars.Context | None = None
        """While tracing: the context of the first request waiting for the next round trip, which runs in it."""
        self._connected = False

    # What a backend implements

    async def _open(self) -> None:
        """Connect (create pools, clients); runs once when the server starts."""

    async def _fetch(self, keys: list[Key]) -> Mapping[Key, Row]:
        """One round trip: the rows of ``keys``; a key the source has no row for is left out."""
        raise NotImplementedError

    async def _close(self) -> None:
        """Release connections."""

    # Life cycle

    async def open(self, metrics: SourceMetrics | None = None) -> None:
        if self._dispatcher is not None:
            raise RuntimeError(f"feature source {self.name!r} is already open")
        self._metrics = metrics
        # Fresh primitives: a source closed by one server may be opened by the next, on another event loop
        # (a module-level service served twice in one process), and asyncio primitives keep their first loop.
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.policy.max_concurrent_fetches)
        await self._connect()
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(), name=f"source-{self.name}")
        self._dispatcher.add_done_callback(_log_crash)

    async def _connect(self) -> bool:
        """Connect if not connected; a source that cannot connect yet retries on its next round trip."""
        if self._connected:
            return True
        try:
            async with asyncio.timeout(self.policy.timeout_s * 5):
                await self._open()
        except Exception as exc:
            logger.warning("feature source %s cannot connect yet: %r", self.name, exc)
            self.breaker.failed()
            return False
        self._connected = True
        return True

    async def aclose(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        if self._round_trip_tasks:
            await asyncio.wait(self._round_trip_tasks)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(FeatureUnavailable(f"feature source {self.name!r} closed"))
        self._pending.clear()
        if self._connected:
            self._connected = False
            await self._close()

    @property
    def healthy(self) -> bool:
        return self.breaker.state is not BreakerState.OPEN

    # Looking up

    async def lookup(self, keys: Iterable[Key], deadline: float) -> Rows:
        """The rows of ``keys``, sharing round trips with concurrent lookups; waits at most until ``deadline``."""
        if self._dispatcher is None:
            raise RuntimeError(f"feature source {self.name!r} is not open; the server opens it at start-up")
        if self.breaker.state is BreakerState.OPEN:
            self._count_error("breaker_open")
            raise FeatureUnavailable(f"feature source {self.name!r} is failing; its circuit breaker is open")
        rows, waiting = self._from_cache_or_queue(keys)
        if waiting:
            rows.update(await self._wait(waiting, deadline))
        return rows

    def _from_cache_or_queue(self, keys: Iterable[Key]) -> tuple[Rows, dict[Key, asyncio.Future[Row | None]]]:
        rows: Rows = {}
        waiting: dict[Key, asyncio.Future[Row | None]] = {}
        loop = asyncio.get_running_loop()
        for key in dict.fromkeys(keys):
            if self.cache is not None and key in self.cache:
                rows[key] = self.cache.get(key)
                self._count_cache("hit")
                continue
            if self.cache is not None:
                self._count_cache("miss")
            future = self._in_flight.get(key) or self._pending.get(key)
            if future is None:
                future = self._pending[key] = loop.create_future()
            waiting[key] = future
        if self._pending:
            self._wakeup.set()
            if tracing.tracer is not None and self._round_trip_context is None:
                self._round_trip_context = contextvars.copy_context()  # its traceparent goes with the round trip
        return rows, waiting

    async def _wait(self, waiting: dict[Key, asyncio.Future[Row | None]], deadline: float) -> Rows:
        pending = [future for future in waiting.values() if not future.done()]
        if pending and not await _all_done_by(pending, deadline):
            self._count_error("timeout")
            raise FeatureTimeout(f"feature source {self.name!r} did not answer before the request's deadline")
        return {key: future.result() for key, future in waiting.items()}

    # Round trips

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = dict(list(self._pending.items())[: self.policy.max_batch_keys])
            for key in batch:
                del self._pending[key]
            self._in_flight.update(batch)
            context, self._round_trip_context = self._round_trip_context, None
            task = asyncio.get_running_loop().create_task(self._round_trip(batch), context=context)
            self._round_trip_tasks.add(task)
            task.add_done_callback(self._round_trip_done)

    def _round_trip_done(self, task: asyncio.Task[None]) -> None:
        self._round_trip_tasks.discard(task)
        self._slots.release()
        _log_crash(task)

    async def _round_trip(self, batch: dict[Key, asyncio.Future[Row | None]]) -> None:
        keys = list(batch)
        try:
            found = await self._fetch_with_retries(keys)
        except Exception as exc:
            error = exc if isinstance(exc, FeatureUnavailable | FeatureTimeout) else _unavailable(self.name, exc)
            for future in batch.values():
                if not future.done():
                    future.set_exception(error)
                    future.exception()  # a request that gave up will never read it; mark it read
        else:
            for key, future in batch.items():
                row = found.get(key)
                if self.cache is not None:
                    self.cache.put(key, row)
                if not future.done():
                    future.set_result(row)
        finally:
            for key in keys:
                self._in_flight.pop(key, None)

    async def _fetch_with_retries(self, keys: list[Key]) -> Mapping[Key, Row]:
        attempts = self.policy.retries + 1
        for attempt in range(attempts):
            started = time.perf_counter()
            try:
                if not await self._connect():
                    raise ConnectionError(f"feature source {self.name!r} is not connected")
                async with asyncio.timeout(self.policy.timeout_s):
                    found = await self._fetch(keys)
            except Exception as exc:
                kind = "timeout" if isinstance(exc, TimeoutError) else "error"
                self._count_error(kind)
                self.breaker.failed()
                last: Exception = exc
                if attempt + 1 < attempts and self.breaker.state is not BreakerState.OPEN:
                    await asyncio.sleep(self.policy.backoff_s * 2**attempt * random.uniform(0.5, 1.5))
                    continue
                if isinstance(last, TimeoutError):
                    raise FeatureTimeout(
                        f"feature source {self.name!r} took longer than {self.policy.timeout_s}s, {attempts} times"
                    ) from None
                raise
            self.breaker.succeeded()
            self._observe(len(keys), time.perf_counter() - started)
            return found
        raise AssertionError("unreachable")  # pragma: no cover

    # Metrics

    def _observe(self, keys: int, seconds: float) -> None:
        self.round_trips += 1
        if self._metrics is not None:
            self._metrics.fetch_seconds.observe(seconds)
            self._metrics.batch_keys.observe(keys)

    def _count_error(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.error(kind).inc()

    def _count_cache(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.cache(result).inc()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, round_trips={self.round_trips}, "
            f"breaker={self.breaker.state.name}, pending={len(self._pending)})"
        )


async def _all_done_by(futures: list[asyncio.Future[Any]], deadline: float) -> bool:
    """Wait until every future is done (True) or ``deadline`` (``time.monotonic()``) passes (False).

    Other requests share these futures, so giving up must not cancel them: no ``wait_for``. This is
    ``asyncio.wait(futures, timeout=...)`` without the sets and checks it builds on every call, which
    cost more than the wait itself on a path every lookup takes.
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bool] = loop.create_future()
    remaining = len(futures)

    def one_done(_: asyncio.Future[Any]) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0 and not waiter.done():
            waiter.set_result(True)

    def time_up() -> None:
        if not waiter.done():
            waiter.set_result(False)

    for future in futures:
        future.add_done_callback(one_done)
    timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), time_up)
    try:
        return await waiter
    finally:
        timer.cancel()
        for future in futures:
            future.remove_done_callback(one_done)


def _unavailable(name: str, exc: Exception) -> FeatureUnavailable:
    logger.warning("feature source %s failed: %r", name, exc)
    return FeatureUnavailable(f"feature source {name!r} failed ({type(exc).__name__})")


def _log_crash(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("feature task %s crashed", task.get_name(), exc_info=task.exception())
