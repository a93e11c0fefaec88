"""Jobs end to end: submit 10,000 small jobs with ``POST /v1/jobs/batch``, wait for all, on SQLite and on Redis.

    python -m benchmarks.jobs            # 10,000 jobs per broker
    python -m benchmarks.jobs --quick    # 1,000 jobs, a smoke run

For each broker, a fresh store (a SQLite file in a temporary directory, or a Redis key prefix of its
own, deleted afterwards) and a fresh ``asyncserve serve benchmarks.trivial:service`` pinned to CPU 0
(``taskset``), its in-process job worker running the jobs (the default: one worker, 64 jobs at a
time). The client, this process, is pinned to CPU 1. It first runs a warm-up round, then, on the
clock: submits every job in chunks of ``--batch-size`` (``--concurrency`` requests in flight), waits
until nothing is queued or running (polling ``GET /v1/jobs?status=...&limit=1`` every 0.2 s), and
reads every job back (``GET /v1/jobs?model=echo``, 1,000 a page).

Reported: jobs per second end to end (jobs / (the last ``finished_at`` - the first submission)),
how long submitting took, and the time to completion of each job (``finished_at - created_at``,
both stamped by the broker) at p50, p99 and max; the server's CPU seconds, and Redis's (it is not
pinned: it runs wherever the kernel puts it), and the share of the server's CPU that other processes
took meanwhile; a run where they took more than ``--max-others`` is run again, at most ``--reruns``
times. Results go to ``results/jobs.{json,md}``. Loopback only; every wait is bounded (readiness,
``--timeout-s`` per run, shutdown).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from benchmarks import report
from benchmarks.harness import (
    HOST,
    BenchmarkError,
    ServerSpec,
    check_cpus,
    process_cpu_s,
    require_tool,
    running_server,
    wait_for_quiet,
)

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("ASYNCSERVE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
MODEL = "echo"
ROW = {"x": [1.0, 2.0, 3.0, 4.0]}


@dataclass(frozen=True)
class Run:
    """One broker's measurement."""

    broker: str
    jobs: int
    submit_s: float
    total_s: float
    jobs_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    max_attempts: int
    server_cpu_s: float
    redis_cpu_s: float | None
    busy_share_before: float
    others_on_server_cpu: float
    """The share of the server's CPU that other processes (Redis among them, if it ran there) used meanwhile."""
    reruns: int = 0
    """Runs thrown away before this one because other processes took more than --max-others of the server's CPU."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jobs", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 jobs per broker (unless --jobs says otherwise)")
    parser.add_argument("--jobs", type=int, help="jobs per broker (default 10,000; quick 1,000)")
    parser.add_argument("--brokers", nargs="+", choices=["sqlite", "redis"], default=["sqlite", "redis"])
    parser.add_argument("--batch-size", type=int, default=500, help="jobs per POST /v1/jobs/batch (default 500)")
    parser.add_argument("--concurrency", type=int, default=4, help="batch requests in flight (default 4)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="longest wait for one broker's jobs")
    parser.add_argument("--quiet-wait-s", type=float, default=30.0, help="wait up to S s for idle CPUs first")
    parser.add_argument("--max-others", type=float, default=0.2, help="re-run if others took more of the server CPU")
    parser.add_argument("--reruns", type=int, default=3, help="most re-runs per broker (default 3)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--ready-timeout-s", type=float, default=60.0)
    parser.add_argument("--output-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.jobs = args.jobs or (1_000 if args.quick else 10_000)
    return args


# --- the client (this process) --------------------------------------------------------------------


async def drive(port: int, jobs: int, args: argparse.Namespace) -> tuple[float, float, list[dict[str, Any]]]:
    """Submit ``jobs`` jobs, wait for all, read them back: (t0, submit seconds, the jobs)."""
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=60.0, limits=limits) as client:
        chunks = [_chunk(min(args.batch_size, jobs - start)) for start in range(0, jobs, args.batch_size)]
        async with asyncio.timeout(args.timeout_s):
            started = time.time()
            ids = await submit(client, chunks, args.concurrency)
            submit_s = time.time() - started
            await wait_idle(client)
            found = await read_back(client, set(ids))
    if len(found) != jobs:
        raise BenchmarkError(f"submitted {jobs} jobs but read back {len(found)}")
    return started, submit_s, found


def _chunk(size: int) -> bytes:
    return orjson.dumps([{"model": MODEL, "inputs": ROW}] * size)


async def submit(client: httpx.AsyncClient, chunks: Sequence[bytes], concurrency: int) -> list[str]:
    slots = asyncio.Semaphore(concurrency)

    async def post(body: bytes) -> list[str]:
        async with slots:
            response = await client.post("/v1/jobs/batch", content=body, headers={"content-type": "application/json"})
        if response.status_code != 202:
            raise BenchmarkError(f"POST /v1/jobs/batch answered {response.status_code}: {response.text[:300]}")
        return [job["id"] for job in response.json()["jobs"]]

    answers = await asyncio.gather(*(post(body) for body in chunks))
    return [job_id for ids in answers for job_id in ids]


async def wait_idle(client: httpx.AsyncClient, every_s: float = 0.2) -> None:
    """Until no job is queued or running (two cheap listings per poll)."""
    while True:
        pages = [await client.get("/v1/jobs", params={"status": s, "limit": 1}) for s in ("queued", "running")]
        if not any(page.json()["jobs"] for page in pages):
            return
        await asyncio.sleep(every_s)


async def read_back(client: httpx.AsyncClient, ids: set[str]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {"model": MODEL, "limit": "1000", **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/jobs", params=params)).json()
        found += [job for job in page["jobs"] if job["id"] in ids]
        cursor = page["next_cursor"]
        if cursor is None or len(found) == len(ids):
            return found


# --- one broker -----------------------------------------------------------------------------------


@contextlib.contextmanager
def broker_url(broker: str, directory: Path) -> Iterator[str]:
    if broker == "sqlite":
        yield f"sqlite://{directory / 'jobs.db'}"
        return
    prefix = f"bench-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise BenchmarkError(f"Redis does not answer at {REDIS_URL}: {exc}") from None
    try:
        yield f"{REDIS_URL}?prefix={prefix}"
    finally:
        for keys in _batched(client.scan_iter(match=f"{prefix}:*", count=5000), 5000):
            client.delete(*keys)
        client.close()


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def redis_info(section: str) -> dict[str, Any]:
    with redis.Redis.from_url(REDIS_URL) as client:
        info: dict[str, Any] = client.info(section)
        return info


def redis_cpu_s() -> float:
    info = redis_info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def measure(broker: str, args: argparse.Namespace) -> Run:
    with tempfile.TemporaryDirectory(prefix="asyncserve-jobs-bench-") as tmp, broker_url(broker, Path(tmp)) as url:
        serve = ("serve", "benchmarks.trivial:service", "--host", HOST, "--port", "{port}", "--log-level", "warning")
        spec = ServerSpec(
            f"jobs-{broker}", ("env", f"ASYNCSERVE_JOBS={url}", sys.executable, "-m", "asyncserve", *serve)
        )
        with running_server(spec, args.server_cpu, Path(tmp), args.ready_timeout_s) as server:
            asyncio.run(drive(server.port, max(100, args.jobs // 10), args))  # warm-up, off the clock
            busy = wait_for_quiet(args.quiet_wait_s)
            cpu_before, redis_before = process_cpu_s(server.pid), redis_cpu_s()
            core_before, clock = core_busy_s(args.server_cpu), time.monotonic()
            started, submit_s, jobs = asyncio.run(drive(server.port, args.jobs, args))
            server_cpu = process_cpu_s(server.pid) - cpu_before
            others = (core_busy_s(args.server_cpu) - core_before - server_cpu) / (time.monotonic() - clock)
            redis_cpu = redis_cpu_s() - redis_before if broker == "redis" else None
    return summarise(broker, started, submit_s, jobs, server_cpu, redis_cpu, (busy, max(0.0, others)))


def measure_quietly(broker: str, args: argparse.Namespace) -> Run:
    """``measure``, again (up to ``--reruns`` times) while other processes took too much of the server's CPU."""
    for rerun in range(args.reruns + 1):
        run = dataclasses.replace(measure(broker, args), reruns=rerun)
        print(json.dumps(asdict(run)), flush=True)
        if run.others_on_server_cpu <= args.max_others:
            break
    return run


