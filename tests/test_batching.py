"""Dynamic batching, proved through HTTP against a real server."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from asyncserve import Model, Service, Settings, Tensor
from tests.conftest import RunningServer, serving
from tests.models import Adder, Sleeper

POISON = 666


class Recorder(Model):
    """Doubles its input, records every batch it sees, and can be held at a gate."""

    name = "recorder"
    inputs = {"x": Tensor("INT64")}
    outputs = {"y": Tensor("INT64")}
    max_batch_size = 32
    max_queue_size = 64

    def __init__(self, **settings: Any) -> None:
        for name, value in settings.items():
            setattr(self, name, value)
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def predict(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        self.entered.set()
        self.gate.wait(10)
        if (x == POISON).any():
            raise ValueError("poisoned input")
        self.batches.append(x.tolist())
        return x * 2

    def seen(self) -> list[int]:
        return [value for batch in self.batches for value in batch]


@asynccontextmanager
async def serving_model(model: Recorder) -> AsyncIterator[tuple[RunningServer, httpx.AsyncClient]]:
    settings = Settings(executor_workers=1, loop_lag_interval_s=0.01)
    async with serving(Service(model), settings) as running, running.client() as client:
        yield running, client


@asynccontextmanager
async def held(model: Recorder, client: httpx.AsyncClient) -> AsyncIterator[None]:
    """Keep the model's only slot busy with a blocking request until the block ends."""
    model.gate.clear()
    model.entered.clear()
    blocker = asyncio.create_task(predict(client, -1))
    await asyncio.to_thread(model.entered.wait, 5)
    try:
        yield
    finally:
        model.gate.set()
        assert (await blocker).status_code == 200


async def predict(client: httpx.AsyncClient, x: int, **headers: str) -> httpx.Response:
    return await client.post("/v1/models/recorder/predict", json={"x": x}, headers=headers)


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("condition never held")


def queued_rows(running: RunningServer) -> int:
    """The rows in the model's batcher's queue, as its metric reports them."""
    value = running.app.metrics.registry.get_sample_value("asyncserve_batch_queue_rows", {"model": "recorder"})
    return int(value or 0)


async def test_two_concurrent_requests_reach_the_model_as_one_batch() -> None:
    model = Recorder()
    async with serving_model(model) as (running, client):
        async with held(model, client):
            pending = [asyncio.create_task(predict(client, x)) for x in (1, 2)]
            await until(lambda: queued_rows(running) == 2)
        responses = await asyncio.gather(*pending)
    assert [r.json() for r in responses] == [{"y": 2}, {"y": 4}]
    assert [1, 2] in [sorted(batch) for batch in model.batches]


async def test_an_idle_server_adds_no_wait() -> None:
    model = Recorder(max_wait_s=5.0, max_concurrent_batches=2)
    async with serving_model(model) as (_running, client):
        started = time.perf_counter()
        response = await predict(client, 7)
        elapsed = time.perf_counter() - started
        metrics = (await client.get("/metrics")).text
    assert response.json() == {"y": 14}
    assert elapsed < 0.5
    assert 'asyncserve_batches_total{model="recorder",reason="idle"} 1.0' in metrics


async def test_a_full_queue_answers_503_with_retry_after_at_once() -> None:
    model = Recorder(max_batch_size=4, max_queue_size=4)
    async with serving_model(model) as (running, client):
        async with held(model, client):
            queued = [asyncio.create_task(predict(client, x)) for x in range(4)]
            await until(lambda: queued_rows(running) == 4)
            started = time.perf_counter()
            refused = await predict(client, 99)
            elapsed = time.perf_counter() - started
        assert all(r.status_code == 200 for r in await asyncio.gather(*queued))
        metrics = (await client.get("/metrics")).text
    assert refused.status_code == 503
    assert refused.json()["code"] == "overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    assert elapsed < 0.2
    assert 99 not in model.seen()
    assert 'asyncserve_batch_shed_rows_total{model="recorder",reason="queue_full"} 1.0' in metrics


async def test_an_expired_item_never_reaches_the_model() -> None:
    model = Recorder()
    async with serving_model(model) as (_running, client):
        async with held(model, client):
            late = await predict(client, 42, **{"X-Request-Timeout": "0.2"})
            assert late.status_code == 504
        assert (await predict(client, 5)).json() == {"y": 10}
    assert 42 not in model.seen()
    assert 5 in model.seen()


async def test_one_poisoned_input_fails_alone_in_a_batch_of_32() -> None:
    model = Recorder()
    values = [*range(100, 131), POISON]
    random.Random(3).shuffle(values)
    async with serving_model(model) as (running, client):
        async with held(model, client):
            pending = [asyncio.create_task(predict(client, x)) for x in values]
            await until(lambda: queued_rows(running) == 32)
        responses = dict(zip(values, await asyncio.gather(*pending), strict=True))
        metrics = (await client.get("/metrics")).text
    failed = [x for x, r in responses.items() if r.status_code != 200]
    assert failed == [POISON]
    assert responses[POISON].status_code == 500
    assert all(responses[x].json() == {"y": 2 * x} for x in values if x != POISON)
    assert sorted(model.seen()) == sorted([-1, *(x for x in values if x != POISON)])  # each good row ran once
    assert 'asyncserve_batches_total{model="recorder",reason="full"} 1.0' in metrics
    assert 'asyncserve_batch_isolations_total{model="recorder"}' in metrics


