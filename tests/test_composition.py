"""Ensembles, coalescing, the prediction cache and deferred predictions, through the real server."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from asyncserve import Model, Service, Settings, Tensor
from asyncserve.composition.ensemble import Ensemble, Member
from tests.conftest import serving
from tests.test_server import cli

Array = npt.NDArray[Any]
SETTINGS = Settings(executor_workers=2, loop_lag_interval_s=0.01)


class Scorer(Model):
    """Answers ``x * factor`` after ``delay_s`` (on the loop, like an I/O-bound model)."""

    inputs = {"x": Tensor("FP32")}
    outputs = {"score": Tensor("FP32")}

    def __init__(self, name: str, factor: float, delay_s: float = 0.0) -> None:
        self.name = name  # type: ignore[misc]
        self.factor = factor
        self.delay_s = delay_s

    async def predict(self, x: Array) -> Array:
        await asyncio.sleep(self.delay_s)
        return x * self.factor


class Committee(Ensemble):
    name = "committee"
    inputs = {"x": Tensor("FP32")}
    outputs = {"score": Tensor("FP32")}
    members = [Member("a"), Member("b"), Member("slow", timeout_s=0.1)]
    aggregate = "mean"
    output = "score"
    min_members = 2


class Strict(Committee):
    name = "strict"
    min_members = 3


class Counted(Model):
    """Deterministic and slow: counts how often it really runs."""

    name = "counted"
    inputs = {"x": Tensor("INT64")}
    outputs = {"y": Tensor("INT64")}
    deterministic = True

    def __init__(self) -> None:
        self.rows = 0
        self.lock = threading.Lock()

    def predict(self, x: Array) -> Array:
        with self.lock:
            self.rows += len(x)
        time.sleep(1.0)  # long enough for all the concurrent requests to arrive while it runs
        return x + 1


def committee_service(slow_delay_s: float) -> Service:
    members = [Scorer("a", 1.0), Scorer("b", 3.0), Scorer("slow", 100.0, slow_delay_s)]
    return Service(*members, Committee(), Strict(), name="ensembles")


async def test_an_ensemble_of_three_answers_their_mean() -> None:
    async with serving(committee_service(slow_delay_s=0.0), SETTINGS) as running, running.client() as client:
        response = await client.post("/v1/models/committee/predict", json={"x": 2.0})
        metadata = (await client.get("/v2/models/committee")).json()
    assert response.json() == {"score": pytest.approx((2 + 6 + 200) / 3), "members_used": "a,b,slow", "degraded": False}
    assert metadata["platform"] == "ensemble"


async def test_a_slow_member_gives_a_degraded_answer_within_the_deadline() -> None:
    async with serving(committee_service(slow_delay_s=2.0), SETTINGS) as running, running.client() as client:
        started = time.perf_counter()
        response = await client.post("/v1/models/committee/predict", json={"x": 2.0})
        elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert response.json() == {"score": 4.0, "members_used": "a,b", "degraded": True}
    assert elapsed < 0.5  # the slow member's 0.1 s timeout, not its 2 s


async def test_without_the_quorum_the_answer_is_a_clear_504() -> None:
    async with serving(committee_service(slow_delay_s=2.0), SETTINGS) as running, running.client() as client:
        response = await client.post("/v1/models/strict/predict", json={"x": 2.0})
    assert response.status_code == 504
    assert response.json()["code"] == "deadline_exceeded"
    assert "slow" in response.json()["error"]


async def test_a_thousand_identical_requests_run_the_model_once() -> None:
    model = Counted()
    async with serving(Service(model), SETTINGS) as running, running.client() as client:
        limits = httpx.Limits(max_connections=1000)
        async with httpx.AsyncClient(base_url=running.url, limits=limits, timeout=30) as many:
            responses = await asyncio.gather(
                *(many.post("/v1/models/counted/predict", json={"x": 41}) for _ in range(1000))
            )
        metrics = (await client.get("/metrics")).text
    assert all(response.json() == {"y": 42} for response in responses)
    assert model.rows == 1  # no warm-up (no example): the one computation they all shared
    assert "asyncserve_coalesced_requests_total 999.0" in metrics


async def test_the_redis_cache_is_shared_by_two_server_processes(redis_url: str) -> None:
    env = {"ASYNCSERVE_PREDICTION_CACHE": redis_url, "ASYNCSERVE_PREDICTION_CACHE_TTL_S": "30"}
    value = int(uuid.uuid4().int % 1_000_000)
    async with (
        cli("serve", "tests.services:cached", env=env) as (_, first_url),
        cli("serve", "tests.services:cached", env=env) as (_, second_url),
        httpx.AsyncClient(timeout=10) as client,
    ):
        first = await client.post(f"{first_url}/v1/models/cached/predict", json={"x": value})
        second = await client.post(f"{second_url}/v1/models/cached/predict", json={"x": value})
        metrics = (await client.get(f"{second_url}/metrics")).text
    assert first.json() == second.json()
    assert first.json()["pid"] != 0
    assert "asyncserve_prediction_cache_hits_total 1.0" in metrics


async def test_a_deferred_prediction_is_computed_only_when_read_and_once() -> None:
    model = Counted()
    async with serving(Service(model), SETTINGS) as running, running.client() as client:
        accepted = await client.post("/v1/models/counted/predict", json={"x": 7}, headers={"Prefer": "lazy"})
        assert accepted.status_code == 202
        location = accepted.headers["location"]
        assert accepted.json()["url"] == location
        await asyncio.sleep(0.1)
        assert model.rows == 0  # nothing computed yet
        reads = await asyncio.gather(*(client.get(location) for _ in range(20)))
        again = await client.get(location)
        unknown = await client.get("/v1/predictions/nope")
        metrics = (await client.get("/metrics")).text
    assert all(read.json() == {"y": 8} for read in [*reads, again])
    assert model.rows == 1
    assert unknown.status_code == 404
    assert "asyncserve_deferred_created_total 1.0" in metrics
    assert "asyncserve_deferred_resolved_total 1.0" in metrics


async def test_with_deferred_when_idle_an_idle_server_computes_unread_handles_before_they_are_read() -> None:
    model = Counted()
    settings = dataclasses.replace(SETTINGS, deferred_when_idle=True)
    async with serving(Service(model), settings) as running, running.client() as client:
        accepted = [
            await client.post("/v1/models/counted/predict", json={"x": x}, headers={"Prefer": "lazy"}) for x in (1, 2)
        ]
        for _ in range(100):  # the server is idle: within a few idle checks both are computed
            if model.rows == 2:
                break
            await asyncio.sleep(0.02)
        assert model.rows == 2
        reads = [await client.get(response.headers["location"]) for response in accepted]
    assert [read.json() for read in reads] == [{"y": 2}, {"y": 3}]
    assert model.rows == 2, "a read of a computed handle does not compute again"


def test_stacking_inputs_are_named_after_members() -> None:
    from asyncserve.composition.ensemble import stacking_inputs

    outputs = {Member("a"): {"score": np.array([1.0])}}
    assert set(stacking_inputs(outputs)) == {"a_score"}


class Pipeline2(Model):
    """A model whose code calls two others of the service, concurrently (a small DAG)."""

    name = "dag"
    inputs = {"x": Tensor("FP32")}
    outputs = {"total": Tensor("FP32")}

    async def predict(self, x: Array) -> Array:
        assert self.models is not None
        a, b = await asyncio.gather(
            self.models.predict("a", {"x": x}),
            self.models.predict("b", {"x": x}),
        )
        result: Array = a["score"] + b["score"]
        return result


async def test_a_models_code_calls_other_models_under_the_request_deadline() -> None:
    service = Service(Scorer("a", 1.0), Scorer("b", 3.0, delay_s=1.0), Pipeline2())
    async with serving(service, SETTINGS) as running, running.client() as client:
        ok = await client.post("/v1/models/dag/predict", json={"x": 2.0}, headers={"X-Request-Timeout": "2"})
        started = time.perf_counter()
        late = await client.post("/v1/models/dag/predict", json={"x": 2.0}, headers={"X-Request-Timeout": "0.2"})
        elapsed = time.perf_counter() - started
    assert ok.json() == {"total": 8.0}
    assert late.status_code == 504
    assert elapsed < 0.6  # the callee's wait ended with the caller's deadline
