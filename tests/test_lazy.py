"""Lazy prediction: request keys, the column codec, coalescing, the prediction caches and deferred handles."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio

from asyncserve.composition.caches import MemoryPredictionCache, PredictionCache, RedisPredictionCache
from asyncserve.composition.coalescing import Coalescer
from asyncserve.composition.deferred import DeferredPredictions
from asyncserve.composition.keys import decode_columns, encode_columns, request_key
from asyncserve.exceptions import ConfigurationError, NotFound, Unavailable
from asyncserve.tensors import Columns


def objects(*values: Any) -> np.ndarray[Any, Any]:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def same(a: Columns, b: Columns) -> bool:
    return a.keys() == b.keys() and all(
        a[n].dtype == b[n].dtype and a[n].shape == b[n].shape and a[n].tolist() == b[n].tolist() for n in a
    )


X = {"x": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)}


# request_key


def test_request_key_is_canonical() -> None:
    key = request_key("iris", {"x": X["x"], "s": objects("a", "b")})
    assert len(key) == 64
    assert key == request_key("iris", {"s": objects("a", "b"), "x": X["x"].copy()})  # order, identity
    assert key == request_key("iris", {"x": np.asfortranarray(X["x"]), "s": objects("a", "b")})  # memory layout


@pytest.mark.parametrize(
    ("label", "columns"),
    [
        ("iris:2", {"x": X["x"], "s": objects("a", "b")}),
        ("iris", {"x": X["x"].astype(np.float64), "s": objects("a", "b")}),
        ("iris", {"x": X["x"].reshape(4, 1), "s": objects("a", "b")}),
        ("iris", {"y": X["x"], "s": objects("a", "b")}),
        ("iris", {"x": X["x"] + 1, "s": objects("a", "b")}),
        ("iris", {"x": X["x"], "s": objects(b"a", "b")}),
        ("iris", {"x": X["x"], "s": objects("ab", "")}),
        ("iris", {"x": X["x"], "s": objects(1, "b")}),
        ("iris", {"x": X["x"], "s": objects(True, "b")}),
        ("iris", {"x": X["x"], "s": objects("a", "b"), "t": np.zeros(0)}),
    ],
)
def test_request_key_tells_apart_label_dtype_shape_name_values_and_str_from_bytes(label: str, columns: Columns) -> None:
    assert request_key(label, columns) != request_key("iris", {"x": X["x"], "s": objects("a", "b")})
    assert request_key("iris", {"s": objects(1)}) != request_key("iris", {"s": objects(True)})


def test_request_key_refuses_values_without_a_canonical_encoding() -> None:
    with pytest.raises(TypeError, match="column 's' holds a object"):
        request_key("iris", {"s": objects(object())})


# The column codec (what the Redis cache stores)


def test_columns_survive_encoding_without_pickle() -> None:
    columns: Columns = {
        "f": np.arange(12, dtype=np.float16).reshape(2, 3, 2),
        "i": np.array([-1, 2**40], dtype=np.int64),
        "b": np.array([True, False]),
        "s": objects("é", b"\x00\xff"),
        "j": objects(None, [1, {"k": 2.5}]),
        "empty": np.zeros((0, 3), dtype=np.uint8),
    }
    data = encode_columns(columns)
    decoded = decode_columns(data)
    assert same(decoded, columns)
    assert isinstance(decoded["s"][0], str)
    assert isinstance(decoded["s"][1], bytes)
    assert not decoded["f"].flags.writeable
    assert b"pickle" not in data
    with pytest.raises(ValueError, match="not a batch of columns"):
        decode_columns(b"\x80\x04pickled")
    for corrupt in (data[:-1], data[:20], data.replace(b"<f2", b"<zz")):
        with pytest.raises(ValueError, match=r"corrupt|truncated|fields for"):
            decode_columns(corrupt)
    with pytest.raises(TypeError):
        encode_columns({"s": objects(object())})


# Coalescer


async def test_a_thousand_identical_calls_compute_once() -> None:
    coalescer: Coalescer[int] = Coalescer()
    release = asyncio.Event()
    calls = 0

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 42

    tasks = [asyncio.create_task(coalescer.run("k", compute)) for _ in range(1000)]
    await asyncio.sleep(0)
    assert coalescer.in_flight == 1
    release.set()
    assert await asyncio.gather(*tasks) == [42] * 1000
    assert calls == 1
    assert (coalescer.leaders, coalescer.coalesced, coalescer.in_flight) == (1, 999, 0)
    assert await coalescer.run("k", compute) == 42  # done flights are forgotten: a later call computes anew
    assert calls == 2


async def test_different_keys_compute_separately() -> None:
    coalescer: Coalescer[str] = Coalescer()

    async def echo(value: str) -> str:
        await asyncio.sleep(0.001)
        return value

    results = await asyncio.gather(coalescer.run("a", lambda: echo("a")), coalescer.run("b", lambda: echo("b")))
    assert list(results) == ["a", "b"]
    assert coalescer.leaders == 2


async def test_the_leaders_error_reaches_every_waiter() -> None:
    coalescer: Coalescer[int] = Coalescer()
    release = asyncio.Event()

    async def compute() -> int:
        await release.wait()
        raise ValueError("model exploded")

    tasks = [asyncio.create_task(coalescer.run("k", compute)) for _ in range(10)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(result, ValueError) for result in results)
    assert coalescer.in_flight == 0


async def test_a_cancelled_waiter_leaves_the_computation_to_the_others() -> None:
    coalescer: Coalescer[int] = Coalescer()
    release = asyncio.Event()
    cancelled = asyncio.Event()

    async def compute() -> int:
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 7

    leader = asyncio.create_task(coalescer.run("k", compute))
    follower = asyncio.create_task(coalescer.run("k", compute))
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    release.set()
    assert await follower == 7
    assert not cancelled.is_set()


async def test_the_computation_is_cancelled_when_every_waiter_is_gone() -> None:
    coalescer: Coalescer[int] = Coalescer()
    cancelled = asyncio.Event()
    started = 0

    async def compute() -> int:
        nonlocal started
        started += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    waiters = [asyncio.create_task(coalescer.run("k", compute)) for _ in range(3)]
    await asyncio.sleep(0)
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    await asyncio.wait_for(cancelled.wait(), 1.0)
    assert coalescer.in_flight == 0

    async def quick() -> int:
        return 1

    assert await coalescer.run("k", quick) == 1  # a new caller starts afresh
    assert started == 1


# Prediction caches


async def exercise_cache(cache: PredictionCache) -> None:
    outputs = {"y": np.array([1.5, 2.5]), "label": objects("a", b"b")}
    assert await cache.get("k") is None
    await cache.put("k", outputs)
    found = await cache.get("k")
    assert found is not None
    assert same(found, outputs)
    assert (cache.hits, cache.misses) == (1, 1)


async def test_memory_cache_hits_misses_and_expires() -> None:
    async with MemoryPredictionCache(ttl_s=0.05, max_entries=2) as cache:
        await exercise_cache(cache)
        await asyncio.sleep(0.06)
        assert await cache.get("k") is None


async def test_memory_cache_keeps_read_only_copies_of_the_least_recently_used() -> None:
    cache = MemoryPredictionCache(ttl_s=60.0, max_entries=2)
    outputs = {"y": np.array([1.0])}
    await cache.put("a", outputs)
    outputs["y"][0] = 99.0
    found = await cache.get("a")
    assert found is not None
    assert found["y"].tolist() == [1.0]
    assert not found["y"].flags.writeable
    await cache.put("b", outputs)
    await cache.put("c", outputs)
    assert await cache.get("a") is None
    await cache.aclose()


def test_caches_refuse_bad_settings() -> None:
    with pytest.raises(ConfigurationError, match="ttl_s must be a number of seconds > 0, got 0"):
        MemoryPredictionCache(ttl_s=0)
    with pytest.raises(ConfigurationError, match="max_entries must be an integer >= 1"):
        MemoryPredictionCache(max_entries=0)
    with pytest.raises(ConfigurationError, match="prefix must be a non-empty"):
        RedisPredictionCache("redis://127.0.0.1:6379/0", prefix="")
    with pytest.raises(ConfigurationError, match="timeout_s must be a number of seconds > 0"):
        RedisPredictionCache("redis://127.0.0.1:6379/0", timeout_s=0)


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    prefix = f"test:lazy:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.asyncio.Redis.from_url(redis_url)
    keys = [key async for key in client.scan_iter(f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.mark.redis
async def test_redis_caches_with_one_prefix_share_entries_like_two_servers(redis_url: str, redis_prefix: str) -> None:
    async with (
        RedisPredictionCache(redis_url, ttl_s=0.3, prefix=redis_prefix) as first,
        RedisPredictionCache(redis_url, ttl_s=0.3, prefix=redis_prefix) as second,
        RedisPredictionCache(redis_url, ttl_s=0.3, prefix=redis_prefix + "other:") as other,
    ):
        await exercise_cache(first)
        found = await second.get("k")
        assert found is not None
        assert found["label"].tolist() == ["a", b"b"]
        assert (second.hits, second.misses) == (1, 0)
        assert await other.get("k") is None
        await asyncio.sleep(0.4)
        assert await second.get("k") is None


@pytest.mark.redis
async def test_a_corrupt_redis_entry_is_a_counted_miss(redis_url: str, redis_prefix: str) -> None:
    async with RedisPredictionCache(redis_url, prefix=redis_prefix) as cache:
        client = redis.asyncio.Redis.from_url(redis_url)
        await client.set(f"{redis_prefix}k", b"\x80\x04not columns")
        await client.aclose()
        assert await cache.get("k") is None
        assert (cache.errors, cache.misses) == (1, 1)
        assert redis_prefix in repr(cache)


async def test_an_unreachable_redis_is_a_miss_not_a_failure() -> None:
    async with RedisPredictionCache("redis://127.0.0.1:1/0", prefix="test:") as cache:
        await cache.put("k", {"y": np.zeros(1)})
        assert await cache.get("k") is None
        assert (cache.errors, cache.misses) == (2, 1)


# Deferred predictions


class CountingModel:
    """A compute function that counts its calls and can be held or made to fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()
        self.failures = 0

    async def __call__(self) -> Columns:
        self.calls += 1
        await self.release.wait()
        if self.failures:
            self.failures -= 1
            raise ValueError("model exploded")
        return {"y": np.array([self.calls])}


