"""The jobs' promises through real processes: kill -9, standalone workers on Redis, TTL, retries, webhooks.

Every process is the real CLI (``python -m asyncserve``). The broker is a SQLite file in tmp_path or
the real Redis under a key prefix of the test's own (deleted afterwards). Leases last one second
(``ASYNCSERVE_JOB_LEASE_S=1``) so that a dead process's jobs come back quickly.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from asyncserve.jobs import Broker, open_broker
from asyncserve.jobs.webhooks import verify
from tests.conftest import serving_asgi
from tests.processes import SERVICE, Running, eventually, launch, wait_final

pytestmark = pytest.mark.e2e

JOBS = 24
SECRET = "e2e-webhook-secret-0123456789abcdef"


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each durable broker in turn: a SQLite file of the test's own, or Redis under a prefix of its own."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'jobs.db'}"  # tmp_path is absolute: sqlite:///...
    else:
        yield from _redis_prefix(request.getfixturevalue("redis_url"))


@pytest.fixture
def redis_broker_url(redis_url: str) -> Iterator[str]:
    yield from _redis_prefix(redis_url)


def _redis_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"test-{uuid.uuid4().hex}"
    yield f"{redis_url}?prefix={prefix}"
    client = redis.Redis.from_url(redis_url)
    try:
        stale = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if stale:
            client.delete(*stale)
    finally:
        client.close()


def server_env(broker_url: str, **extra: str) -> dict[str, str]:
    return {"ASYNCSERVE_JOBS": broker_url, "ASYNCSERVE_JOB_LEASE_S": "1", "ASYNCSERVE_JOB_CONCURRENCY": "4", **extra}


# --- kill -9 ------------------------------------------------------------------------------------


async def submit_all(url: str, keys: list[str], ids: dict[str, str], parallel: int = 4) -> dict[str, int]:
    """POST one job per key (``Idempotency-Key``), ``parallel`` at a time; record each job id the server
    acknowledged, and check a key always names the same job. Stops at the first transport error (the
    server died); returns the status code of each acknowledged submission."""
    statuses: dict[str, int] = {}
    pending = iter(enumerate(keys))

    async def submitter(client: httpx.AsyncClient) -> None:
        for n, key in pending:
            body = {"model": "pid", "inputs": {"n": n, "seconds": 0.3}, "max_attempts": 5}
            try:
                response = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError:
                return
            assert response.status_code in (200, 202), response.text
            assert ids.setdefault(key, response.json()["id"]) == response.json()["id"], key
            statuses[key] = response.status_code

    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        await asyncio.gather(*(submitter(client) for _ in range(parallel)))
    return statuses


async def count(url: str, status: str) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        listed = await client.get("/v1/jobs", params={"model": "pid", "status": status, "limit": 1000})
    return len(listed.json()["jobs"])


async def test_jobs_survive_kill_9_and_complete_exactly_once(broker_url: str, tmp_path: Path) -> None:
    env, keys, ids = server_env(broker_url), [f"job-{n}" for n in range(JOBS)], dict[str, str]()
    # 1. Killed while the client submits (some requests in flight) and the first jobs run.
    async with launch("serve", SERVICE, env=env, log_dir=tmp_path) as first:
        assert first.url is not None
        submitting = asyncio.create_task(submit_all(first.url, keys, ids))
        await eventually(lambda: _true(len(ids) >= JOBS // 3), "a third of the jobs to be acknowledged")
        first.kill()
        await submitting
    assert JOBS // 3 <= len(ids) < JOBS
    # 2. The client submits everything again; killed once some jobs are done and others run.
    async with launch("serve", SERVICE, env=env, log_dir=tmp_path) as second:
        url = second.url or ""
        again = await submit_all(url, keys, ids)
        await eventually(lambda: _done_and_running(url), "some jobs done and others running")
        second.kill()
    assert set(again) == set(keys)
    # 3. Once more, then wait: every key still names one job, and each succeeds once.
    async with launch("serve", SERVICE, env=env, log_dir=tmp_path) as third:
        url = third.url or ""
        last = await submit_all(url, keys, ids)
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            jobs = [await wait_final(client, ids[key]) for key in keys]
            listed = (await client.get("/v1/jobs", params={"model": "pid", "limit": 1000})).json()["jobs"]
    assert last == dict.fromkeys(keys, 200), "every key is known: nothing is created twice"
    assert sorted(job["id"] for job in listed) == sorted(ids.values()), "one job per idempotency key"
    assert [job["status"] for job in jobs] == ["succeeded"] * JOBS, [job["error"] for job in jobs]
    assert [job["result"]["n"] for job in jobs] == list(range(JOBS))
    assert all(job["updated_at"] == job["finished_at"] for job in jobs), "nothing changed a job once finished"
    assert any(job["attempts"] > 1 for job in jobs), "a job running when its server died ran again"


async def _true(value: bool) -> bool:
    return value


async def _done_and_running(url: str) -> bool:
    return await count(url, "succeeded") >= JOBS // 2 and await count(url, "running") > 0


# --- standalone workers on Redis ------------------------------------------------------------------


async def test_two_workers_share_the_work_and_one_takes_over_from_a_killed_one(
    redis_broker_url: str, tmp_path: Path
) -> None:
    env = server_env(redis_broker_url)
    worker = ("worker", SERVICE, "--broker", redis_broker_url, "--concurrency", "2")
    async with (
        launch("serve", SERVICE, env={**env, "ASYNCSERVE_JOB_WORKERS": "0"}, log_dir=tmp_path) as api,
        launch(*worker, env=env, log_dir=tmp_path, http=False) as doomed,
        launch(*worker, env=env, log_dir=tmp_path, http=False) as survivor,
        httpx.AsyncClient(base_url=api.url or "", timeout=5) as client,
        open_broker(redis_broker_url) as broker,
    ):
        batch = [{"model": "pid", "inputs": {"n": n, "seconds": 0.3}} for n in range(JOBS)]
        ids = [job["id"] for job in (await client.post("/v1/jobs/batch", json=batch)).json()["jobs"]]
        await eventually(
            lambda: _did_one_and_holds_one(broker, doomed), "the first worker to finish a job and hold one"
        )
        doomed.kill()
        jobs = [await wait_final(client, job_id) for job_id in ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * JOBS
    assert [job["result"]["n"] for job in jobs] == list(range(JOBS))
    assert {job["result"]["pid"] for job in jobs} == {doomed.pid, survivor.pid}, "both workers ran jobs; the API none"
    taken_over = [job for job in jobs if job["attempts"] > 1]
    assert taken_over, "the jobs the killed worker held ran again"
    assert {job["result"]["pid"] for job in taken_over} == {survivor.pid}


async def _did_one_and_holds_one(broker: Broker, worker: Running) -> bool:
    done, _ = await broker.list(status="succeeded", limit=1000)
    running, _ = await broker.list(status="running", limit=1000)
    finished_one = any(job.result["pid"] == worker.pid for job in done)
    return finished_one and any(f"-{worker.pid}-" in (job.lease_owner or "") for job in running)


# --- retries, TTL, webhooks -----------------------------------------------------------------------


async def test_a_failed_attempt_is_retried_and_the_job_succeeds(broker_url: str, tmp_path: Path) -> None:
    async with (
        launch("serve", SERVICE, env=server_env(broker_url), log_dir=tmp_path) as server,
        httpx.AsyncClient(base_url=server.url or "", timeout=5) as client,
    ):
        markers = [str(tmp_path / f"marker-{n}") for n in range(3)]
        batch = [{"model": "fails_first", "inputs": {"marker": marker}} for marker in markers]
        ids = [job["id"] for job in (await client.post("/v1/jobs/batch", json=batch)).json()["jobs"]]
        jobs = [await wait_final(client, job_id) for job_id in ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * 3
    assert [job["attempts"] for job in jobs] == [2] * 3
    assert [job["result"] for job in jobs] == [{"calls": 2}] * 3, "the second call succeeded, and no third ran"


async def test_a_result_expires_after_its_ttl(broker_url: str, tmp_path: Path) -> None:
    async with (
        launch("serve", SERVICE, env=server_env(broker_url), log_dir=tmp_path) as server,
        httpx.AsyncClient(base_url=server.url or "", timeout=5) as client,
    ):
        body = {"model": "pid", "inputs": {"n": 1, "seconds": 0}, "ttl_s": 0.5}
        job_id = (await client.post("/v1/jobs", json=body)).json()["id"]
        assert (await wait_final(client, job_id))["status"] == "succeeded"
        # The workers expire results every 5 s: the tombstone (no result) stays readable a day.
        expired = await wait_final_status(client, job_id, "expired", timeout_s=8)
    assert expired["result"] is None
    assert expired["inputs"] is None


async def wait_final_status(client: httpx.AsyncClient, job_id: str, status: str, timeout_s: float) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal found
        found = (await client.get(f"/v1/jobs/{job_id}")).json()
        return bool(found.get("status") == status)

    await eventually(reached, f"job {job_id} to be {status}", timeout_s)
    return found


class Receiver:
    """An ASGI webhook receiver that answers 503 to the first delivery and 200 to the rest."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        self.received.append(({k.decode(): v.decode() for k, v in scope["headers"]}, body))
        status = 503 if len(self.received) == 1 else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def test_a_webhook_is_signed_retried_and_recorded(broker_url: str, tmp_path: Path) -> None:
    receiver = Receiver()
    env = server_env(broker_url, ASYNCSERVE_WEBHOOK_SECRET=SECRET, ASYNCSERVE_WEBHOOK_ALLOWED_HOSTS="127.0.0.1")
    async with (
        serving_asgi(receiver) as hooks,
        launch("serve", SERVICE, env=env, log_dir=tmp_path) as server,
        httpx.AsyncClient(base_url=server.url or "", timeout=5) as client,
    ):
        body = {"model": "pid", "inputs": {"n": 7, "seconds": 0}, "webhook": f"{hooks}/jobs/done"}
        job_id = (await client.post("/v1/jobs", json=body)).json()["id"]
        job = await wait_final(client, job_id)
        await eventually(lambda: _true(len(receiver.received) == 2), "the webhook and its retry")
        await eventually(lambda: _attempts_recorded(client, job_id, 2), "both attempts recorded on the job")
        recorded = (await client.get(f"/v1/jobs/{job_id}")).json()
    (first_headers, _), (headers, delivered) = receiver.received
    assert all(verify(SECRET, h, b) for h, b in receiver.received)
    assert not verify(SECRET, headers, delivered + b" ")
    assert not verify("another-secret-0123456789abcdef", headers, delivered)
    assert (first_headers["x-asyncserve-attempt"], headers["x-asyncserve-attempt"]) == ("1", "2")
    assert first_headers["x-asyncserve-delivery"] == headers["x-asyncserve-delivery"]
    payload = orjson.loads(delivered)
    assert (payload["id"], payload["status"], payload["result"]["n"]) == (job_id, "succeeded", 7)
    assert [a["status_code"] for a in recorded["webhook_attempts"]] == [503, 200]
    assert (recorded["status"], recorded["result"]) == (job["status"], job["result"]), "the webhook changed nothing"


async def _attempts_recorded(client: httpx.AsyncClient, job_id: str, attempts: int) -> bool:
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    return len(job["webhook_attempts"]) >= attempts
