"""A Redis stream: each batch is one pipeline of ``XADD`` (needs ``asyncserve[redis]``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from asyncserve.exceptions import ConfigurationError
from asyncserve.predlog.records import LogRecord

DEFAULT_STREAM = "asyncserve:predictions"
"""The stream key, shared by the sink and whatever consumes the log."""
RECORD_FIELD = "record"
"""The entry field that holds the record's JSON."""


def _import_redis() -> Any:
    try:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError:
        raise ConfigurationError(
            "the Redis stream prediction-log sink needs redis: pip install 'asyncserve[redis]'"
        ) from None
    return redis.asyncio, Retry, NoBackoff


class RedisStreamSink:
    """Appends each record to a Redis stream, as an entry whose ``record`` field is the JSON.

    A batch is one ``MULTI``/``EXEC`` pipeline of ``XADD``, so it is stored whole or not at all.
    ``maxlen`` caps the stream with approximate trimming (``MAXLEN ~``, cheap for Redis);
    ``None`` keeps every entry. The client reconnects once at once after a dropped connection
    and otherwise leaves retrying to the logger, which owns the backoff.

    Example::

        sink = RedisStreamSink("redis://cache:6379/0", stream="preds", maxlen=100_000)
        async with PredictionLogger(sink) as log:
            log.record(prediction_record(...))

        # redis-cli XRANGE preds - + COUNT 10
    """

    def __init__(self, url: str, *, stream: str = DEFAULT_STREAM, maxlen: int | None = 1_000_000) -> None:
        self._modules = _import_redis()
        if not stream:
            raise ConfigurationError("stream must be a non-empty Redis key, like 'asyncserve:predictions'")
        if maxlen is not None and maxlen < 1:
            raise ConfigurationError(f"maxlen must be a number of entries >= 1, or None to keep all, got {maxlen}")
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self.name = f"redis:{stream}"
        self._client: Any = None

    def __repr__(self) -> str:
        # The URL may hold a password: the repr names the stream only.
        return f"RedisStreamSink(stream={self.stream!r}, maxlen={self.maxlen})"

    async def open(self) -> None:
        if self._client is not None:
            raise RuntimeError(f"{self!r} is already open")
        redis_asyncio, retry, no_backoff = self._modules
        client = redis_asyncio.Redis.from_url(self.url, retry=retry(no_backoff(), 1))
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self._client = client

    async def write(self, records: Sequence[LogRecord]) -> None:
        if self._client is None:
            raise RuntimeError(f"{self!r} is not open; call open() first")
        async with self._client.pipeline(transaction=True) as pipeline:
            for record in records:
                pipeline.xadd(self.stream, {RECORD_FIELD: record.json}, maxlen=self.maxlen, approximate=True)
            await pipeline.execute()

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
