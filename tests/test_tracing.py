"""OpenTelemetry spans of a request through a real server: names, parents, the caller's trace kept and passed on."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from asyncserve import Model, Service, Settings, Tensor, tracing
from asyncserve.features import Feature, HttpSource
from tests.conftest import serving
from tests.models import Adder
from tests.processes import REPO, eventually, free_port, wait_final

Array = np.ndarray[Any, Any]


class Older(Model):
    """Next year's age of a user, looked up in an HTTP feature service."""

    name = "older"
    inputs = {"user_id": Tensor("INT64")}
    outputs = {"next_age": Tensor("FP32")}

    def __init__(self, url: str) -> None:
        source = HttpSource("users", f"{url}/users/{{key}}")
        self.features = [Feature(source, key="user_id", fields={"age": Tensor("FP32")})]  # type: ignore[misc]

    def predict(self, user_id: Array, age: Array) -> Array:
        return age + 1


class FeatureService:
    """An aiohttp server on the test's loop that answers ``/users/{id}`` and keeps each call's ``traceparent``."""

    def __init__(self) -> None:
        self.traceparents: list[str | None] = []
        app = web.Application()
        app.router.add_get("/users/{key}", self.user)
        self.server = TestServer(app, host="127.0.0.1")

    async def user(self, request: web.Request) -> web.Response:
        self.traceparents.append(request.headers.get("traceparent"))
        return web.json_response({"age": 40.0})


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


@pytest.fixture
async def features() -> AsyncIterator[FeatureService]:
    service = FeatureService()
    await service.server.start_server()
    try:
        yield service
    finally:
        await service.server.close()


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def of_trace(exporter: InMemorySpanExporter, trace_id: str) -> dict[str, ReadableSpan]:
    spans = [
        s for s in exporter.get_finished_spans() if s.context is not None and f"{s.context.trace_id:032x}" == trace_id
    ]
    return {span.name: span for span in spans}


def parent_of(span: ReadableSpan) -> str:
    assert span.parent is not None, span.name
    return f"{span.parent.span_id:016x}"


def span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


STAGES = {
    "asyncserve.request", "asyncserve.admission", "asyncserve.features", "asyncserve.queue_wait", "asyncserve.batch",
    "asyncserve.model", "asyncserve.prediction_log",
}  # fmt: skip


async def test_a_request_and_its_stages_are_spans_of_the_callers_trace(
    spans: InMemorySpanExporter, features: FeatureService, tmp_path: Path
) -> None:
    url = str(features.server.make_url("")).rstrip("/")
    settings = Settings(executor_workers=1, jobs="", prediction_log=f"jsonl://{tmp_path}/log.jsonl")
    header, trace_id, caller_span = traceparent()
    async with serving(Service(Older(url)), settings) as running, running.client() as client:
        response = await client.post("/v1/models/older/predict", json={"user_id": 7}, headers={"traceparent": header})
        assert response.status_code == 200, response.text

        async def all_ended() -> bool:
            return set(of_trace(spans, trace_id)) == STAGES

        await eventually(all_ended, "every stage's span to end")
    stage = of_trace(spans, trace_id)
    request = stage["asyncserve.request"]
    assert parent_of(request) == caller_span  # the caller's span is the request's parent
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["asyncserve.model"] == "older"
    for name in ("asyncserve.admission", "asyncserve.features", "asyncserve.queue_wait", "asyncserve.prediction_log"):
        assert parent_of(stage[name]) == span_id(request), name
    assert parent_of(stage["asyncserve.batch"]) == span_id(request)  # the batch's first request
    assert parent_of(stage["asyncserve.model"]) == span_id(stage["asyncserve.batch"])
    assert stage["asyncserve.features"].attributes == {"asyncserve.feature_source": "users", "asyncserve.keys": 1}
    # The feature service was called within the same trace, under the request's feature lookup.
    assert features.traceparents == [f"00-{trace_id}-{span_id(stage['asyncserve.features'])}-01"]


