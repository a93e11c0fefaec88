"""Readiness while models load, and an event loop that stays responsive while models are saturated."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from asyncserve import Model, Service, Settings, Tensor
from tests.conftest import serving
from tests.models import SlowLoader, Spinner


class MatMul(Model):
    """CPU-bound NumPy work (it releases the GIL, like most real model runtimes)."""

    name = "matmul"
    inputs = {"n": Tensor("INT64")}
    outputs = {"checksum": Tensor("FP64")}

    def load(self) -> None:
        self.matrix = np.random.default_rng(0).standard_normal((300, 300))

    def predict(self, n: npt.NDArray[Any]) -> npt.NDArray[Any]:
        result = self.matrix
        for _ in range(int(n.max())):
            result = np.tanh(result @ self.matrix)
        return np.full(len(n), float(result.sum()))


async def test_live_at_once_ready_only_when_every_model_is_loaded() -> None:
    gate = threading.Event()
    async with serving(Service(SlowLoader(gate), Spinner()), wait_ready=False) as running, running.client() as client:
        assert (await client.get("/v2/health/live")).status_code == 200
        not_ready = await client.get("/v2/health/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["ready"] is False
        assert "slow_loader" in not_ready.json()["error"]
        assert int(not_ready.headers["retry-after"]) >= 1
        early = await client.post("/v1/models/slow_loader/predict", json={"x": 1})
        assert early.status_code == 503
        assert early.json()["code"] == "model_not_ready"
        gate.set()
        await asyncio.wait_for(asyncio.wrap_future(_when_loaded(running.app)), 10)
        assert (await client.get("/v2/health/ready")).status_code == 200
        assert (await client.post("/v1/models/slow_loader/predict", json={"x": 1})).json() == {"y": 1}


def _when_loaded(app: Any) -> Any:
    import concurrent.futures

    future: concurrent.futures.Future[None] = concurrent.futures.Future()

    def wait() -> None:
        while not app.registry.ready:
            time.sleep(0.01)
        future.set_result(None)

    threading.Thread(target=wait, daemon=True).start()
    return future


async def test_failed_load_leaves_the_model_unavailable_with_the_reason() -> None:
    class Broken(SlowLoader):
        name = "broken"

        def load(self) -> None:
            raise OSError("weights missing")

    async with serving(Service(Broken(threading.Event()))) as running, running.client() as client:
        ready = await client.get("/v2/health/ready")
        assert ready.status_code == 503
        assert "load failed: OSError" in ready.json()["error"]
        index = (await client.post("/v2/repository/index")).json()
        assert index == [{"name": "broken", "state": "UNAVAILABLE", "reason": "load failed: OSError"}]


async def test_liveness_stays_fast_while_a_cpu_bound_model_is_saturated() -> None:
    settings = Settings(executor_workers=2, loop_lag_interval_s=0.01)
    async with serving(Service(MatMul()), settings) as running, running.client() as client:
        load = [client.post("/v1/models/matmul/predict", json={"n": 20}) for _ in range(32)]
        saturating = asyncio.gather(*load)
        await asyncio.sleep(0.05)
        latencies = await _probe(client, seconds=1.0)
        assert all(r.status_code == 200 for r in await saturating)
        lag = running.app.loop_lag.max_lag_s
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    assert p99 < 0.05, f"p99 {p99 * 1000:.1f} ms over {len(latencies)} probes"
    assert lag < 0.05, f"max event-loop lag {lag * 1000:.1f} ms"


async def _probe(client: httpx.AsyncClient, seconds: float) -> list[float]:
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        assert (await client.get("/v2/health/live")).status_code == 200
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.005)
    return latencies