async def test_higher_priorities_are_served_first_and_lower_ones_still_served() -> None:
    model = Recorder(max_batch_size=1)
    async with serving_model(model) as (running, client):
        async with held(model, client):
            low = [asyncio.create_task(predict(client, x, **{"X-Priority": "0"})) for x in range(1, 6)]
            await until(lambda: queued_rows(running) == 5)
            high = [asyncio.create_task(predict(client, x, **{"X-Priority": "9"})) for x in range(101, 106)]
            await until(lambda: queued_rows(running) == 10)
        responses = await asyncio.gather(*low, *high)
        bad = await predict(client, 1, **{"X-Priority": "12"})
    assert all(r.status_code == 200 for r in responses)
    order = model.seen()[1:]
    assert sorted(order[:5]) == list(range(101, 106))
    assert sorted(order[5:]) == list(range(1, 6))
    assert bad.status_code == 422
    assert "X-Priority" in bad.json()["error"]


async def test_v2_rows_are_batched_and_routed_back_under_random_concurrency() -> None:
    model = Recorder(max_batch_size=16, max_queue_size=1024)
    rng = random.Random(11)

    async def call(client: httpx.AsyncClient, caller: int) -> None:
        rows = rng.randint(1, 4)
        values = [caller * 10 + i for i in range(rows)]
        await asyncio.sleep(rng.random() * 0.05)
        if rng.random() < 0.5:
            body = {"inputs": [{"name": "x", "shape": [rows], "datatype": "INT64", "data": values}]}
            response = await client.post("/v2/models/recorder/infer", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["outputs"][0]["data"] == [2 * v for v in values]
            assert response.json()["outputs"][0]["shape"] == [rows]
        else:
            response = await client.post("/v1/models/recorder/predict", json=[{"x": v} for v in values])
            assert response.json() == [{"y": 2 * v} for v in values]

    async with serving_model(model) as (_running, client):
        await asyncio.gather(*(call(client, caller) for caller in range(200)))
    assert max(len(batch) for batch in model.batches) > 4  # requests really were merged
    assert all(len(batch) <= 16 for batch in model.batches)


async def test_more_rows_than_the_batch_limit_is_a_clear_400() -> None:
    model = Recorder(max_batch_size=4)
    async with serving_model(model) as (_running, client):
        response = await client.post("/v1/models/recorder/predict", json=[{"x": v} for v in range(5)])
    assert response.status_code == 400
    assert "5 rows" in response.json()["error"]
    assert "at most 4" in response.json()["error"]


def test_cost_model_fits_a_line() -> None:
    from asyncserve.runtime.cost import CostModel

    cost = CostModel()
    for rows in (1, 8, 32, 64, 8, 1):
        cost.observe(rows, 0.002 + 0.0005 * rows)
    assert np.isclose(cost.per_row_s, 0.0005)
    assert np.isclose(cost.per_batch_s, 0.002)
    assert np.isclose(cost.seconds(10), 0.007)


class _Runs:
    """A runner that records each batch's rows and holds batches until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.first_started = asyncio.Event()

    async def __call__(self, columns: dict[str, npt.NDArray[Any]], rows: int, deadline: float) -> Any:
        self.batches.append(columns["x"].tolist())
        if len(self.batches) == 1:
            self.first_started.set()
            await self.release.wait()
        return {"y": columns["x"] * 2}, 0.001 * rows, 0.0


def _batcher(runs: _Runs, **settings: Any) -> Any:
    from asyncserve.metrics import Metrics
    from asyncserve.runtime.batching import Batcher, BatchSettings

    return Batcher("direct", runs, BatchSettings(**settings), Metrics().for_batcher("direct"))


def _column(value: int) -> dict[str, npt.NDArray[Any]]:
    return {"x": np.array([value], dtype=np.int64)}


async def test_with_a_free_slot_and_a_busy_one_the_batcher_waits_for_rows_that_keep_coming() -> None:
    runs = _Runs()
    batcher = _batcher(runs, max_batch_size=8, max_wait_s=0.2, max_concurrent_batches=2)
    batcher.start()
    try:
        deadline = time.monotonic() + 5
        first = asyncio.create_task(batcher.submit(_column(0), 1, deadline))
        await runs.first_started.wait()
        # Rows arriving every 5 ms: waiting up to 200 ms for a full batch of 8 pays.
        rest = []
        for value in range(1, 9):
            rest.append(asyncio.create_task(batcher.submit(_column(value), 1, deadline)))
            await asyncio.sleep(0.005)
        results = await asyncio.gather(*rest)
        runs.release.set()
        await first
    finally:
        await batcher.aclose()
    assert [r["y"].tolist() for r in results] == [[2 * v] for v in range(1, 9)]
    assert runs.batches[1] == list(range(1, 9))  # one full batch, not eight singles


async def test_a_tight_deadline_releases_a_waiting_batch_early() -> None:
    runs = _Runs()
    batcher = _batcher(runs, max_batch_size=64, max_wait_s=1.0, max_concurrent_batches=2)
    batcher.cost.observe(1, 0.01)  # a known cost: 10 ms per row
    batcher.start()
    try:
        first = asyncio.create_task(batcher.submit(_column(0), 1, time.monotonic() + 5))
        await runs.first_started.wait()
        others = []
        for value in range(1, 4):  # teach the rate meter that rows come fast
            others.append(asyncio.create_task(batcher.submit(_column(value), 1, time.monotonic() + 5)))
            await asyncio.sleep(0.002)
        started = time.perf_counter()
        tight = await batcher.submit(_column(9), 1, time.monotonic() + 1.0)
        elapsed = time.perf_counter() - started
        await asyncio.gather(*others)
        runs.release.set()
        await first
    finally:
        await batcher.aclose()
    assert tight["y"].tolist() == [18]
    # It waited for company, but left 1.0 - t(64) = 0.36 s before the deadline, not after max_wait_s (1 s).
    assert 0.2 < elapsed < 0.6
    assert runs.batches[1] == [1, 2, 3, 9]


class _Sleeps:
    """A runner whose batches take 50 ms per row of real time; it records the rows it ran."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def __call__(self, columns: dict[str, npt.NDArray[Any]], rows: int, deadline: float) -> Any:
        self.seen.extend(columns["x"].tolist())
        await asyncio.sleep(0.05 * rows)
        return {"y": columns["x"] * 2}, 0.05 * rows, 0.0


async def test_an_item_whose_deadline_would_pass_during_its_batch_is_answered_before_the_model_runs() -> None:
    from asyncserve.exceptions import DeadlineExceeded

    runs = _Sleeps()
    batcher = _batcher(runs, max_batch_size=64, max_concurrent_batches=1)  # type: ignore[arg-type]
    batcher.start()
    try:
        for rows in (1, 2):  # the cost model learns 50 ms per row
            await batcher.submit({"x": np.arange(rows, dtype=np.int64)}, rows, time.monotonic() + 5)
        running = asyncio.create_task(batcher.submit(_column(100), 1, time.monotonic() + 5))
        await asyncio.sleep(0.01)
        # Admitted: behind the running row, it would be done in about 100 ms, within its 300 ms.
        late = asyncio.create_task(batcher.submit(_column(200), 1, time.monotonic() + 0.3))
        # Then eight rows of a higher lane take the next batch before it: 9 rows, about 450 ms.
        eight = {"x": np.arange(300, 308, dtype=np.int64)}
        urgent = asyncio.create_task(batcher.submit(eight, 8, time.monotonic() + 5, priority=9))
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded, match="cannot finish its next batch before the request's deadline"):
            await late
        answered_after = time.perf_counter() - started
        assert (await urgent)["y"].tolist() == [2 * v for v in range(300, 308)]
        await running
    finally:
        await batcher.aclose()
    assert answered_after < 0.2  # when the batch formed, not at the deadline
    assert 200 not in runs.seen  # the model's time went to the rows that could still make it


