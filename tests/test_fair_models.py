"""Many models on one server: per-model capacity, fair order between models, and a cost model that
measures compute, all through a real server.

The slow models here wait on permits the test hands out (``Gated``), so which batch runs when is
decided by the test, not by the machine's speed.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncserve import Model, Service, Tensor
from asyncserve.config import Settings
from tests.conftest import RunningServer, serving
from tests.models import OwnProcess
from tests.processes import launch

Array = npt.NDArray[Any]


class Gated(Model):
    """Each predict call waits for a permit from the test, and counts the calls running at once."""

    name = "heavy"
    inputs = {"x": Tensor("FP32")}
    outputs = {"y": Tensor("FP32")}
    max_batch_size = 1

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.threads: set[str] = set()

    def predict(self, x: Array) -> Array:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.threads.add(threading.current_thread().name)
        try:
            if not self.permits.acquire(timeout=20):
                raise TimeoutError("the test handed out no permit")
            return x
        finally:
            with self._lock:
                self.running -= 1


class GatedOnce(Gated):
    max_concurrent_batches = 1


class GatedOwn(Gated):
    instances = 2


class Quick(Model):
    name = "quick"
    inputs = {"x": Tensor("FP32")}
    outputs = {"y": Tensor("FP32")}

    def predict(self, x: Array) -> Array:
        return x + 1


class Recorder(Model):
    """Answers one row at a time and records the order it saw them in."""

    name = "recorder"
    inputs = {"x": Tensor("FP32")}
    outputs = {"y": Tensor("FP32")}
    max_batch_size = 1

    def __init__(self) -> None:
        self.seen: list[float] = []

    def predict(self, x: Array) -> Array:
        self.seen.extend(float(v) for v in x)
        return x


class Sleepy(Model):
    """Sleeps a fixed time per batch: a model whose compute is known."""

    inputs = {"x": Tensor("FP32")}
    outputs = {"y": Tensor("FP32")}
    max_batch_size = 1

    def __init__(self, name: str, seconds: float, *, weight: float = 1.0, order: list[str] | None = None) -> None:
        self.name = name  # type: ignore[misc]
        self.weight = weight  # type: ignore[misc]
        self.seconds = seconds
        self.order = order if order is not None else []

    def predict(self, x: Array) -> Array:
        threading.Event().wait(self.seconds)
        self.order.append(self.name)
        return x


def settings(workers: int) -> Settings:
    return Settings(executor_workers=workers, loop_lag_interval_s=0.01, jobs="")


async def predict(client: httpx.AsyncClient, model: str, value: float = 1.0) -> httpx.Response:
    return await client.post(f"/v1/models/{model}/predict", json={"x": value})


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def until(client: httpx.AsyncClient, name: str, value: float, **labels: str) -> None:
    async with asyncio.timeout(10):
        while await metric(client, name, **labels) != value:  # noqa: ASYNC110 (polling the server's metrics)
            await asyncio.sleep(0.01)


@pytest.fixture
async def heavy_and_quick() -> AsyncIterator[tuple[RunningServer, Gated]]:
    heavy = Gated()
    async with serving(Service(heavy, Quick()), settings(2)) as running:
        yield running, heavy
        heavy.permits.release(100)  # let whatever still waits finish before the server stops


async def test_a_model_alone_may_use_every_worker(heavy_and_quick: tuple[RunningServer, Gated]) -> None:
    running, heavy = heavy_and_quick
    async with running.client() as client:
        flood = [asyncio.create_task(predict(client, "heavy")) for _ in range(4)]
        await until(client, "asyncserve_batches_running", 2, model="heavy")
        heavy.permits.release(4)
        assert [r.status_code for r in await asyncio.gather(*flood)] == [200] * 4
    assert heavy.most_running == 2


async def test_a_cheap_model_waits_for_at_most_one_batch_of_a_busy_model(
    heavy_and_quick: tuple[RunningServer, Gated],
) -> None:
    running, heavy = heavy_and_quick
    async with running.client() as client:
        flood = [asyncio.create_task(predict(client, "heavy")) for _ in range(6)]
        await until(client, "asyncserve_batches_running", 2, model="heavy")
        first = asyncio.create_task(predict(client, "quick"))
        await until(client, "asyncserve_batch_queue_rows", 1, model="quick")
        heavy.permits.release(1)  # one heavy batch ends: its worker goes to the waiting quick model first
        assert (await first).json() == {"y": 2.0}
        # From now on a worker is kept for the quick model: its requests pass while heavy ones are stuck.
        for value in range(5):
            response = await asyncio.wait_for(predict(client, "quick", value), 5)
            assert response.json() == {"y": value + 1.0}
        assert await metric(client, "asyncserve_batches_running", model="heavy") == 1
        heavy.permits.release(5)
        assert [r.status_code for r in await asyncio.gather(*flood)] == [200] * 6


async def test_max_concurrent_batches_caps_a_model_below_the_workers() -> None:
    heavy = GatedOnce()
    async with serving(Service(heavy), settings(2)) as running, running.client() as client:
        flood = [asyncio.create_task(predict(client, "heavy")) for _ in range(3)]
        await until(client, "asyncserve_batches_running", 1, model="heavy")
        await until(client, "asyncserve_batch_queue_rows", 2, model="heavy")
        heavy.permits.release(3)
        assert [r.status_code for r in await asyncio.gather(*flood)] == [200] * 3
    assert heavy.most_running == 1


async def test_a_model_with_workers_of_its_own_never_takes_the_shared_ones() -> None:
    heavy = GatedOwn()
    # One shared worker only: the heavy model's own two are busy, the quick model still answers.
    async with serving(Service(heavy, Quick()), settings(1)) as running, running.client() as client:
        flood = [asyncio.create_task(predict(client, "heavy")) for _ in range(4)]
        await until(client, "asyncserve_batches_running", 2, model="heavy")
        for value in range(3):
            assert (await asyncio.wait_for(predict(client, "quick", value), 5)).json() == {"y": value + 1.0}
        heavy.permits.release(4)
        assert [r.status_code for r in await asyncio.gather(*flood)] == [200] * 4
    assert heavy.most_running == 2
    assert all(name.startswith("asyncserve-heavy") for name in heavy.threads), heavy.threads


async def test_a_model_in_processes_of_its_own_runs_there(tmp_path: Path) -> None:
    async with (
        launch("serve", "tests.services:own_process", env={}, log_dir=tmp_path) as server,
        httpx.AsyncClient(base_url=str(server.url), timeout=10) as client,
    ):
        pids = {(await predict(client, "own_process")).json()["pid"] for _ in range(3)}
        row = {"a": [1.0, 2.0, 3.0], "b": [1.0, 1.0, 1.0]}
        assert (await client.post("/v1/models/adder/predict", json=row)).status_code == 200
    assert len(pids) == 1
    assert pids.isdisjoint({server.pid, os.getpid()})


async def test_models_share_one_worker_by_weight_of_compute() -> None:
    order: list[str] = []
    heavy = Sleepy("twice", 0.01, weight=2.0, order=order)
    light = Sleepy("once", 0.01, order=order)
    async with serving(Service(heavy, light), settings(1)) as running, running.client() as client:
        flood = [predict(client, name) for _ in range(40) for name in ("twice", "once")]
        responses = await asyncio.gather(*flood)
    assert {r.status_code for r in responses} == {200}
    # While both have work waiting (the first 45 batches), weight 2 gets about two batches of three.
    share = order[:45].count("twice") / 45
    assert 0.55 <= share <= 0.8, order


async def test_the_cost_model_learns_compute_not_the_wait_for_a_worker() -> None:
    heavy = Sleepy("heavy", 0.4)
    async with serving(Service(heavy, Quick()), settings(1)) as running, running.client() as client:
        for _ in range(3):  # the quick model's cost, learnt on an idle server
            await predict(client, "quick")
        flood = [asyncio.create_task(predict(client, "heavy")) for _ in range(2)]
        await until(client, "asyncserve_batches_running", 1, model="heavy")
        # The quick model's rows wait for the one worker while a heavy batch sleeps in it.
        waiting = [asyncio.create_task(predict(client, "quick", v)) for v in range(3)]
        assert [r.status_code for r in await asyncio.gather(*waiting, *flood)] == [200] * 5
        per_row = await metric(client, "asyncserve_batch_cost_seconds", model="quick", term="per_row")
        per_batch = await metric(client, "asyncserve_batch_cost_seconds", model="quick", term="per_batch")
        waited = await metric(client, "asyncserve_batch_worker_wait_seconds_sum", model="quick")
        compute = await metric(client, "asyncserve_model_compute_seconds_total", model="quick")
    assert waited >= 0.1
    assert per_row + per_batch < 0.05
    assert compute < 0.1


async def test_priorities_still_order_a_models_rows_while_it_waits_for_a_worker() -> None:
    heavy, recorder = Gated(), Recorder()
    async with serving(Service(heavy, recorder), settings(1)) as running, running.client() as client:
        stuck = asyncio.create_task(predict(client, "heavy"))
        await until(client, "asyncserve_batches_running", 1, model="heavy")
        sent = []
        for value, priority in ((1, 0), (2, 0), (3, 0), (10, 9), (11, 9)):
            body = {"x": value}
            sent.append(
                asyncio.create_task(
                    client.post("/v1/models/recorder/predict", json=body, headers={"X-Priority": str(priority)})
                )
            )
            await until(client, "asyncserve_batch_queue_rows", len(sent), model="recorder")
        heavy.permits.release(1)
        assert {r.status_code for r in await asyncio.gather(stuck, *sent)} == {200}
    assert recorder.seen == [10.0, 11.0, 1.0, 2.0, 3.0]


class BlasThreads(Model):
    """Answers how many threads OpenBLAS may use while it predicts."""

    name = "blas_threads"
    inputs = {"x": Tensor("FP32")}
    outputs = {"threads": Tensor("INT64")}

    def predict(self, x: Array) -> Array:
        from threadpoolctl import threadpool_info

        threads = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        return np.full(len(x), max(threads), dtype=np.int64)


async def test_native_libraries_get_the_compute_threads_asked_for() -> None:
    custom = Settings(executor_workers=2, compute_threads=1, loop_lag_interval_s=0.01, jobs="")
    async with serving(Service(BlasThreads()), custom) as running, running.client() as client:
        response = await client.post("/v1/models/blas_threads/predict", json={"x": 1.0})
    assert response.json() == {"threads": 1}


def test_by_default_workers_share_the_cores_unless_the_environment_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    cores = len(os.sched_getaffinity(0))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert Settings(executor_workers=1).threads_per_call == cores
    assert Settings(executor_workers=cores * 2).threads_per_call == 1
    assert Settings(executor_workers=1, compute_threads=3).threads_per_call == 3
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert Settings(executor_workers=1).threads_per_call == 0  # the user's choice stands


async def test_a_model_in_processes_of_its_own_starts_in_a_server_on_the_tests_loop() -> None:
    # Spawning the pool's processes takes blocking calls: they are made off the event loop.
    async with serving(Service(OwnProcess(), Quick()), settings(1)) as running, running.client() as client:
        pid = (await predict(client, "own_process")).json()["pid"]
    assert pid != os.getpid()