def core_busy_s(cpu: int) -> float:
    """Seconds CPU ``cpu`` has been busy (user, nice, system, irq, softirq, steal), from ``/proc/stat``."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    raise BenchmarkError(f"/proc/stat has no line for CPU {cpu}")


def summarise(broker: str, started: float, submit_s: float, jobs: list[dict[str, Any]], server_cpu_s: float,
              redis_cpu: float | None, load: tuple[float, float]) -> Run:  # fmt: skip
    failed = [job for job in jobs if job["status"] != "succeeded"]
    if failed:
        raise BenchmarkError(f"{len(failed)} jobs did not succeed, like {failed[0]['id']}: {failed[0]['error']}")
    latencies = sorted(job["finished_at"] - job["created_at"] for job in jobs)
    total_s = max(job["finished_at"] for job in jobs) - started
    return Run(
        broker=broker, jobs=len(jobs), submit_s=round(submit_s, 3), total_s=round(total_s, 3),
        jobs_per_s=round(len(jobs) / total_s, 1), p50_ms=_ms(_quantile(latencies, 0.50)),
        p99_ms=_ms(_quantile(latencies, 0.99)), max_ms=_ms(latencies[-1]),
        max_attempts=max(job["attempts"] for job in jobs), server_cpu_s=round(server_cpu_s, 2),
        redis_cpu_s=None if redis_cpu is None else round(redis_cpu, 2), busy_share_before=load[0],
        others_on_server_cpu=round(load[1], 2),
    )  # fmt: skip


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# --- reporting ------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    info = redis_info("server")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "python": platform.python_version(),
        "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "redis_version": info.get("redis_version"),
    }  # fmt: skip


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def markdown(runs: Sequence[Run], meta: dict[str, Any]) -> str:
    lines = [
        "# Jobs end to end",
        "",
        f"`python -m benchmarks.jobs{' --quick' if meta['args']['quick'] else ''}` on {meta['date']}: "
        f"{meta['cpus']} CPUs ({meta['cpu_model']}), Python {meta['python']}, Redis {meta['redis_version']}. "
        f"Server (one process, its in-process job worker) on CPU {meta['args']['server_cpu']}, client on CPU "
        f"{meta['args']['client_cpu']}; {meta['args']['batch_size']} jobs per `POST /v1/jobs/batch`, "
        f"{meta['args']['concurrency']} in flight; model `echo` (`y = 2x`, 4 floats).",
        "",
        "| broker | jobs | submitting (s) | all done (s) | jobs/s end to end | p50 to completion (ms) "
        "| p99 (ms) | max (ms) | server CPU (s) | Redis CPU (s) | others on the server's CPU | re-runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        redis_cpu = "" if run.redis_cpu_s is None else f"{run.redis_cpu_s:.2f}"
        lines.append(f"| {run.broker} | {run.jobs:,} | {run.submit_s:.2f} | {run.total_s:.2f} | {run.jobs_per_s:,.0f} "
                     f"| {run.p50_ms:,.0f} | {run.p99_ms:,.0f} | {run.max_ms:,.0f} | {run.server_cpu_s:.2f} "
                     f"| {redis_cpu} | {run.others_on_server_cpu:.0%} | {run.reruns} |")  # fmt: skip
    lines += [
        "",
        "Time to completion is `finished_at - created_at` of each job, both stamped by the broker: with every job "
        "submitted at once, it is mostly the wait in the queue, so p50 is about half the run and p99 about all of "
        "it. The throughput (jobs/s) is the figure to compare. Others on the server's CPU: that CPU's busy time "
        "minus the server's over the run (Redis counts there when the kernel ran it there); a run above "
        f"{meta['args']['max_others']:.0%} was run again (re-runs).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        require_tool("taskset")
        check_cpus(args.server_cpu, args.client_cpu)
        os.sched_setaffinity(0, {args.client_cpu})
        runs = [measure_quietly(broker, args) for broker in args.brokers]
    except BenchmarkError as exc:
        print(f"benchmarks.jobs: {exc}", file=sys.stderr)
        return 1
    meta = {**environment(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    document = json.dumps({"meta": meta, "runs": [asdict(r) for r in runs]}, indent=2)
    (args.output_dir / "jobs.json").write_text(report.relative_paths(document))
    (args.output_dir / "jobs.md").write_text(report.relative_paths(markdown(runs, meta)))
    print(report.relative_paths(markdown(runs, meta)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
