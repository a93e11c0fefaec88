"""Lazy prediction: canonical request keys, single-flight coalescing, prediction caches, deferred handles.

- :func:`request_key` names a request (model label and every input column) with a blake2b digest, so
  identical requests meet in the :class:`Coalescer`, a :class:`PredictionCache` and across servers.
- :class:`Coalescer` shares one computation among identical requests in flight.
- :class:`MemoryPredictionCache` (this process, LRU and TTL) and :class:`RedisPredictionCache` (shared by
  every server on one Redis) keep answers; the Redis one stores :func:`encode_columns` bytes, never pickle.
- :class:`DeferredPredictions` holds the handles of ``Prefer: lazy`` requests: computed when first read;
  :class:`LazyPrediction` is such a handle in Python (``await service.lazy(...)``).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

import numpy as np
import orjson

from asyncserve._utils import settle
from asyncserve.cache import TTLCache
from asyncserve.exceptions import ConfigurationError, NotFound, Unavailable
from asyncserve.tensors import Columns

logger = logging.getLogger(__name__)

T = TypeVar("T")
Compute = Callable[[], Awaitable[Columns]]

_KEY_SALT = b"asyncserve.request_key.v1"
_MAGIC = b"ASC1"
_JSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY


def request_key(model_label: str, columns: Columns) -> str:
    """A canonical key for a request: the same model and inputs give the same 64 hex digits.

    Every column's name, dtype, shape and values count (so int32 and int64 ones differ); columns are
    taken in name order; ``BYTES`` values are told apart as ``str`` or ``bytes``. Every field is
    length-prefixed, so no two different requests feed the hash the same bytes.

    Example::

        request_key("iris:2", {"x": np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)})
    """
    digest = hashlib.blake2b(_KEY_SALT, digest_size=32)
    _hash_field(digest, model_label.encode())
    for name in sorted(columns):
        array = np.asarray(columns[name])
        for data in (name.encode(), array.dtype.str.encode(), _shape_bytes(array.shape)):
            _hash_field(digest, data)
        if array.dtype.kind == "O":
            for value in array.ravel():
                _hash_field(digest, _canonical_value(name, value))
        else:
            _hash_field(digest, np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _hash_field(digest: Any, data: bytes) -> None:
    digest.update(struct.pack("<Q", len(data)))
    digest.update(data)


def _shape_bytes(shape: tuple[int, ...]) -> bytes:
    return struct.pack(f"<{len(shape)}q", *shape)


def _canonical_value(column: str, value: object) -> bytes:
    if isinstance(value, str):
        return b"s" + value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes):
        return b"b" + value
    try:
        return b"j" + orjson.dumps(value, option=_JSON_OPTIONS)
    except TypeError:
        raise TypeError(f"column {column!r} holds a {type(value).__name__}, which has no canonical encoding") from None


def encode_columns(columns: Columns) -> bytes:
    """Columns as compact bytes: numeric arrays as dtype, shape and raw bytes; object arrays as JSON.

    Example::

        decode_columns(encode_columns({"y": np.arange(3)}))  # {"y": array([0, 1, 2])}, read-only
    """
    parts = [_MAGIC, struct.pack("<I", len(columns))]
    for name, column in columns.items():
        array = np.asarray(column)
        payload = _encode_objects(array) if array.dtype.kind == "O" else np.ascontiguousarray(array).tobytes()
        for data in (name.encode(), array.dtype.str.encode(), _shape_bytes(array.shape), payload):
            parts += [struct.pack("<Q", len(data)), data]
    return b"".join(parts)


def decode_columns(data: bytes) -> Columns:
    """The columns :func:`encode_columns` encoded (numeric ones read-only); ``ValueError`` if ``data`` is not."""
    if not data.startswith(_MAGIC):
        raise ValueError("not a batch of columns encoded by asyncserve.composition.lazy.encode_columns")
    try:
        (count,) = struct.unpack_from("<I", data, len(_MAGIC))
        fields = _fields(data, len(_MAGIC) + 4)
        if len(fields) != 4 * count:
            raise ValueError(f"{len(fields)} fields for {count} columns")
        columns = iter(fields)
        return {name.decode(): _decoded(*rest) for name, *rest in zip(columns, columns, columns, columns, strict=True)}
    except (TypeError, struct.error) as exc:
        raise ValueError(f"a corrupt batch of columns: {exc}") from None


def _decoded(dtype_text: bytes, shape_bytes: bytes, payload: bytes) -> np.ndarray[Any, Any]:
    dtype = np.dtype(dtype_text.decode("ascii"))
    shape = struct.unpack(f"<{len(shape_bytes) // 8}q", shape_bytes)
    array = _decode_objects(payload) if dtype.kind == "O" else np.frombuffer(payload, dtype=dtype)
    return array.reshape(shape)


def _fields(data: bytes, offset: int) -> list[bytes]:
    fields = []
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        fields.append(data[offset + 8 : offset + 8 + length])
        offset += 8 + length
    if offset != len(data):
        raise ValueError("a truncated batch of columns")
    return fields


def _encode_objects(array: np.ndarray[Any, Any]) -> bytes:
    # Tagged, so that str and bytes come back as what they were.
    def tagged(value: object) -> list[object]:
        if isinstance(value, bytes):
            return ["b", base64.b64encode(value).decode("ascii")]
        return ["s" if isinstance(value, str) else "j", value]

    return orjson.dumps([tagged(value) for value in array.ravel()], option=orjson.OPT_SERIALIZE_NUMPY)


def _decode_objects(payload: bytes) -> np.ndarray[Any, Any]:
    items = orjson.loads(payload)
    array = np.empty(len(items), dtype=object)
    for i, (tag, value) in enumerate(items):
        array[i] = base64.b64decode(value) if tag == "b" else value
    return array


class _Flight(Generic[T]):
    def __init__(self, future: asyncio.Future[T]) -> None:
        self.future = future
        self.waiters = 0


class Coalescer(Generic[T]):
    """Single flight: identical keys in flight share one computation.

    The first caller of a key (the leader) starts the computation; callers of the same key until it
    finishes share it. Everyone gets its result, or its exception. A waiter that is cancelled leaves
    alone; the computation is cancelled only when every waiter has left.

    Example::

        coalescer: Coalescer[Columns] = Coalescer()
        outputs = await coalescer.run(request_key("iris", columns), lambda: registry.predict(...))
    """

    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}
        self.leaders = 0
        self.coalesced = 0

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def run(self, key: str, compute: Callable[[], Awaitable[T]]) -> T:
        """Await ``compute()`` (run as a task by the leader), or the computation of ``key`` in flight."""
        # The task runs in a copy of the leader's context: the leader's deadline is the flight's.
        waiter, _ = self.join(key, lambda: asyncio.ensure_future(compute()))
        return await waiter

    def join(self, key: str, start: Callable[[], asyncio.Future[T]]) -> tuple[asyncio.Future[T], bool]:
        """This caller's future for ``key``'s result, and whether it leads: with no computation of
        ``key`` in flight, ``start()`` starts one. Cancelling the future leaves the flight; the last
        to leave cancels it. Needs no task, so a request can join without waiting for a turn of the loop.
        """
        flight = self._flights.get(key)
        leads = flight is None
        if flight is None:
            flight = self._flights[key] = _Flight(start())
            flight.future.add_done_callback(functools.partial(self._landed, key, flight))
            self.leaders += 1
        else:
            self.coalesced += 1
        flight.waiters += 1
        waiter: asyncio.Future[T] = flight.future.get_loop().create_future()
        flight.future.add_done_callback(functools.partial(settle, waiter))
        waiter.add_done_callback(functools.partial(self._left, key, flight))
        return waiter, leads

    def _left(self, key: str, flight: _Flight[T], waiter: asyncio.Future[T]) -> None:
        flight.waiters -= 1
        if flight.waiters == 0 and not flight.future.done():
            # Everyone left. Forget the flight first, so that a new caller starts afresh rather
            # than joining a computation that is being cancelled.
            self._forget(key, flight)
            flight.future.cancel()

    def _landed(self, key: str, flight: _Flight[T], future: asyncio.Future[T]) -> None:
        self._forget(key, flight)
        if not future.cancelled():
            future.exception()  # every waiter got it; mark it retrieved so asyncio does not log it again

    def _forget(self, key: str, flight: _Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    def __repr__(self) -> str:
        return f"Coalescer(in_flight={self.in_flight}, leaders={self.leaders}, coalesced={self.coalesced})"


class PredictionCache(Protocol):
    """Answers by request key for a while; a failing cache is a miss, never a failed prediction."""

    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...

    async def get(self, key: str) -> Columns | None: ...

    async def put(self, key: str, columns: Columns) -> None: ...

    async def aclose(self) -> None: ...


class _AsyncClosing:
    async def aclose(self) -> None:
        """Release the cache's resources."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()


