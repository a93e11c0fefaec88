"""Readiness while models load, and an event loop that stays responsive while models are saturated."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx

from asyncserve import Service, Settings
from tests.conftest import serving
from tests.models import Busy, SlowLoader, Spinner


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
            with open("/nonexistent/broken/weights.bin", "rb"):
                pass

    reason = "load failed: FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/broken/weights.bin'"
    async with serving(Service(Broken(threading.Event()))) as running, running.client() as client:
        ready = await client.get("/v2/health/ready")
        model_ready = await client.get("/v2/models/broken/ready")
        index = (await client.post("/v2/repository/index")).json()
    assert ready.status_code == 503
    assert reason in ready.json()["error"]
    assert model_ready.status_code == 503
    assert model_ready.json() == {
        "error": f"model 'broken' is unavailable ({reason}); to serve it again: POST /v2/repository/models/broken/load",
        "code": "model_not_ready",
    }
    assert index == [{"name": "broken", "state": "UNAVAILABLE", "reason": reason}]


async def test_the_event_loop_lag_stays_low_while_a_cpu_bound_model_is_saturated() -> None:
    # Measured inside the server (the client-side latency is tested with separate processes in
    # test_server.py, where the test's own GIL cannot skew it).
    settings = Settings(executor_workers=1, loop_lag_interval_s=0.01)
    async with serving(Service(Busy()), settings) as running, running.client() as client:
        done = asyncio.Event()
        busy = [asyncio.create_task(_keep_busy(client, done)) for _ in range(8)]
        await asyncio.sleep(1.0)
        done.set()
        served = sum(await asyncio.gather(*busy))
        lag = running.app.loop_lag.max_lag_s
        busy_seconds = _metric(await client.get("/metrics"), "asyncserve_inference_duration_seconds_sum")
    # The premise: the model ran most of the second. Not 0.8 of it: on a shared machine under load,
    # the hops between one call and the next took a quarter of it (0.76 s busy).
    assert busy_seconds > 0.6, f"the model was busy only {busy_seconds:.2f}s of the 1 s"
    assert served > 8
    assert lag < 0.05, f"max event-loop lag {lag * 1000:.1f} ms"


async def _keep_busy(client: httpx.AsyncClient, done: asyncio.Event) -> int:
    served = 0
    while not done.is_set():
        response = await client.post("/v1/models/busy/predict", json={"n": 2})
        assert response.status_code == 200
        served += 1
    return served


def _metric(response: httpx.Response, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in response.text.splitlines() if line.startswith(prefix))