async def test_a_deferred_prediction_is_computed_when_first_read_and_once() -> None:
    deferred = DeferredPredictions()
    model = CountingModel()
    model.release.clear()
    handle = deferred.create("iris", X, model, ttl_s=60.0)
    assert handle.id.replace("-", "").replace("_", "").isalnum()
    assert 59.0 < handle.remaining_s() <= 60.0
    assert deferred.get(handle.id) == handle
    assert handle.model_label == "iris"
    await asyncio.sleep(0.01)
    assert model.calls == 0
    reads = [asyncio.create_task(deferred.resolve(handle.id)) for _ in range(100)]
    await asyncio.sleep(0)
    model.release.set()
    results = await asyncio.gather(*reads)
    assert all(result["y"].tolist() == [1] for result in results)
    assert (await deferred.resolve(handle.id))["y"].tolist() == [1]
    assert model.calls == 1
    assert (deferred.created, deferred.resolved, deferred.expired) == (1, 1, 0)


async def test_a_failed_deferred_computation_reaches_its_readers_and_is_retried() -> None:
    deferred = DeferredPredictions()
    model = CountingModel()
    model.failures = 1
    handle = deferred.create("iris", X, model, ttl_s=60.0)
    with pytest.raises(ValueError, match="exploded"):
        await deferred.resolve(handle.id)
    assert (await deferred.resolve(handle.id))["y"].tolist() == [2]
    assert deferred.resolved == 1


