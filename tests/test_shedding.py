"""Refusal at the HTTP parser: when the event loop runs later than an inference request's budget,
the request is answered 503 at once, without becoming an ASGI task, and its connection lives on.

The loop's lag is set by hand (the probe's interval is an hour, so it never overwrites it): these
tests are about what the server answers for a given lag, over real sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from asyncserve import Service
from asyncserve.config import Settings
from tests.conftest import RunningServer, serving
from tests.models import Adder

ROW = {"a": [1.0, 2.0, 3.0], "b": [1.0, 1.0, 1.0]}


@pytest.fixture
async def lagging() -> AsyncIterator[RunningServer]:
    settings = Settings(executor_workers=1, loop_lag_interval_s=3600, jobs="memory://")
    async with serving(Service(Adder(), name="shedding"), settings) as running:
        running.app.loop_lag.recent_lag_s = 0.5
        yield running


def request(path: str, body: bytes, *headers: str, version: str = "1.1") -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: 127.0.0.1", "Content-Type: application/json", *headers]
    return ("\r\n".join([*lines, f"Content-Length: {len(body)}", "", ""])).encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return int(status_line.split()[1]), headers, body


async def connect(running: RunningServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = running.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def test_a_request_whose_budget_the_lag_exceeds_is_refused_and_the_connection_serves_the_next(
    lagging: RunningServer,
) -> None:
    reader, writer = await connect(lagging)
    # A body of 1 MiB: the refusal goes out after the headers; the rest of the body is read and dropped.
    big = orjson.dumps({**ROW, "padding": "x" * (1 << 20)})
    writer.write(request("/v1/models/adder/predict", big, "X-Request-Timeout: 0.2", "X-Request-ID: shed-1"))
    status, headers, body = await read_response(reader)
    assert status == 503
    assert headers["retry-after"] == "1"
    assert headers["x-request-id"] == "shed-1"
    assert headers["content-type"] == "application/json"
    error = orjson.loads(body)
    assert error["code"] == "overloaded"
    assert "event loop runs 500 ms late, too late for this request's 200 ms" in error["error"]
    lagging.app.loop_lag.recent_lag_s = 0.0
    writer.write(request("/v1/models/adder/predict", orjson.dumps(ROW)))
    status, _, body = await read_response(reader)
    assert status == 200, body
    assert orjson.loads(body)["sum"] == [2.0, 3.0, 4.0]
    writer.close()
    await writer.wait_closed()


async def test_a_budget_above_the_lag_and_other_routes_are_served(lagging: RunningServer) -> None:
    async with lagging.client() as client:
        patient = await client.post("/v1/models/adder/predict", json=ROW, headers={"X-Request-Timeout": "5"})
        v2 = await client.post(
            "/v2/models/adder/infer",
            json={"inputs": [{"name": n, "shape": [1, 3], "datatype": "FP32", "data": v} for n, v in ROW.items()]},
            headers={"X-Request-Timeout": "0.1"},
        )
        job = await client.post(
            "/v1/jobs", json={"model": "adder", "inputs": ROW}, headers={"X-Request-Timeout": "0.1"}
        )
        ready = await client.get("/v2/health/ready")
        bad = await client.post("/v1/models/adder/predict", json=ROW, headers={"X-Request-Timeout": "soon"})
        metrics = (await client.get("/metrics")).text
    assert patient.status_code == 200, patient.text
    assert v2.status_code == 503
    assert v2.json()["code"] == "overloaded"
    assert job.status_code == 202, "a job submission is durable work, not refused for the loop's lag"
    assert ready.status_code == 200
    assert bad.status_code == 400, "a bad header still gets its 400"
    assert "X-Request-Timeout" in bad.json()["error"]
    assert 'asyncserve_request_errors_total{code="overloaded",model="adder",route="v2_infer"} 1.0' in metrics
    assert 'asyncserve_requests_total{model="adder",route="v2_infer",status="503"} 1.0' in metrics


async def test_an_http_1_0_refusal_closes_the_connection(lagging: RunningServer) -> None:
    reader, writer = await connect(lagging)
    writer.write(request("/v1/models/adder/predict", orjson.dumps(ROW), "X-Request-Timeout: 0.1", version="1.0"))
    status, headers, _ = await read_response(reader)
    assert status == 503
    assert headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_without_a_timeout_header_the_grace_period_is_the_budget(lagging: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=lagging.url) as client:
        served = await client.post("/v1/models/adder/predict", json=ROW)
        lagging.app.loop_lag.recent_lag_s = lagging.app.settings.grace_period_s
        refused = await client.post("/v1/models/adder/predict", json=ROW)
    assert served.status_code == 200
    assert refused.status_code == 503
    assert refused.json()["code"] == "overloaded"
