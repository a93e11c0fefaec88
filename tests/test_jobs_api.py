"""Asynchronous jobs through the real server: submit, poll, list, stream, cancel, batch, V2 respond-async."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import orjson

from asyncserve import Model, Service, Settings, Tensor
from asyncserve.config import WebhookSettings
from tests.conftest import serving
from tests.models import Adder, Sleeper

Array = npt.NDArray[Any]


class Poison(Model):
    """Fails on every input: its jobs must end in the dead letter after their retries."""

    name = "poison"
    inputs = {"x": Tensor("INT64")}
    outputs = {"y": Tensor("INT64")}

    def predict(self, x: Array) -> Array:
        raise RuntimeError("this model always fails")


SLEEPER = Sleeper()
SERVICE = Service(Adder(), SLEEPER, Poison(), name="jobs")
SETTINGS = Settings(
    executor_workers=2, loop_lag_interval_s=0.01, jobs="memory://", job_concurrency=8,
    # Webhooks are signed with the server's secret (by default there is none, and so no webhooks).
    webhooks=WebhookSettings(secret="test-secret-0123456789abcdef"),
)  # fmt: skip


ROW = {"a": [1, 2, 3], "b": [1, 1, 1]}


async def wait_final(client: httpx.AsyncClient, url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = (await client.get(url)).json()
        if job["status"] in ("succeeded", "failed", "cancelled", "expired"):
            return job
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{url} did not finish")


async def test_submit_then_poll_the_result() -> None:
    async with serving(SERVICE, SETTINGS) as running, running.client() as client:
        accepted = await client.post("/v1/jobs", json={"model": "adder", "inputs": ROW})
        assert accepted.status_code == 202
        job = accepted.json()
        assert accepted.headers["location"] == job["links"]["self"] == f"/v1/jobs/{job['id']}"
        assert job["status"] in ("queued", "running", "succeeded")
        done = await wait_final(client, accepted.headers["location"])
    assert done["status"] == "succeeded"
    assert done["result"] == {"sum": [2.0, 3.0, 4.0], "total": 9.0}
    assert done["attempts"] == 1


async def test_an_idempotency_key_returns_the_same_job() -> None:
    async with serving(SERVICE, SETTINGS) as running, running.client() as client:
        headers = {"Idempotency-Key": "order-17"}
        first = await client.post("/v1/jobs", json={"model": "adder", "inputs": ROW}, headers=headers)
        again = await client.post("/v1/jobs", json={"model": "adder", "inputs": ROW}, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]


async def test_idempotency_keys_in_a_batch_return_the_same_jobs_when_it_is_sent_again() -> None:
    batch = [{"model": "adder", "inputs": ROW, "idempotency_key": f"run-1:{n}"} for n in range(3)]
    async with serving(SERVICE, SETTINGS) as running, running.client() as client:
        first = await client.post("/v1/jobs/batch", json=batch)
        # Sent again with one more job, and a key twice: the known keys give back their jobs.
        again = await client.post("/v1/jobs/batch", json=[*batch, {**batch[0], "idempotency_key": "run-1:3"}, batch[1]])
        single = await client.post(
            "/v1/jobs", json={"model": "adder", "inputs": ROW}, headers={"Idempotency-Key": "run-1:2"}
        )
        conflict = await client.post(
            "/v1/jobs", json={"model": "adder", "inputs": ROW, "idempotency_key": "a"}, headers={"Idempotency-Key": "b"}
        )
        not_text = await client.post("/v1/jobs/batch", json=[{"model": "adder", "inputs": ROW, "idempotency_key": 7}])
    ids = [job["id"] for job in first.json()["jobs"]]
    ids_again = [job["id"] for job in again.json()["jobs"]]
    assert (first.status_code, again.status_code, single.status_code) == (202, 202, 200)
    assert ids_again[:3] == ids
    assert ids_again[3] not in ids
    assert ids_again[4] == ids[1]
    assert single.json()["id"] == ids[2]
    assert conflict.status_code == 422
    assert conflict.json()["error"] == "idempotency_key: differs from the Idempotency-Key header; send one of them"
    assert not_text.status_code == 400
    assert "idempotency_key must be a printable string" in not_text.json()["error"]


async def test_bad_submissions_are_refused_at_once() -> None:
    async with serving(SERVICE, SETTINGS) as running, running.client() as client:
        unknown = await client.post("/v1/jobs", json={"model": "nope", "inputs": ROW})
        bad_inputs = await client.post("/v1/jobs", json={"model": "adder", "inputs": {"a": [1, 2]}})
        missing = await client.post("/v1/jobs", json={"inputs": ROW})
        ssrf = await client.post(
            "/v1/jobs", json={"model": "adder", "inputs": ROW, "webhook": "http://169.254.169.254/latest/meta-data"}
        )
    assert unknown.status_code == 404
    assert bad_inputs.status_code == 422
    assert "b: field required" in bad_inputs.json()["error"] or "a:" in bad_inputs.json()["error"]
    assert missing.status_code == 422
    assert ssrf.status_code == 400
    assert "169.254.169.254" in ssrf.json()["error"]


async def test_a_poison_job_ends_in_the_dead_letter_with_its_last_error() -> None:
    async with serving(SERVICE, SETTINGS) as running, running.client() as client:
        accepted = await client.post("/v1/jobs", json={"model": "poison", "inputs": {"x": 1}, "max_attempts": 2})
        done = await wait_final(client, accepted.headers["location"], timeout_s=20)
    assert done["status"] == "failed"
    assert done["dead_letter"] is True
    assert done["attempts"] == 2
    assert "failed while predicting" in done["error"]


async def test_batch_submission_as_json_lines() -> None:
    lines = b"\n".join(orjson.dumps({"model": "adder", "inputs": {"a": [i, 0, 0], "b": [0, 0, 0]}}) for i in range(50))
    async with serving(SERVICE, SETTINGS) as running, running.client() as client:
        accepted = await client.post("/v1/jobs/batch", content=lines, headers={"content-type": "application/x-ndjson"})
        ids = [job["id"] for job in accepted.json()["jobs"]]
        results = [await wait_final(client, f"/v1/jobs/{job_id}") for job_id in ids]
        listed = (await client.get("/v1/jobs", params={"model": "adder", "status": "succeeded", "limit": 20})).json()
        page_two = (await client.get("/v1/jobs", params={"cursor": listed["next_cursor"], "limit": 20})).json()
    assert accepted.status_code == 202
    assert [job["result"]["total"] for job in results] == [float(i) for i in range(50)]
    assert len(listed["jobs"]) == 20
    assert not {job["id"] for job in listed["jobs"]} & {job["id"] for job in page_two["jobs"]}


async def test_server_sent_events_follow_the_job_to_its_end() -> None:
    async with serving(SERVICE, SETTINGS) as running, running.client() as client:
        accepted = await client.post("/v1/jobs", json={"model": "sleeper", "inputs": {"seconds": 0.3}})
        statuses = []
        async with client.stream("GET", f"{accepted.headers['location']}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            async for line in stream.aiter_lines():
                if line.startswith("event: "):
                    statuses.append(line.removeprefix("event: "))
    assert statuses[-1] == "succeeded"
    assert "running" in statuses or statuses[0] == "queued"


async def test_cancel_a_running_job() -> None:
    async with serving(SERVICE, SETTINGS) as running, running.client() as client:
        SLEEPER.started.clear()
        accepted = await client.post("/v1/jobs", json={"model": "sleeper", "inputs": {"seconds": 1.0}})
        await asyncio.to_thread(SLEEPER.started.wait, 5)
        cancelled = await client.delete(accepted.headers["location"])
        await asyncio.sleep(1.2)
        final = (await client.get(accepted.headers["location"])).json()
        unknown = await client.delete("/v1/jobs/nope")
    assert cancelled.json()["status"] == "cancelled"
    assert final["status"] == "cancelled"
    assert final["result"] is None
    assert unknown.status_code == 404


async def test_v2_respond_async_makes_a_job_with_a_v2_result() -> None:
    body = {
        "inputs": [
            {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
            {"name": "b", "shape": [1, 3], "datatype": "FP32", "data": [1, 1, 1]},
        ]
    }
    async with serving(SERVICE, SETTINGS) as running, running.client() as client:
        accepted = await client.post("/v2/models/adder/infer", json=body, headers={"Prefer": "respond-async"})
        done = await wait_final(client, accepted.headers["location"])
    assert accepted.status_code == 202
    outputs = {o["name"]: o["data"] for o in done["result"]["outputs"]}
    assert outputs["total"] == [9.0]


def test_result_arrays_are_plain_json() -> None:
    assert orjson.loads(orjson.dumps(np.zeros(2).tolist())) == [0.0, 0.0]


async def test_an_idempotency_key_reused_for_other_inputs_is_a_conflict() -> None:
    key = {"Idempotency-Key": "k-1"}
    other = {"a": [9, 9, 9], "b": [1, 1, 1]}
    async with serving(SERVICE, SETTINGS) as running, running.client() as client:
        first = await client.post("/v1/jobs", json={"model": "adder", "inputs": ROW}, headers=key)
        again = await client.post("/v1/jobs", json={"model": "adder", "inputs": ROW}, headers=key)
        reused = await client.post("/v1/jobs", json={"model": "adder", "inputs": other}, headers=key)
        item = {"model": "adder", "inputs": other, "idempotency_key": "k-1"}
        batch = await client.post("/v1/jobs/batch", json=[item])
    assert (first.status_code, again.status_code, again.json()["id"]) == (202, 200, first.json()["id"])
    assert (reused.status_code, reused.json()["code"]) == (409, "idempotency_conflict")
    assert first.json()["id"] in reused.json()["error"]
    assert (batch.status_code, batch.json()["code"]) == (409, "idempotency_conflict")
    assert batch.json()["error"].startswith("job [0]: ")


async def test_a_job_with_more_rows_than_its_model_takes_is_refused_at_once() -> None:
    rows = [ROW] * (Adder.max_batch_size + 1)
    v2_body = {
        "inputs": [
            {"name": name, "shape": [len(rows), 3], "datatype": "FP32", "data": ROW[name] * len(rows)}
            for name in ("a", "b")
        ]
    }
    async with serving(SERVICE, SETTINGS) as running, running.client() as client:
        refused = await client.post("/v1/jobs", json={"model": "adder", "inputs": rows})
        in_batch = await client.post("/v1/jobs/batch", json=[{"model": "adder", "inputs": rows}])
        v2 = await client.post("/v2/models/adder/infer", json=v2_body, headers={"Prefer": "respond-async"})
        listed = (await client.get("/v1/jobs")).json()["jobs"]
    for answer in (refused, in_batch, v2):
        assert (answer.status_code, answer.json()["code"]) == (400, "invalid_request")
        assert f"takes at most {Adder.max_batch_size} per call" in answer.json()["error"]
    assert listed == []


async def test_job_options_and_v2_requests_are_read_as_documented() -> None:
    # 5.0 is an integer in JSON Schema; V2 parameters may be null, and a V2 priority may be its digits.
    v2_body = {
        "parameters": {"priority": "7"},
        "inputs": [
            {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3], "parameters": None},
            {"name": "b", "shape": [1, 3], "datatype": "FP32", "data": [1, 1, 1]},
        ],
    }
    async with serving(SERVICE, SETTINGS) as running, running.client() as client:
        job = await client.post(
            "/v1/jobs", json={"model": "adder", "inputs": ROW, "priority": 5.0, "max_attempts": 2.0}
        )
        digits = await client.post("/v2/models/adder/infer", json=v2_body, headers={"Prefer": "respond-async"})
        null = await client.post(
            "/v2/models/adder/infer", json={**v2_body, "parameters": None}, headers={"Prefer": "respond-async"}
        )
        half = await client.post("/v1/jobs", json={"model": "adder", "inputs": ROW, "priority": 5.5})
        keyed = {"Prefer": "respond-async", "Idempotency-Key": "v2-1"}
        first = await client.post("/v2/models/adder/infer", json=v2_body, headers=keyed)
        again = await client.post("/v2/models/adder/infer", json=v2_body, headers=keyed)
    assert (job.status_code, job.json()["priority"], job.json()["max_attempts"]) == (202, 5, 2)
    assert (digits.status_code, digits.json()["priority"]) == (202, 7)
    assert (null.status_code, null.json()["priority"]) == (202, 0)
    assert (half.status_code, half.json()["error"]) == (400, "priority must be an integer from 0 to 9, got 5.5")
    # The job a known key made is answered 202 again: a 200 from a V2 infer route is an inference response.
    assert (first.status_code, again.status_code, again.json()["id"]) == (202, 202, first.json()["id"])


async def test_the_served_openapi_document_describes_the_jobs_api() -> None:
    async with serving(SERVICE, SETTINGS) as running, running.client() as client:
        document = (await client.get("/openapi.json")).json()
    assert {"/v1/jobs", "/v1/jobs/batch", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events"} <= set(document["paths"])
    submission = document["components"]["schemas"]["JobSubmission"]["anyOf"]
    # One variant per model: none of this service's models streams, so each can run as a job.
    assert [variant["title"] for variant in submission] == ["adder", "sleeper", "poison"]
    assert "webhook" in submission[0]["properties"]  # this server has a webhook secret
    batch = document["paths"]["/v1/jobs/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert batch["maxItems"] == SETTINGS.max_batch_jobs


async def test_listing_refuses_empty_query_values_rather_than_ignore_them() -> None:
    async with serving(SERVICE, SETTINGS) as running, running.client() as client:
        await client.post("/v1/jobs", json={"model": "adder", "inputs": ROW})
        answers = {name: await client.get(f"/v1/jobs?{name}=") for name in ("status", "cursor", "limit")}
        no_model = await client.get("/v1/jobs?model=")
    for name, answer in answers.items():
        assert (answer.status_code, answer.json()["code"]) == (400, "invalid_request"), name
        assert answer.json()["error"].startswith(f"{name} must be"), name
    assert (no_model.status_code, no_model.json()["jobs"]) == (200, [])  # no job has the model ""