async def test_the_cost_model_learns_compute_not_the_wait_for_a_worker() -> None:
    # One executor worker, shared: the adder's batches wait behind the sleeper's 0.3 s ones. Their
    # cost must stay the adder's own (a few ms), or the batcher would refuse its requests for
    # deadlines that the adder meets easily.
    sleeper = Sleeper()
    settings = Settings(executor_workers=1, jobs="", loop_lag_interval_s=0.01)
    async with serving(Service(sleeper, Adder(), name="shared"), settings) as running, running.client() as client:
        for _ in range(4):
            sleeper.started.clear()
            slow = asyncio.create_task(client.post("/v1/models/sleeper/predict", json={"seconds": 0.3}))
            await asyncio.to_thread(sleeper.started.wait, 5)
            waiting = await client.post("/v1/models/adder/predict", json={"a": [1, 2, 3], "b": [1, 1, 1]})
            assert waiting.status_code == 200
            assert (await slow).status_code == 200
        registry = running.app.metrics.registry
        per_batch = registry.get_sample_value("asyncserve_batch_cost_seconds", {"model": "adder", "term": "per_batch"})
        per_row = registry.get_sample_value("asyncserve_batch_cost_seconds", {"model": "adder", "term": "per_row"})
        waited = registry.get_sample_value("asyncserve_batch_worker_wait_seconds_sum", {"model": "adder"})
    assert waited is not None
    assert waited > 0.5
    assert per_batch is not None
    assert per_row is not None
    assert per_batch + per_row < 0.05, f"the adder's cost learned {per_batch + per_row:.3f} s for one row"