def _checked_ttl(owner: str, ttl_s: float) -> float:
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
        self._cache: TTLCache[Columns] = TTLCache(_checked_ttl("MemoryPredictionCache", ttl_s), max_entries)

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
        self.ttl_s = _checked_ttl("RedisPredictionCache", ttl_s)
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

    async def aclose(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        # The URL may hold a password: the repr names the prefix only.
        counts = f"hits={self.hits}, misses={self.misses}, errors={self.errors}"
        return f"RedisPredictionCache(prefix={self.prefix!r}, {counts})"


@dataclass(frozen=True)
class Handle:
    """A deferred prediction: its URL-safe ``id``, its model, and when it expires (``time.monotonic()`` seconds)."""

    id: str
    expires_at: float
    model_label: str

    def remaining_s(self) -> float:
        return max(0.0, self.expires_at - time.monotonic())


class LazyPrediction:
    """A deferred prediction in Python: ``await`` it for its outputs, computed on the first await and
    kept until the handle expires; concurrent and later awaits share that one computation.

    The handle is the same as one made by ``POST /v1/models/{m}/predict`` with ``Prefer: lazy``: it
    can also be read over HTTP at ``url`` (``GET /v1/predictions/{id}``), and both ways share the result.

    Example::

        handle = service.lazy("churn", {"customer_id": 42})  # checked now, computed later (or never)
        if looks_risky:
            outputs = await handle  # {"p": array([...], dtype=float32)}
    """

    def __init__(self, handle: Handle, resolve: Callable[[str], Awaitable[Columns]]) -> None:
        self.handle = handle
        self._resolve = resolve

    @property
    def id(self) -> str:
        return self.handle.id

    @property
    def url(self) -> str:
        return f"/v1/predictions/{self.handle.id}"

    def __await__(self) -> Generator[Any, None, Columns]:
        return self._resolve(self.handle.id).__await__()

    def __repr__(self) -> str:
        return (
            f"LazyPrediction({self.handle.model_label!r}, id={self.id!r}, expires_in_s={self.handle.remaining_s():.0f})"
        )


class LazyPredictor(Protocol):
    """What answers ``Service.lazy``: the server running the service, which binds itself at start-up."""

    def lazy(self, model: str, inputs: Any, version: str | None) -> LazyPrediction: ...


@dataclass(eq=False)
class _Deferred:
    handle: Handle
    key: str
    state: Compute | Columns
    tried_when_idle: bool = False
    """How to compute the outputs until they are computed, then the outputs (the closure is let go)."""


class DeferredPredictions:
    """Handles for ``Prefer: lazy``: a prediction computed when first read, then kept until it expires.

    Concurrent first reads share one computation (through the coalescer, keyed by :func:`request_key`,
    so a shared coalescer also joins them to identical live requests). A failed computation is not
    kept: the readers get the error and the next read tries again. At most ``max_handles`` live
    handles; past that, ``create`` answers ``Unavailable`` (503).

    Example::

        deferred = DeferredPredictions(max_handles=10_000)
        handle = deferred.create("iris", columns, lambda: pipeline_run(columns), ttl_s=600.0)
        outputs = await deferred.resolve(handle.id)  # computed now, kept for the next reads
    """

    def __init__(self, *, max_handles: int = 10_000, coalescer: Coalescer[Columns] | None = None) -> None:
        if max_handles < 1:
            raise ConfigurationError(f"DeferredPredictions: max_handles must be an integer >= 1, got {max_handles!r}")
        self.max_handles = max_handles
        self.coalescer: Coalescer[Columns] = coalescer if coalescer is not None else Coalescer()
        self._entries: dict[str, _Deferred] = {}
        self.created = self.resolved = self.expired = 0

    def __len__(self) -> int:
        return len(self._entries)

    def create(self, model_label: str, columns: Columns, compute: Compute, ttl_s: float) -> Handle:
        """Register a prediction to compute on first read; ``compute`` should take its deadline when it runs."""
        _checked_ttl("DeferredPredictions.create", ttl_s)
        if len(self._entries) >= self.max_handles and not self.sweep():
            soonest = min(entry.handle.expires_at for entry in self._entries.values())
            raise Unavailable(
                f"{self.max_handles} deferred predictions are waiting to be read, the most this server keeps; "
                "read some or retry once they expire",
                retry_after_s=max(1.0, soonest - time.monotonic()),
            )
        handle = Handle(secrets.token_urlsafe(16), time.monotonic() + ttl_s, model_label)
        try:
            key = request_key(model_label, columns)
        except TypeError:
            key = f"handle:{handle.id}"  # inputs without a canonical encoding: this handle shares with no one
        self._entries[handle.id] = _Deferred(handle, key, compute)
        self.created += 1
        return handle

    async def resolve(self, handle_id: str) -> Columns:
        """The handle's outputs, computed now if this is the first read; ``NotFound`` if unknown or expired."""
        entry = self._live(handle_id)
        if isinstance(entry.state, dict):
            return entry.state
        result = await self.coalescer.run(entry.key, entry.state)
        if not isinstance(entry.state, dict):  # concurrent first readers all get here; keep and count it once
            entry.state = result
            self.resolved += 1
        return result

    def get(self, handle_id: str) -> Handle:
        """The live handle ``handle_id`` (to learn its model before resolving); ``NotFound`` otherwise."""
        return self._live(handle_id).handle

    def _live(self, handle_id: str) -> _Deferred:
        entry = self._entries.get(handle_id)
        if entry is not None and entry.handle.expires_at <= time.monotonic():
            del self._entries[handle_id]
            self.expired += 1
            entry = None
        if entry is None:
            raise NotFound(f"prediction handle {handle_id!r} is unknown or expired")
        return entry

    def sweep(self) -> int:
        """Forget the expired handles and their results; returns how many."""
        now = time.monotonic()
        gone = [handle_id for handle_id, entry in self._entries.items() if entry.handle.expires_at <= now]
        for handle_id in gone:
            del self._entries[handle_id]
        self.expired += len(gone)
        return len(gone)

    async def compute_when_idle(self, limit: int = 1) -> int:
        """Compute up to ``limit`` unread handles, oldest first (call it when the server is idle).

        Returns how many were computed; a failure is logged and left for the reader to retry (it is
        not tried again when idle).
        """
        pending = [e for e in self._entries.values() if not isinstance(e.state, dict) and not e.tried_when_idle]
        computed = 0
        for entry in pending[:limit]:
            entry.tried_when_idle = True
            handle_id = entry.handle.id
            try:
                await self.resolve(handle_id)
            except NotFound:
                continue  # expired meanwhile
            except Exception:
                logger.warning("computing deferred prediction %s while idle failed", handle_id, exc_info=True)
                continue
            computed += 1
        return computed

    def __repr__(self) -> str:
        return (
            f"DeferredPredictions(live={len(self)}, created={self.created}, resolved={self.resolved}, "
            f"expired={self.expired})"
        )