async def test_a_batch_is_linked_to_every_request_it_served(spans: InMemorySpanExporter) -> None:
    settings = Settings(executor_workers=1, jobs="")
    headers = [traceparent() for _ in range(20)]
    async with serving(Service(Adder()), settings) as running, running.client() as client:
        body = {"a": [1, 2, 3], "b": [4, 5, 6]}
        answers = await asyncio.gather(
            *(client.post("/v1/models/adder/predict", json=body, headers={"traceparent": h}) for h, _, _ in headers)
        )
    assert [answer.status_code for answer in answers] == [200] * 20
    finished = spans.get_finished_spans()
    batches = [span for span in finished if span.name == "asyncserve.batch"]
    served = {parent_of(batch) for batch in batches} | {
        f"{link.context.span_id:016x}" for b in batches for link in b.links
    }
    for _, trace_id, _ in headers:
        request = of_trace(spans, trace_id)["asyncserve.request"]
        assert span_id(request) in served
    assert sum(len(batch.links) + 1 for batch in batches) == 20  # each request in one batch


async def test_a_refused_request_ends_its_span_with_the_status(spans: InMemorySpanExporter) -> None:
    header, trace_id, _ = traceparent()
    async with serving(Service(Adder()), Settings(executor_workers=1, jobs="")) as running, running.client() as client:
        response = await client.post("/v1/models/nobody/predict", json={}, headers={"traceparent": header})
    assert response.status_code == 404
    request = of_trace(spans, trace_id)["asyncserve.request"]
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 404


def test_tracing_off_imports_no_opentelemetry() -> None:
    code = (
        "import sys, asyncserve.server, asyncserve.cli; from asyncserve import tracing, Settings; "
        "assert tracing.configure(Settings(), environ={}) is None; "
        "print(tracing.tracer, sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "None []"


@pytest.mark.e2e
async def test_spans_are_exported_over_otlp_by_the_standard_variable(tmp_path: Path) -> None:
    exported: list[ExportTraceServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        exported.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    collector = TestServer(app, host="127.0.0.1")
    await collector.start_server()
    port = free_port()
    env = {
        **os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": str(collector.make_url("")).rstrip("/"),
        "OTEL_SERVICE_NAME": "adder-svc", "ASYNCSERVE_JOBS": "",
    }  # fmt: skip
    command = [sys.executable, "-m", "asyncserve", "serve", "tests.services:service", "--port", str(port)]
    process = await asyncio.create_subprocess_exec(*command, cwd=REPO, env=env, stderr=asyncio.subprocess.DEVNULL)
    header, trace_id, _ = traceparent()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def answers() -> bool:
                try:
                    body = {"a": [1, 2, 3], "b": [4, 5, 6]}
                    response = await client.post("/v1/models/adder/predict", json=body, headers={"traceparent": header})
                except httpx.TransportError:
                    return False
                return response.status_code == 200

            await eventually(answers, "the server to answer")
        process.send_signal(signal.SIGTERM)  # the exporter flushes as the server stops
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await collector.close()
    names = set()
    for request in exported:
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
            assert service == "adder-svc"
            for scope_spans in resource_spans.scope_spans:
                names |= {span.name for span in scope_spans.spans if span.trace_id.hex() == trace_id}
    assert {"asyncserve.request", "asyncserve.batch", "asyncserve.model", "asyncserve.queue_wait"} <= names


async def test_a_job_runs_traced_its_batch_a_trace_of_its_own(spans: InMemorySpanExporter) -> None:
    settings = Settings(executor_workers=1, jobs="memory://")
    async with serving(Service(Adder()), settings) as running, running.client() as client:
        accepted = await client.post("/v1/jobs", json={"model": "adder", "inputs": {"a": [1, 2, 3], "b": [4, 5, 6]}})
        job = await wait_final(client, accepted.json()["id"])
    assert job["status"] == "succeeded", job
    batches = [span for span in spans.get_finished_spans() if span.name == "asyncserve.batch"]
    assert [batch.parent for batch in batches] == [None]  # a worker's rows come from no request
    assert not [span for span in spans.get_finished_spans() if span.name == "asyncserve.queue_wait"]