async def test_expired_and_unknown_handles_are_not_found() -> None:
    deferred = DeferredPredictions()
    handle = deferred.create("iris", X, CountingModel(), ttl_s=0.02)
    await asyncio.sleep(0.03)
    with pytest.raises(NotFound, match=f"prediction handle '{handle.id}' is unknown or expired"):
        await deferred.resolve(handle.id)
    with pytest.raises(NotFound, match="is unknown or expired"):
        await deferred.resolve("nope")
    with pytest.raises(NotFound, match="is unknown or expired"):
        deferred.get("nope")
    assert (deferred.expired, len(deferred)) == (1, 0)


async def test_the_number_of_live_handles_is_bounded_and_sweeping_frees_room() -> None:
    deferred = DeferredPredictions(max_handles=2)
    deferred.create("iris", X, CountingModel(), ttl_s=0.02)
    deferred.create("iris", X, CountingModel(), ttl_s=60.0)
    with pytest.raises(Unavailable, match="2 deferred predictions are waiting") as refused:
        deferred.create("iris", X, CountingModel(), ttl_s=60.0)
    assert refused.value.retry_after_s >= 1.0
    await asyncio.sleep(0.03)
    deferred.create("iris", X, CountingModel(), ttl_s=60.0)  # the expired one was swept to make room
    assert (deferred.created, deferred.expired, len(deferred)) == (3, 1, 2)
    assert deferred.sweep() == 0
    with pytest.raises(ConfigurationError, match="max_handles must be an integer >= 1"):
        DeferredPredictions(max_handles=0)
    with pytest.raises(ConfigurationError, match="ttl_s must be a number of seconds > 0"):
        deferred.create("iris", X, CountingModel(), ttl_s=-1)


async def test_compute_when_idle_computes_the_oldest_unread_handles() -> None:
    deferred = DeferredPredictions()
    first, second, failing = CountingModel(), CountingModel(), CountingModel()
    failing.failures = 1
    handles = [deferred.create(f"m{i}", X, model, ttl_s=60.0) for i, model in enumerate([failing, first, second])]
    assert await deferred.compute_when_idle(limit=2) == 1  # the failure is logged and left for the reader
    assert (failing.calls, first.calls, second.calls) == (1, 1, 0)
    await deferred.resolve(handles[1].id)
    assert first.calls == 1
    assert await deferred.compute_when_idle(limit=5) == 1, "a handle that failed when idle is left to its reader"
    assert failing.calls == 1
    await deferred.resolve(handles[0].id)
    assert "resolved=3" in repr(deferred)


async def test_inputs_without_a_canonical_key_still_get_a_handle_of_their_own() -> None:
    deferred = DeferredPredictions()
    first, second = CountingModel(), CountingModel()
    handles = [deferred.create("m", {"s": objects(object())}, model, ttl_s=60.0) for model in (first, second)]
    await asyncio.gather(*(deferred.resolve(handle.id) for handle in handles))
    assert (first.calls, second.calls) == (1, 1)
