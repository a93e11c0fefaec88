"""The ASGI adapter: a service under uvicorn, and mounted in a FastAPI app, takes the same way as through
asyncserve's own server (``HttpApp.handle``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import fastapi
import httpx
import orjson

from asyncserve import Service, Settings
from asyncserve.asgi import app
from tests.conftest import serving_asgi
from tests.models import Adder, Sleeper

ROW = {"a": [1.0, 2.0, 3.0], "b": [1.0, 1.0, 1.0]}
V2_ROW = {"inputs": [{"name": n, "shape": [1, 3], "datatype": "FP32", "data": v} for n, v in ROW.items()]}
SETTINGS = Settings(executor_workers=1, jobs="memory://", loop_lag_interval_s=0.01, max_body_bytes=4096)


async def ready(client: httpx.AsyncClient) -> None:
    async with asyncio.timeout(10):
        while (await client.get("/v2/health/ready")).status_code != 200:  # noqa: ASYNC110 (loading has no event here)
            await asyncio.sleep(0.01)


async def test_a_service_under_uvicorn_answers_as_asyncserve_serves_it() -> None:
    service = Service(Adder(), Sleeper(), name="asgi")
    async with serving_asgi(app(service, SETTINGS), lifespan=True) as url, httpx.AsyncClient(base_url=url) as client:
        await ready(client)
        predicted = await client.post("/v1/models/adder/predict", json=ROW, headers={"X-Request-ID": "asgi-1"})
        assert (predicted.status_code, predicted.json()["sum"]) == (200, [2.0, 3.0, 4.0])
        assert predicted.headers["x-request-id"] == "asgi-1"
        inferred = await client.post("/v2/models/adder/infer", json=V2_ROW)
        assert inferred.json()["outputs"][0]["data"] == [2.0, 3.0, 4.0]
        missing = await client.post("/v2/models/nope/infer", json=V2_ROW)
        assert (missing.status_code, missing.json()["code"]) == (404, "model_not_found")
        too_large = await client.post("/v1/models/adder/predict", content=b"x" * 5000)
        assert (too_large.status_code, too_large.json()["code"]) == (413, "payload_too_large")
        submitted = await client.post("/v1/jobs", json={"model": "adder", "inputs": ROW})
        assert submitted.status_code == 202
        events = await client.get(f"/v1/jobs/{submitted.json()['id']}/events")
        assert b"event: succeeded" in events.content
        assert (
            'asyncserve_requests_total{model="adder",route="v1_predict",status="200"}'
            in (await client.get("/metrics")).text
        )


async def test_a_client_that_goes_away_withdraws_its_work_under_asgi_too() -> None:
    sleeper = Sleeper()
    service = Service(sleeper, name="asgi-gone")
    async with serving_asgi(app(service, SETTINGS), lifespan=True) as url, httpx.AsyncClient(base_url=url) as client:
        await ready(client)
        sleeper.started.clear()
        before = sleeper.calls
        blocker = asyncio.create_task(client.post("/v1/models/sleeper/predict", json={"seconds": 0.5}))
        await asyncio.to_thread(sleeper.started.wait, 5)
        async with httpx.AsyncClient(base_url=url) as impatient:
            gone = asyncio.create_task(impatient.post("/v1/models/sleeper/predict", json={"seconds": 0}))
            async with asyncio.timeout(5):
                while 'asyncserve_batch_queue_rows{model="sleeper"} 1.0' not in (await client.get("/metrics")).text:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
            gone.cancel()
        assert (await blocker).status_code == 200
        last = await client.post("/v1/models/sleeper/predict", json={"seconds": 0})  # after any batch holding it
        assert last.status_code == 200
        assert sleeper.calls == before + 2  # the blocker and the last: the withdrawn row never ran
        metrics = (await client.get("/metrics")).text
        assert 'asyncserve_client_disconnects_total{model="sleeper",route="v1_predict"}' in metrics


async def test_mounted_in_a_fastapi_app_started_by_its_lifespan() -> None:
    served = app(Service(Adder(), name="mounted"), SETTINGS)

    @contextlib.asynccontextmanager
    async def lifespan(_: fastapi.FastAPI) -> AsyncIterator[None]:
        async with served:
            yield

    outer = fastapi.FastAPI(lifespan=lifespan)
    outer.mount("/ml", served)  # type: ignore[arg-type]

    @outer.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    async with serving_asgi(outer, lifespan=True) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/hello")).json() == {"hello": "world"}
        answer = await client.post("/ml/v1/models/adder/predict", content=orjson.dumps(ROW))
        assert (answer.status_code, answer.json()["sum"]) == (200, [2.0, 3.0, 4.0])
