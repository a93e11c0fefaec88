"""Kill -9 a process that is enqueueing jobs, then find every job it reported as enqueued."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from asyncserve.jobs import JobStatus
from tests.jobs.conftest import MakeBroker

REPO = Path(__file__).resolve().parents[2]

# Enqueues forever, one job at a time and in batches of three, printing each id once enqueue returned.
CHILD = """
import asyncio, sys
from asyncserve.jobs import JobRequest, open_broker

async def main():
    async with open_broker(sys.argv[1]) as broker:
        for i in range(1_000_000):
            job, _ = await broker.enqueue(JobRequest(model="churn", inputs={"i": i}, idempotency_key=f"k{i}"))
            print(job.id, flush=True)
            batch = [JobRequest(model="churn", inputs={"i": i, "j": j}) for j in range(3)]
            for job in await broker.enqueue_many(batch):
                print(job.id, flush=True)

asyncio.run(main())
"""


async def enqueued_by_a_killed_process(url: str, count: int) -> list[str]:
    """The ids of the first ``count`` jobs a child process reported enqueued before its SIGKILL."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, url, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None
    ids: list[str] = []
    try:
        async with asyncio.timeout(20):
            while len(ids) < count:
                line = await child.stdout.readline()
                assert line, f"the child exited ({await child.wait()}) after {len(ids)} jobs"
                ids.append(line.decode().strip())
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGKILL)  # mid-run: it is enqueueing the next jobs right now
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    return ids


async def check_every_reported_job_survives(make_broker: MakeBroker, url: str) -> None:
    ids = await enqueued_by_a_killed_process(url, count=40)

    broker = await make_broker()
    jobs = [await broker.get(job_id) for job_id in ids]

    assert all(job is not None and job.status is JobStatus.QUEUED for job in jobs), ids
    stats = await broker.stats()
    assert stats["queued"] >= len(ids)
    claimed = await broker.claim("survivor", limit=1000, lease_s=30)
    assert {lease.job_id for lease in claimed} >= set(ids)
