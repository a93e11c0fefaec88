"""Prediction caches: answers of deterministic models by request key, in this process
(:class:`MemoryPredictionCache`, LRU and TTL) or shared by every server on one Redis
(:class:`RedisPredictionCache`, which stores :func:`~asyncserve.composition.keys.encode_columns` bytes).
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any, Protocol, Self

import numpy as np

from asyncserve.cache import TTLCache
from asyncserve.composition.keys import decode_columns, encode_columns
from asyncserve.exceptions import ConfigurationError
from asyncserve.tensors import Columns

logger = logging.getLogger(__name__)


class PredictionCache(Protocol):
    """Answers by request key for a while; a failing cache is a miss, never a failed prediction."""

    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...

    async def open(self) -> None:
        """Check, once at start-up, that the cache answers; raise if it does not."""

    async def get(self, key: str) -> Columns | None: ...

    async def put(self, key: str, columns: Columns) -> None: ...

    async def aclose(self) -> None: ...


class _AsyncClosing:
    async def open(self) -> None:
        """Check that the cache answers (this process's memory always does)."""

    async def aclose(self) -> None:
        """Release the cache's resources."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()


def checked_ttl(owner: str, ttl_s: float) -> float:
    if not ttl_s > 0:
        raise ConfigurationError(f"{owner}: ttl_s must be a number of seconds > 0, got {ttl_s!r}")
    return float(ttl_s)


class MemoryPredictionCache(_AsyncClosing):
    """This process's answers, for ``ttl_s`` each, at most ``max_entries`` (least recently used go first).

    Cached arrays are read-only copies, so no caller can change another's answer.

    Example::

        async with MemoryPredictionCache(ttl_s=30.0, max_entries=10_000) as cache:
            await cache.put(key, outputs)
            await cache.get(key)  # outputs, until 30 s have passed
    """

    def __init__(self, ttl_s: float = 60.0, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ConfigurationError(f"MemoryPredictionCache: max_entries must be an integer >= 1, got {max_entries!r}")
        self._cache: TTLCache[Columns] = TTLCache(checked_ttl("MemoryPredictionCache", ttl_s), max_entries)

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

    async def get(self, key: str) -> Columns | None:
        return self._cache.get(key)

    async def put(self, key: str, columns: Columns) -> None:
        self._cache.put(key, {name: _read_only(array) for name, array in columns.items()})

    async def aclose(self) -> None:
        self._cache.clear()

    def __repr__(self) -> str:
        return f"MemoryPredictionCache({self._cache!r})"


def _read_only(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    copy = np.array(array, copy=True)
    copy.setflags(write=False)
    return copy


def _redis_client(url: str, timeout_s: float) -> tuple[Any, tuple[type[Exception], ...]]:
    try:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError:
        raise ConfigurationError("RedisPredictionCache needs redis: pip install 'asyncserve[redis]'") from None
    # A cache must not slow predictions down: short timeouts, one immediate retry after a dropped connection.
    client = redis.asyncio.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1)
    )  # connects on first use
    return client, (redis.asyncio.RedisError, OSError, TimeoutError, ValueError)


class RedisPredictionCache(_AsyncClosing):
    """Answers shared by every server on one Redis: ``SET <prefix><key> <encoded columns> PX <ttl>``.

    Values are :func:`encode_columns` bytes (never pickle). An unreachable or slow Redis (past
    ``timeout_s``) or a corrupt entry is logged, counted in ``errors`` and answered as a miss.

    Example::

        async with RedisPredictionCache("redis://cache:6379/0", ttl_s=300.0) as cache:
            outputs = await cache.get(key)
    """

    def __init__(
        self, url: str, *, ttl_s: float = 60.0, prefix: str = "asyncserve:prediction:", timeout_s: float = 0.1
    ) -> None:
        if not prefix:
            raise ConfigurationError("RedisPredictionCache: prefix must be a non-empty key prefix")
        if not timeout_s > 0:
            raise ConfigurationError(
                f"RedisPredictionCache: timeout_s must be a number of seconds > 0, got {timeout_s!r}"
            )
        self.ttl_s = checked_ttl("RedisPredictionCache", ttl_s)
        self.prefix = prefix
        self._client, self._failures = _redis_client(url, timeout_s)
        self.hits = self.misses = self.errors = 0

    async def get(self, key: str) -> Columns | None:
        try:
            data = await self._client.get(self.prefix + key)
            columns = None if data is None else decode_columns(data)
        except self._failures:
            logger.warning("prediction cache %s: reading %s failed", self.prefix, key, exc_info=True)
            self.errors += 1
            columns = None
        if columns is None:
            self.misses += 1
        else:
            self.hits += 1
        return columns

    async def put(self, key: str, columns: Columns) -> None:
        try:
            await self._client.set(self.prefix + key, encode_columns(columns), px=max(1, round(self.ttl_s * 1000)))
        except self._failures:
            logger.warning("prediction cache %s: writing %s failed", self.prefix, key, exc_info=True)
            self.errors += 1

    async def open(self) -> None:
        """One round trip at start-up: a URL that points at no Redis fails the start, not every request."""
        await self._client.ping()

    async def aclose(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        # The URL may hold a password: the repr names the prefix only.
        counts = f"hits={self.hits}, misses={self.misses}, errors={self.errors}"
        return f"RedisPredictionCache(prefix={self.prefix!r}, {counts})"
