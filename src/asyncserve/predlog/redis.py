"""A Redis stream: each batch is one Lua script that adds each record once (needs ``asyncserve[redis]``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from asyncserve.exceptions import ConfigurationError
from asyncserve.predlog.records import LogRecord

DEFAULT_STREAM = "asyncserve:predictions"
"""The stream key, shared by the sink and whatever consumes the log."""
RECORD_FIELD = "record"
"""The entry field that holds the record's JSON."""
DEFAULT_DEDUP_WINDOW_S = 3600.0
"""How long the sink remembers the ``log_id`` of a record it stored, at least."""
DEDUP_BUCKET_DIGITS = 7
"""Records are remembered in sets named by the first digits of their ``log_id`` (its time in hex
milliseconds): 7 digits make a set per 2**20 ms, about 17 minutes."""

# KEYS[1] is the stream, KEYS[2..] the dedup sets; ARGV[1] the stream's MAXLEN ("" for none),
# ARGV[2] the sets' TTL in seconds (0: no dedup), then a triple per record: the index of its set in
# KEYS (0: none), its log_id, its JSON. A record is added first and remembered second: a script cut
# short in between may store a record twice on a retry, never lose one.
_ADD_ONCE = """
local stream, maxlen, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2])
local added = 0
for i = 3, #ARGV, 3 do
  local set = KEYS[tonumber(ARGV[i])]
  if not set or redis.call('SISMEMBER', set, ARGV[i + 1]) == 0 then
    if maxlen == '' then
      redis.call('XADD', stream, '*', 'record', ARGV[i + 2])
    else
      redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'record', ARGV[i + 2])
    end
    if set then redis.call('SADD', set, ARGV[i + 1]) end
    added = added + 1
  end
end
for k = 2, #KEYS do redis.call('EXPIRE', KEYS[k], ttl) end
return added
"""


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
    """Appends each record to a Redis stream, as an entry whose ``record`` field is the JSON, once per ``log_id``.

    A batch is one Lua script, which Redis runs whole: for each record, unless its ``log_id`` is
    in the dedup set ``<stream>:dedup:<bucket>``, it adds the record (``XADD``) and then its id to
    the set. So a batch written again (a retry after a timeout whose write landed anyway, a replay of
    the spill file) adds only what is missing. A dedup set expires ``dedup_window_s`` after its
    last write: a batch written again later than that (a spill file replayed days later) may
    store twice those of its records whose first write landed. ``dedup_window_s=None`` turns the
    sets off. ``maxlen`` caps the stream with approximate trimming (``MAXLEN ~``, cheap for Redis);
    ``None`` keeps every entry. The client reconnects once at once after a dropped connection
    and otherwise leaves retrying to the logger, which owns the backoff; a command cancelled by
    the logger's write timeout drops its connection.

    Example::

        sink = RedisStreamSink("redis://cache:6379/0", stream="preds", maxlen=100_000)
        async with PredictionLogger(sink) as log:
            log.record(prediction_record(...))

        # redis-cli XRANGE preds - + COUNT 10
    """

    def __init__(
        self,
        url: str,
        *,
        stream: str = DEFAULT_STREAM,
        maxlen: int | None = 1_000_000,
        dedup_window_s: float | None = DEFAULT_DEDUP_WINDOW_S,
    ) -> None:
        self._modules = _import_redis()
        if not stream:
            raise ConfigurationError("stream must be a non-empty Redis key, like 'asyncserve:predictions'")
        if maxlen is not None and maxlen < 1:
            raise ConfigurationError(f"maxlen must be a number of entries >= 1, or None to keep all, got {maxlen}")
        if dedup_window_s is not None and dedup_window_s < 1:
            raise ConfigurationError(
                f"dedup_window_s must be a number of seconds >= 1, or None to store without dedup, got {dedup_window_s}"
            )
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self.dedup_window_s = dedup_window_s
        self.name = f"redis:{stream}"
        self._client: Any = None
        self._script: Any = None

    def __repr__(self) -> str:
        # The URL may hold a password: the repr names the stream only.
        return f"RedisStreamSink(stream={self.stream!r}, maxlen={self.maxlen})"

    def dedup_key(self, log_id: str) -> str:
        """The set that remembers ``log_id`` (for a consumer that wants to check it, or tests)."""
        return f"{self.stream}:dedup:{log_id[:DEDUP_BUCKET_DIGITS]}"

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
        self._script = client.register_script(_ADD_ONCE)

    async def write(self, records: Sequence[LogRecord]) -> None:
        if self._client is None:
            raise RuntimeError(f"{self!r} is not open; call open() first")
        keys, args = self._arguments(records)
        await self._script(keys=keys, args=args)

    def _arguments(self, records: Sequence[LogRecord]) -> tuple[list[str], list[str | bytes | int]]:
        keys = [self.stream]
        ttl_s = round(self.dedup_window_s) if self.dedup_window_s is not None else 0
        args: list[str | bytes | int] = ["" if self.maxlen is None else self.maxlen, ttl_s]
        sets: dict[str, int] = {}
        for record in records:
            index = 0
            if ttl_s:
                key = self.dedup_key(record.log_id)
                if key not in sets:
                    keys.append(key)
                    sets[key] = len(keys)  # the script's KEYS count from 1
                index = sets[key]
            args += (index, record.log_id, record.json)
        return keys, args

    async def aclose(self) -> None:
        client, self._client, self._script = self._client, None, None
        if client is not None:
            await client.aclose()
