"""Benchmark C, the I/O workload: features from a 50 ms HTTP service (or Postgres), a small model, a logged prediction.

Every request ``POST /v1/models/score/predict {"user_id": N}`` (N uniform in 0..9999, so nothing is
cached) makes the server fetch the user's row, score it with a small logistic regression and log
the prediction. With 256 connections and a 50 ms feature service the ideal is 256 / 0.05 s = 5,120
requests per second; on one core the CPU each fetch costs sets the real limit. In one run:

1. the feature service (``benchmarks.io_feature_service``, uvicorn pinned to the load core beside
   wrk) is measured alone first, wrk on the idle server core, to show it is not the bottleneck;
2. the servers, all pinned to the server core, one process each, ``OMP_NUM_THREADS=1``, are loaded
   in interleaved rounds (order rotating): the bare-ASGI ceiling with httpx and with aiohttp, the
   synchronous FastAPI service, and asyncserve's ``benchmarks.io_models`` services (per-key GETs,
   the batch endpoint, Postgres);
3. around every run: the server's and the feature service's CPU time, the feature service's call
   counts, wrk's own count of non-200 answers, asyncserve's ``/metrics`` (round trips, keys per
   round trip, requests by status, prediction-log records), and how much of each core other
   processes took (a disturbed run is run again);
4. with ``--profile LABEL``, one extra loaded run of that server under py-spy, summarized.

Results go to ``benchmarks/results/io.{json,md}``; ``benchmarks/IO.md`` explains them.

Usage::

    .venv/bin/pip install -r benchmarks/requirements-io.txt
    .venv/bin/python -m benchmarks.io                 # ~10 min: 10 s runs, 3 rounds, c = 256
    .venv/bin/python -m benchmarks.io --quick         # ~3 min: 2 s runs, 1 round
    .venv/bin/python -m benchmarks.io --servers bare-aiohttp as-per-key --profile as-per-key
    .venv/bin/python -m benchmarks.io --servers bare-httpx bare-aiohttp as-per-key --no-postgres \
        --checkout new=. old=../asyncserve-old --name io-ab   # asyncserve's servers once per checkout
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from benchmarks import checkouts, harness, measure, report, scrape, wrk
from benchmarks.checkouts import Checkout
from benchmarks.harness import HOST, REPO, BenchmarkError, Endpoint, Server, ServerSpec
from benchmarks.io_apps import PREDICT_PATH, score_row
from benchmarks.io_feature_service import DELAY_S, USERS, user_row
from benchmarks.measure import Scenario
from benchmarks.wrk import WrkResult

CONCURRENCIES = (256,)
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""One BLAS thread: every server gets one core."""
SOURCE = "users"
ROUTE = "v1_predict"
PY_SPY_CANDIDATES = ("py-spy", "/tmp/pyspy/bin/py-spy")
_MARKER = "IO_WRK "

Kind = Literal["bare", "fastapi", "asyncserve"]


@dataclass(frozen=True)
class Variant:
    """One server under test: a label, how it is run, and what it stands for."""

    label: str
    kind: Kind
    target: str
    description: str
    postgres: bool = False
    checkout: Checkout | None = None
    """The checkout whose asyncserve runs it (None: the installed one)."""

    @property
    def base(self) -> str:
        """The label without its checkout: ``as-per-key`` for ``as-per-key@old``."""
        return self.label.partition("@")[0]

    def from_checkout(self, checkout: Checkout) -> Variant:
        return dataclasses.replace(self, label=f"{self.label}@{checkout.label}", checkout=checkout)


VARIANTS = (
    Variant("bare-httpx", "bare", "benchmarks.io_apps:bare_httpx", "bare ASGI + pooled httpx.AsyncClient"),
    Variant("bare-aiohttp", "bare", "benchmarks.io_apps:bare_aiohttp", "bare ASGI + pooled aiohttp.ClientSession"),
    Variant("fastapi-sync", "fastapi", "benchmarks.io_apps:fastapi_app", "FastAPI `def`, blocking requests"),
    Variant("as-per-key", "asyncserve", "benchmarks.io_models:per_key", "asyncserve HttpSource, GET per key"),
    Variant("as-batched", "asyncserve", "benchmarks.io_models:batched", "asyncserve HttpSource + batch_url"),
    Variant("as-postgres", "asyncserve", "benchmarks.io_models:postgres", "asyncserve PostgresSource", postgres=True),
)  # fmt: skip
BY_LABEL = {variant.label: variant for variant in VARIANTS}
CEILING_CANDIDATES = ("bare-httpx", "bare-aiohttp")
FASTAPI = "fastapi-sync"
PER_KEY = "as-per-key"
BATCHED = ("as-batched",)
POSTGRES = "as-postgres"


@dataclass(frozen=True)
class IoSettings:
    """The shared settings plus what only this benchmark has."""

    base: measure.Settings
    variants: tuple[Variant, ...]
    feature_workers: int
    pg_dsn: str
    profile: tuple[str, ...]
    py_spy: str | None
    disturbed_share: float = 0.1
    """A run in which other processes took more than this share of the server or the load core is disturbed."""
    retries: int = 2
    """Times a disturbed run is run again (the last attempt counts, disturbed or not)."""


@dataclass
class Run:
    """One wrk run of one server, with everything measured around it."""

    result: WrkResult
    non200: int
    first_bad_status: int
    feature_cpu_s: float
    feature_calls: dict[str, int] | None
    metrics: dict[str, Any] | None
    neighbour_server_share: float = 0.0
    """The share of the server core other processes used during the run (busy time minus the server's)."""
    neighbour_load_share: float = 0.0
    """The share of the load core other processes used (busy time minus wrk's and the feature service's)."""
    attempt: int = 1

    def disturbed(self, threshold: float) -> bool:
        return max(self.neighbour_server_share, self.neighbour_load_share) > threshold

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.result.as_dict(),
            "neighbour_server_share": self.neighbour_server_share,
            "neighbour_load_share": self.neighbour_load_share,
            "attempt": self.attempt,
            "non200": self.non200,
            "first_bad_status": self.first_bad_status or None,
            "feature_cpu_s": self.feature_cpu_s,
            "feature_calls": self.feature_calls,
            "asyncserve_metrics": self.metrics,
        }


@dataclass
class Measured:
    runs: dict[str, list[Run]] = field(default_factory=dict)
    discarded: dict[str, list[Run]] = field(default_factory=dict)
    """Disturbed runs that were run again."""
    rounds: list[list[str]] = field(default_factory=list)
    """The server order of each round."""
    calibration: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)
    logged_lines: dict[str, int] = field(default_factory=dict)
    requests_sent: Counter[str] = field(default_factory=Counter)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    postgres: dict[str, Any] = field(default_factory=dict)


# The load: wrk with a Lua script that picks a random user per request and counts non-200 answers

_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  math.randomseed(SEED)
  non200 = 0
  first_bad = 0
end
function request()
  return wrk.format(METHOD, PATH_EXPR, nil, BODY_EXPR)
end
function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
    if first_bad == 0 then first_bad = status end
  end
end
done = function(summary, latency, requests)
  local bad, first = 0, 0
  for _, t in ipairs(threads) do
    bad = bad + t:get("non200")
    if first == 0 then first = t:get("first_bad") end
  end
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"socket_errors":%d,"status_errors":%d,"timeouts":%d,'
      .. '"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"max_us":%.1f,"mean_us":%.1f,"non200":%d,"first_bad":%d}\\n',
    "MARKER", summary.requests, summary.duration, e.connect + e.read + e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean, bad, first))
end
"""


def write_lua(path: Path, *, predict: bool, seed: int = 20_240) -> Path:
    """The script for ``POST /v1/models/score/predict`` (``predict``) or ``GET /users/N`` on the feature service."""
    user = f"math.random(0, {USERS - 1})"
    if predict:
        method, path_expr, body_expr = "nil", "nil", f"""'{{"user_id":' .. {user} .. '}}'"""
    else:
        method, path_expr, body_expr = '"GET"', f'"/users/" .. {user}', "nil"
    script = (
        _LUA.replace("SEED", str(seed))
        .replace("METHOD", method)
        .replace("PATH_EXPR", path_expr)
        .replace("BODY_EXPR", body_expr)
        .replace("MARKER", _MARKER)
    )
    if not predict:
        script = script.replace('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n', "")
    path.write_text(script)
    return path


def run_wrk(
    port: int, path: str, script: Path, concurrency: int, duration_s: int, cpu: int
) -> tuple[WrkResult, int, int]:
    """wrk as ``benchmarks.wrk`` runs it, with this benchmark's script: (result, non-200 answers, first bad status)."""
    stdout, load_cpu_s = wrk.run_command(port, path, script, concurrency, duration_s, cpu)
    raw = _summary_line(stdout)
    result = dataclasses.replace(wrk.result_from_summary(raw), load_cpu_s=load_cpu_s)
    return result, int(raw["non200"]), int(raw["first_bad"])


def _summary_line(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith(_MARKER):
            raw: dict[str, Any] = json.loads(line[len(_MARKER) :])
            return raw
    raise BenchmarkError(f"wrk printed no summary line; its output was:\n{stdout[:1000]}")


# The servers


def _env_prefix(env: dict[str, str]) -> tuple[str, ...]:
    return ("env", *(f"{key}={value}" for key, value in env.items()))


def _uvicorn(app: str, workers: int = 1, factory: bool = False) -> tuple[str, ...]:
    command = list(harness.uvicorn_command(app))
    command[command.index("--workers") + 1] = str(workers)
    return (*command, "--factory") if factory else tuple(command)


def _asyncserve(variant: Variant) -> tuple[str, ...]:
    launcher = variant.checkout.launcher if variant.checkout is not None else ()
    return harness.asyncserve_command(variant.target, "--executor-workers", "1", launcher=launcher)


def http_source_client() -> str:
    """The HTTP client asyncserve's HttpSource is built on (it moved from httpx to aiohttp), read from its source."""
    import inspect

    from asyncserve.features import http

    text = inspect.getsource(http)
    return "aiohttp" if "import aiohttp" in text else "httpx" if "import httpx" in text else "?"


def prediction_log_supported() -> bool:
    """Whether this asyncserve reads ``ASYNCSERVE_PREDICTION_LOG`` (the setting ``prediction_log``)."""
    from asyncserve.config import Settings

    return "prediction_log" in {f.name for f in dataclasses.fields(Settings)}


def server_spec(variant: Variant, feature_url: str, workdir: Path, pg: dict[str, Any]) -> ServerSpec:
    log_path = workdir / f"{variant.label}.jsonl"
    env = {**THREAD_ENV, "IO_FEATURE_URL": feature_url}
    if variant.kind == "asyncserve":
        if prediction_log_supported():
            env["ASYNCSERVE_PREDICTION_LOG"] = f"jsonl://{log_path}"
            env["ASYNCSERVE_PREDICTION_LOG_SPILL"] = str(workdir / f"{variant.label}-spill.jsonl")
        if variant.postgres:
            env.update(IO_PG_DSN=pg["dsn"], IO_PG_TABLE=pg["table"])
        return ServerSpec(variant.label, (*_env_prefix(env), *_asyncserve(variant)))
    env["IO_LOG_PATH"] = str(log_path)
    factory = variant.kind == "fastapi"
    return ServerSpec(variant.label, (*_env_prefix(env), *_uvicorn(variant.target, factory=factory)))


def _holds_expected_probability(body: bytes) -> bool:
    try:
        probability = float(orjson.loads(body)["probability"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return False
    return abs(probability - score_row(user_row(42))) < 1e-5


PREDICT_42 = Endpoint("POST predict", "POST", PREDICT_PATH, b'{"user_id": 42}', _holds_expected_probability)


def feature_stats(port: int) -> dict[str, int]:
    status, body = harness.request(port, "GET", "/stats", None)
    if status != 200:
        raise BenchmarkError(f"the feature service answered GET /stats with {status}")
    stats: dict[str, int] = orjson.loads(body)
    return stats


# Postgres


@contextlib.contextmanager
def postgres_table(dsn: str) -> Iterator[dict[str, Any]]:
    """A uniquely named table of the ``USERS`` rows, dropped on the way out."""
    table = f"io_users_{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_table(dsn, table))
    try:
        yield {"dsn": dsn, "table": table, "rows": USERS}
    finally:
        asyncio.run(_drop_table(dsn, table))


async def _create_table(dsn: str, table: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        await connection.execute(
            f"CREATE TABLE {table} (user_id bigint PRIMARY KEY, age real, country text, tenure_months integer, "
            "plan text, sessions_30d integer)"
        )
        rows = [(user_id, *user_row(user_id).values()) for user_id in range(USERS)]
        await connection.copy_records_to_table(table, records=rows)
        await connection.execute(f"ANALYZE {table}")
    finally:
        await connection.close()


async def _drop_table(dsn: str, table: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        await connection.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        await connection.close()


def postgres_available(dsn: str) -> str | None:
    """None when Postgres answers at ``dsn``, else why not."""
    try:
        import asyncpg
    except ImportError:
        return "asyncpg is not installed"

    async def ping() -> None:
        connection = await asyncpg.connect(dsn, timeout=5)
        await connection.close()

    try:
        asyncio.run(ping())
    except Exception as exc:
        return f"cannot connect to {dsn}: {exc!r}"
    return None


# Measuring


def feature_spec(workers: int) -> ServerSpec:
    env = {**THREAD_ENV, "IO_FEATURE_DELAY_S": str(DELAY_S)}
    return ServerSpec("feature-service", (*_env_prefix(env), *_uvicorn("benchmarks.io_feature_service:app", workers)))


def measure_all(settings: IoSettings) -> Measured:
    """Start the feature service, calibrate it, start every server, then warm up, measure and profile."""
    base = settings.base
    harness.require_tool("wrk")
    harness.require_tool("taskset")
    harness.check_cpus(base.server_cpu, base.load_cpu)
    variants = settings.variants
    measured = Measured()
    with tempfile.TemporaryDirectory(prefix="asyncserve-io-") as tmp:
        workdir = Path(tmp)
        with contextlib.ExitStack() as stack:
            pg: dict[str, Any] = {}
            if any(variant.postgres for variant in variants):
                pg = stack.enter_context(postgres_table(settings.pg_dsn))
                measured.postgres = dict(pg)
            feature = stack.enter_context(
                harness.running_server(
                    feature_spec(settings.feature_workers), base.load_cpu, workdir, base.ready_timeout_s
                )
            )
            predict_script = write_lua(workdir / "predict.lua", predict=True)
            measured.calibration = calibrate(feature, write_lua(workdir / "get.lua", predict=False), base)
            feature_url = f"http://{HOST}:{feature.port}"
            specs = [server_spec(variant, feature_url, workdir, pg) for variant in variants]
            servers = measure.start_servers(stack, specs, base, workdir)
            harness.check_all(servers, [PREDICT_42])
            measured.requests_sent.update({server.spec.label: 1 for server in servers})
            _warm_up(servers, predict_script, base, measured)

            def run_once(server: Server, _: Scenario, number: int) -> Run:
                if len(measured.rounds) < number:
                    measured.rounds.append([])
                measured.rounds[-1].append(server.spec.label)
                return _undisturbed_run(server, feature, predict_script, settings, measured, number)

            scenario = Scenario(PREDICT_42, base.concurrencies[0])
            runs = measure.interleave(servers, [scenario], base.repeats, run_once)
            measured.runs = {label: label_runs for (label, _, _), label_runs in runs.items()}
            for label in settings.profile:
                server = next(server for server in servers if server.spec.label == label)
                measured.profiles[label] = profile(server, predict_script, base, settings.py_spy, workdir)
                measured.requests_sent[label] += measured.profiles[label]["requests"]
        measured.exit_codes = {server.spec.label: server.exit_code for server in servers}
        measured.exit_codes["feature-service"] = feature.exit_code
        measured.logged_lines = {variant.label: _count_lines(workdir, variant.label) for variant in variants}
    return measured


def _undisturbed_run(
    server: Server, feature: Server, script: Path, settings: IoSettings, measured: Measured, round_number: int
) -> Run:
    """A run, run again (up to ``settings.retries`` times) while other processes took part of either core."""
    label = server.spec.label
    for attempt in range(1, settings.retries + 2):
        run = run_once(server, feature, script, settings.base, settings.feature_workers == 1)
        run.attempt = attempt
        measured.requests_sent[label] += run.result.requests
        _log(f"round {round_number} {label:>18} {_brief(run)}")
        if not run.disturbed(settings.disturbed_share) or attempt == settings.retries + 1:
            return run
        _log(f"  disturbed (other processes took {run.neighbour_server_share:.0%} of the server core, "
             f"{run.neighbour_load_share:.0%} of the load core): again")  # fmt: skip
        measured.discarded.setdefault(label, []).append(run)
    raise AssertionError("unreachable")


def calibrate(feature: Server, script: Path, base: measure.Settings) -> dict[str, Any]:
    """The feature service alone: GETs at c and 2c from wrk on the (still idle) server core."""
    rows = []
    for concurrency in (base.concurrencies[0], 2 * base.concurrencies[0]):
        busy = harness.wait_for_quiet(base.quiet_wait_s) if base.quiet_wait_s > 0 else float("nan")
        cpu_before = harness.process_cpu_s(feature.pid)
        result, non200, _ = run_wrk(feature.port, "/", script, concurrency, base.duration_s, base.server_cpu)
        cpu_s = harness.process_cpu_s(feature.pid) - cpu_before
        row = {
            "concurrency": concurrency,
            "ideal_rps": round(concurrency / DELAY_S),
            "rps": result.rps,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "errors": result.errors,
            "non200": non200,
            "feature_cpu_share": round(cpu_s / result.duration_s, 3),
            "feature_cpu_us_per_get": round(1e6 * cpu_s / result.requests, 1) if result.requests else None,
            "busy_before": busy,
        }
        _log(f"feature service alone c={concurrency}: {row}")
        rows.append(row)
    return {"delay_s": DELAY_S, "wrk_cpu": base.server_cpu, "rows": rows}


def _warm_up(servers: Sequence[Server], script: Path, base: measure.Settings, measured: Measured) -> None:
    for server in servers:
        _log(f"warm-up {server.spec.label}")
        result, _, _ = run_wrk(server.port, PREDICT_PATH, script, base.concurrencies[0], base.warmup_s, base.load_cpu)
        measured.requests_sent[server.spec.label] += result.requests


def run_once(server: Server, feature: Server, script: Path, base: measure.Settings, exact_calls: bool) -> Run:
    """One run once the machine is quiet, with the CPU time and the counters around it."""
    busy = harness.wait_for_quiet(base.quiet_wait_s) if base.quiet_wait_s > 0 else float("nan")
    is_asyncserve = BY_LABEL[server.spec.label.partition("@")[0]].kind == "asyncserve"
    metrics_before = scrape.scrape(server.port) if is_asyncserve else None
    calls_before = feature_stats(feature.port) if exact_calls else None
    cpu_before, feature_before = harness.process_cpu_s(server.pid), harness.process_cpu_s(feature.pid)
    cores_before = core_busy_s()
    result, non200, first_bad = run_wrk(
        server.port, PREDICT_PATH, script, base.concurrencies[0], base.duration_s, base.load_cpu
    )
    cores_after = core_busy_s()
    server_cpu_s = round(harness.process_cpu_s(server.pid) - cpu_before, 2)
    feature_cpu_s = round(harness.process_cpu_s(feature.pid) - feature_before, 2)
    server_core_s = cores_after.get(base.server_cpu, 0.0) - cores_before.get(base.server_cpu, 0.0)
    load_core_s = cores_after.get(base.load_cpu, 0.0) - cores_before.get(base.load_cpu, 0.0)
    neighbour_server = max(0.0, server_core_s - server_cpu_s) / result.duration_s if result.duration_s else 0.0
    neighbour_load = (
        max(0.0, load_core_s - feature_cpu_s - result.load_cpu_s) / result.duration_s if result.duration_s else 0.0
    )
    calls = None
    if calls_before is not None:
        calls_after = feature_stats(feature.port)
        calls = {key: calls_after[key] - calls_before.get(key, 0) for key in calls_after}
    metrics = None
    if metrics_before is not None:
        metrics = asyncserve_metrics(scrape.delta(metrics_before, scrape.scrape(server.port)), result.duration_s)
    return Run(
        result=dataclasses.replace(result, server_cpu_s=server_cpu_s, busy_before=busy),
        non200=non200,
        first_bad_status=first_bad,
        feature_cpu_s=feature_cpu_s,
        feature_calls=calls,
        metrics=metrics,
        neighbour_server_share=round(neighbour_server, 3),
        neighbour_load_share=round(neighbour_load, 3),
    )


def core_busy_s() -> dict[int, float]:
    """CPU seconds each core spent running processes so far (user, nice, system, steal), from ``/proc/stat``.

    Interrupt and softirq time is left out: the kernel charges it to no process, and most of it is
    the loopback traffic of the measured servers themselves.
    """
    busy: dict[int, float] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(value) for value in fields[:8])
            busy[int(name[3:])] = (user + nice + system + steal) / _CLOCK_TICKS
    return busy


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def asyncserve_metrics(run: scrape.Samples, duration_s: float) -> dict[str, Any]:
    """What one run's ``/metrics`` delta says about the feature source, the answers and the log."""
    round_trips = scrape.total(run, "asyncserve_feature_batch_keys_count", source=SOURCE)
    keys = scrape.total(run, "asyncserve_feature_batch_keys_sum", source=SOURCE)
    fetch_s = scrape.total(run, "asyncserve_feature_fetch_seconds_sum", source=SOURCE)
    by_status = {k: int(v) for k, v in scrape.by_label(run, "asyncserve_requests_total", "status", route=ROUTE).items()}
    requests = sum(by_status.values())
    batching = scrape.batching_summary(run, "score", duration_s)
    return {
        "requests_by_status": by_status,
        "round_trips": int(round_trips),
        "keys": int(keys),
        "keys_per_round_trip": round(keys / round_trips, 2) if round_trips else None,
        "requests_per_round_trip": round(requests / round_trips, 2) if round_trips else None,
        "mean_round_trip_ms": round(1000 * fetch_s / round_trips, 2) if round_trips else None,
        "feature_errors": {
            k: int(v) for k, v in scrape.by_label(run, "asyncserve_feature_errors_total", "kind", source=SOURCE).items()
        },
        "predlog_records": {
            k: int(v) for k, v in scrape.by_label(run, "asyncserve_predlog_records_total", "outcome").items()
        },
        "model_batches": batching["batches"],
        "model_mean_batch_rows": batching["mean_batch_rows"],
        "loop_lag_mean_ms": scrape.loop_lag_summary(run)["mean_ms"],
    }


def _count_lines(workdir: Path, label: str) -> int:
    count = 0
    for path in workdir.glob(f"{label}.jsonl*"):
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                count += chunk.count(b"\n")
    return count


def _brief(run: Run) -> str:
    r = run.result
    cpu_us = 1e6 * r.server_cpu_s / r.requests if r.requests else float("nan")
    return (
        f"{r.rps:8.0f} req/s  p50 {r.p50_ms:8.2f} ms  p99 {r.p99_ms:8.2f} ms  cpu {r.cpu_share:4.2f}  "
        f"{cpu_us:6.0f} us/req  feature cpu {run.feature_cpu_s / r.duration_s:4.2f}  non-200 {run.non200}  "
        f"errors {r.errors}  others {run.neighbour_server_share:.2f}/{run.neighbour_load_share:.2f}"
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Profiling


def profile(server: Server, script: Path, base: measure.Settings, py_spy: str | None, workdir: Path) -> dict[str, Any]:
    """One more loaded run while py-spy (on the load core) samples the server at 200 Hz: where its CPU went."""
    if py_spy is None:
        raise BenchmarkError("--profile needs py-spy (pip install py-spy, or give --py-spy PATH)")
    raw = workdir / f"profile-{server.spec.label}.txt"
    record_s = max(1, base.duration_s - 2)
    command = [
        "taskset", "-c", str(base.load_cpu), py_spy, "record", "-p", str(server.pid), "-d", str(record_s),
        "-r", "200", "-f", "raw", "-o", str(raw), "--nonblocking", "--threads",
    ]  # fmt: skip
    harness.wait_for_quiet(base.quiet_wait_s)
    _log(f"profiling {server.spec.label} for {record_s} s")
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        result, _, _ = run_wrk(server.port, PREDICT_PATH, script, base.concurrencies[0], base.duration_s, base.load_cpu)
        _, stderr = spy.communicate(timeout=record_s + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait(timeout=10)
    if spy.returncode != 0 or not raw.exists():
        raise BenchmarkError(f"py-spy failed ({spy.returncode}): {stderr.decode(errors='replace')[-500:]}")
    return {"requests": result.requests, "rps": result.rps, **summarize_profile(raw.read_text())}


def summarize_profile(raw: str, top: int = 15) -> dict[str, Any]:
    """py-spy's raw stacks (``--threads``) as shares of the CPU samples: by thread, by package, top functions.

    ``by_package_self`` charges each sample to the package of its innermost Python frame: time in a
    C extension counts for the Python function that called it, and the event loop's own native work
    (uvloop: epoll, sockets, invoking callbacks) shows as the self time of ``Runner.run``, reported as
    ``uvloop (native)``. ``top_inclusive`` leaves out the start-up chain down to ``Runner.run``. A
    sample of an executor thread waiting for work (py-spy's idle detection misses that wait) is not
    CPU and is counted apart, as ``idle_samples``.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    chain: set[str] = set()
    total = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, *frames = stack.split(";")
        names = [_function(frame) for frame in frames]
        if names and names[-1].startswith(_IDLE_LEAF):
            idle += count
            continue
        total += count
        threads[_thread_name(thread)] += count
        if not names:
            continue
        own[names[-1]] += count
        packages[_package(frames[-1])] += count
        if _LOOP_RUN in names:
            chain.update(names[: names.index(_LOOP_RUN) + 1])
        for name in set(names):
            inclusive[name] += count
    share = (lambda n: round(n / total, 3)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "idle_samples": idle,
        "by_thread": {name: share(n) for name, n in threads.most_common(8)},
        "by_package_self": {name: share(n) for name, n in packages.most_common(12)},
        "top_self": {name: share(n) for name, n in own.most_common(top)},
        "top_inclusive": {
            name: share(n) for name, n in inclusive.most_common(2 * top + len(chain)) if name not in chain
        },
    }


_LOOP_RUN = "Runner.run (asyncio/runners.py)"
_IDLE_LEAF = "_worker (concurrent/futures/thread.py)"


def _thread_name(frame: str) -> str:
    """py-spy's thread frame, ``thread (1234): MainThread``, as ``MainThread``."""
    name = frame.split("): ", 1)[-1].strip()
    return name if name.isprintable() and len(name) < 80 else "?"


def _function(frame: str) -> str:
    """``f (pkg/mod.py:12)`` without its line number."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def _package(frame: str) -> str:
    """The top-level package (or stdlib module) of a frame's file: ``httpcore`` for ``httpcore/_async/http11.py``."""
    if _function(frame) == _LOOP_RUN:
        return "uvloop (native)"
    where = frame.partition(" (")[2].rstrip(")")
    if where.startswith("<frozen"):
        return where.split(">")[0].lstrip("<").replace("frozen ", "")
    path = where.rsplit(":", 1)[0]
    head = path.split("/", 1)[0].removesuffix(".py")
    return head if head.isidentifier() else "?"


# Results


def summarize(label: str, runs: Sequence[Run]) -> dict[str, Any]:
    """The medians of one server's runs, and the totals of what must be zero."""
    results = [run.result for run in runs]
    summary = report.Summary.of(results)
    per_request = [1e6 * r.server_cpu_s / r.requests for r in results if r.requests]
    feature_share = [run.feature_cpu_s / run.result.duration_s for run in runs]
    load_core = [(run.feature_cpu_s + run.result.load_cpu_s) / run.result.duration_s for run in runs]
    row: dict[str, Any] = {
        "label": label,
        "description": describe(label),
        **summary.as_dict(),
        "ok_rps": round(statistics.median(_ok_rps(run) for run in runs), 1),
        "rps_by_round": [r.rps for r in results],
        "cpu_us_per_request": round(statistics.median(per_request), 1) if per_request else None,
        "feature_cpu_share": round(statistics.median(feature_share), 3),
        "load_core_busy": round(max(load_core), 3),
        "neighbour_server_share": round(max(run.neighbour_server_share for run in runs), 3),
        "neighbour_load_share": round(max(run.neighbour_load_share for run in runs), 3),
        "reruns": sum(run.attempt - 1 for run in runs),
        "non200": sum(run.non200 for run in runs),
        "first_bad_status": next((run.first_bad_status for run in runs if run.first_bad_status), None),
    }
    calls = [run.feature_calls for run in runs if run.feature_calls is not None]
    if calls:
        requests = sum(r.requests for r in results)
        http_calls = sum(c["gets"] + c["batch_calls"] for c in calls)
        row["feature_calls"] = {key: sum(c[key] for c in calls) for key in calls[0]}
        row["feature_http_calls_per_request"] = round(http_calls / requests, 3) if requests else None
    metrics = [run.metrics for run in runs if run.metrics is not None]
    if metrics:
        row["asyncserve"] = _metrics_total(metrics)
    return row


def _ok_rps(run: Run) -> float:
    """Answers with status 200 per second: fast failures must not count as throughput."""
    r = run.result
    return (r.requests - run.non200) / r.duration_s if r.duration_s > 0 else 0.0


def _metrics_total(metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_status: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    predlog: Counter[str] = Counter()
    for m in metrics:
        by_status.update(m["requests_by_status"])
        errors.update(m["feature_errors"])
        predlog.update(m["predlog_records"])
    round_trips = sum(m["round_trips"] for m in metrics)
    keys = sum(m["keys"] for m in metrics)
    requests = sum(by_status.values())
    rows = [m["model_mean_batch_rows"] for m in metrics if m["model_mean_batch_rows"] is not None]
    return {
        "requests_by_status": dict(by_status),
        "requests": requests,
        "round_trips": round_trips,
        "keys": keys,
        "keys_per_round_trip": round(keys / round_trips, 2) if round_trips else None,
        "requests_per_round_trip": round(requests / round_trips, 2) if round_trips else None,
        "mean_round_trip_ms": statistics.median(m["mean_round_trip_ms"] for m in metrics if m["mean_round_trip_ms"])
        if any(m["mean_round_trip_ms"] for m in metrics)
        else None,
        "feature_errors": dict(errors),
        "predlog_records": dict(predlog),
        "model_mean_batch_rows": round(statistics.median(rows), 2) if rows else None,
        "loop_lag_mean_ms": statistics.median(m["loop_lag_mean_ms"] or 0.0 for m in metrics),
        "per_run": list(metrics),
    }


def _per_round_ratios(measured: Measured, label: str, baseline: str) -> list[float]:
    """label / baseline in each round: both measured minutes apart at most."""
    ours, theirs = measured.runs.get(label, []), measured.runs.get(baseline, [])
    return [round(_ok_rps(a) / _ok_rps(b), 3) for a, b in zip(ours, theirs, strict=False) if _ok_rps(b) > 0]


def comparisons(measured: Measured, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ceiling, httpx vs aiohttp, and every target of the issue, with the numbers behind them."""
    out: dict[str, Any] = {}
    candidates = [label for label in CEILING_CANDIDATES if label in rows]
    if len(candidates) == 2:
        httpx_row, aiohttp_row = rows["bare-httpx"], rows["bare-aiohttp"]
        out["httpx_vs_aiohttp"] = {
            "httpx": {"rps": httpx_row["ok_rps"], "cpu_us_per_request": httpx_row["cpu_us_per_request"]},
            "aiohttp": {"rps": aiohttp_row["ok_rps"], "cpu_us_per_request": aiohttp_row["cpu_us_per_request"]},
            "aiohttp_rps_over_httpx": _div(aiohttp_row["ok_rps"], httpx_row["ok_rps"]),
            "httpx_cpu_over_aiohttp": _div(httpx_row["cpu_us_per_request"], aiohttp_row["cpu_us_per_request"]),
        }
    if not candidates:
        return out
    ceiling = max(candidates, key=lambda label: rows[label]["ok_rps"])
    out["ceiling"] = {
        "label": ceiling,
        "rps": rows[ceiling]["ok_rps"],
        "ideal_rps": round(measured_concurrency(rows) / DELAY_S),
    }
    out["targets"] = targets(measured, rows, ceiling)
    return out


def _labels(rows: dict[str, dict[str, Any]], base: str) -> list[str]:
    """The rows of the variant ``base``: itself, or one per checkout (``as-per-key@new``, ...)."""
    return [label for label in rows if label.partition("@")[0] == base]


def targets(measured: Measured, rows: dict[str, dict[str, Any]], ceiling: str) -> list[dict[str, Any]]:
    """Every target of the issue, for every server it concerns, and each checkout against the first."""
    found = []
    for label in _labels(rows, PER_KEY):
        found.append(_target(measured, rows, label, ceiling, 0.8, f"{label} >= 0.8 x the bare-ASGI ceiling"))
        if FASTAPI in rows:
            found.append(_target(measured, rows, label, FASTAPI, 3.0, f"{label} >= 3 x synchronous FastAPI"))
    for label in (label for base in BATCHED for label in _labels(rows, base)):
        found.append(_target(measured, rows, label, ceiling, 1.0, f"{label} above the one-fetch-per-request ceiling"))
    for label in _labels(rows, POSTGRES):
        if "asyncserve" in rows[label]:
            found.append(_round_trips_target(label, rows[label]["asyncserve"]))
    for base in (variant.label for variant in VARIANTS if variant.kind == "asyncserve"):
        compared = [label for label in _labels(rows, base) if "@" in label]
        for other in compared[1:]:
            text = f"{compared[0]} >= {other} (the same server at two commits)"
            found.append(_target(measured, rows, compared[0], other, 1.0, text, strictly=False))
    return found


def _round_trips_target(label: str, a: dict[str, Any]) -> dict[str, Any]:
    ratio = a["requests_per_round_trip"]
    return {
        "target": f"{label}: >= 10 x fewer round trips than requests",
        "value": ratio,
        "threshold": 10.0,
        "met": ratio is not None and ratio >= 10.0,
        "detail": f"{a['requests']:,} requests, {a['round_trips']:,} round trips, {a['keys_per_round_trip']} keys each",
    }


def measured_concurrency(rows: dict[str, dict[str, Any]]) -> int:
    return int(next(iter(rows.values())).get("concurrency", CONCURRENCIES[0]))


def _target(
    measured: Measured,
    rows: dict[str, dict[str, Any]],
    label: str,
    baseline: str,
    threshold: float,
    text: str,
    *,
    strictly: bool | None = None,
) -> dict[str, Any]:
    """``label`` / ``baseline`` in 200/s against ``threshold``; ``strictly`` above it (default: for 1.0 only)."""
    ratio = _div(rows[label]["ok_rps"], rows[baseline]["ok_rps"])
    per_round = _per_round_ratios(measured, label, baseline)
    above = threshold == 1.0 if strictly is None else strictly
    met = ratio is not None and (ratio > threshold if above else ratio >= threshold)
    clean = rows[label]["non200"] == 0 and rows[label]["errors"] == 0
    return {
        "target": text,
        "baseline": baseline,
        "value": ratio,
        "threshold": threshold,
        "met": bool(met and clean),
        "per_round": per_round,
        "detail": f"{rows[label]['ok_rps']:,.0f} vs {rows[baseline]['ok_rps']:,.0f} req/s"
        + (f", {ratio - 1:+.0%} against it" if threshold == 1.0 and ratio is not None else "")
        + ("" if clean else f"; {rows[label]['non200']} non-200 answers, {rows[label]['errors']} wrk errors"),
    }


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def results(
    measured: Measured, settings: IoSettings, facts: dict[str, Any], commands: dict[str, str]
) -> dict[str, Any]:
    rows = {label: summarize(label, runs) for label, runs in measured.runs.items()}
    for row in rows.values():
        row["concurrency"] = settings.base.concurrencies[0]
        row["logged_lines"] = measured.logged_lines.get(row["label"])
        row["requests_sent"] = measured.requests_sent.get(row["label"])
    return {
        "benchmark": "io",
        "machine": {**facts, "io_versions": {name: _version(name) for name in IO_PACKAGES}},
        "settings": {
            **measure.settings_dict(settings.base),
            "concurrency": settings.base.concurrencies[0],
            "feature_delay_s": DELAY_S,
            "http_source_client": http_source_client(),
            "feature_workers": settings.feature_workers,
            "disturbed_share": settings.disturbed_share,
            "retries": settings.retries,
            "users": USERS,
            "prediction_log": "asyncserve: ASYNCSERVE_PREDICTION_LOG=jsonl://<tmp>/<label>.jsonl"
            if prediction_log_supported()
            else "asyncserve: off (this asyncserve has no prediction_log setting)",
            "commands": commands,
            "rounds": measured.rounds,
        },
        "feature_service_alone": measured.calibration,
        "postgres": {k: v for k, v in measured.postgres.items() if k != "dsn"} or None,
        "exit_codes": measured.exit_codes,
        "rows": list(rows.values()),
        "comparisons": comparisons(measured, rows),
        "profiles": measured.profiles,
        "runs": {label: [run.as_dict() for run in runs] for label, runs in measured.runs.items()},
        "discarded_runs": {label: [run.as_dict() for run in runs] for label, runs in measured.discarded.items()},
    }


IO_PACKAGES = ("httpx", "httpcore", "h11", "anyio", "aiohttp", "requests", "urllib3", "asyncpg", "fastapi", "pydantic")


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# Markdown


def markdown(data: dict[str, Any]) -> str:
    settings = data["settings"]
    c = settings["concurrency"]
    parts = [
        f"# I/O workload: features from a {settings['feature_delay_s'] * 1000:.0f} ms HTTP service (or Postgres), "
        f"c={c}, server on one core",
        report.facts_markdown(data["machine"])
        + "\n- "
        + ", ".join(f"{k} {v}" for k, v in data["machine"]["io_versions"].items() if v),
        measure.method_markdown(settings)
        + f' Each request is `POST /v1/models/score/predict {{"user_id": N}}`, N uniform in '
        f"0..{settings['users'] - 1}; "
        f"the ideal is {c} / {settings['feature_delay_s']} s = {c / settings['feature_delay_s']:,.0f} req/s. "
        f"asyncserve's HttpSource uses {settings['http_source_client']}. "
        f"Prediction log: {settings['prediction_log']}; the baselines write the same JSON lines. "
        "Rounds (server order): " + "; ".join(" ".join(r) for r in settings["rounds"]) + ".",
        "## Results\n\n" + _results_table(data["rows"]),
        _legend(),
        "## Targets\n\n" + _targets(data["comparisons"]),
        "## Feature round trips (asyncserve's /metrics, summed over the measured runs)\n\n"
        + _metrics_table(data["rows"]),
        "## The feature service alone (wrk on the idle server core)\n\n" + _calibration(data),
        "## Prediction logs\n\n" + _logs_table(data["rows"]),
    ]
    if data["profiles"]:
        parts.append("## Where the CPU goes (py-spy, 200 Hz, one extra run)\n\n" + _profiles(data["profiles"]))
    return "\n\n".join(parts) + "\n"


def _results_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["server", "what", "req/s", "200/s", "req/s min-max", "server CPU", "CPU µs/req", "p50 ms", "p99 ms"]
    headers += ["feature calls/req", "feature svc CPU", "load core busy", "others on cores", "re-runs", "non-200"]
    headers += ["wrk errors"]
    table = []
    for row in rows:
        table.append(
            [
                f"`{row['label']}`",
                row["description"],
                f"{row['rps']:,.0f}",
                f"{row['ok_rps']:,.0f}",
                f"{row['rps_min']:,.0f}-{row['rps_max']:,.0f}",
                f"{row['cpu_share']:.2f}",
                _num(row["cpu_us_per_request"], "{:,.0f}"),
                report.ms(row["p50_ms"]),
                report.ms(row["p99_ms"]),
                _num(row.get("feature_http_calls_per_request"), "{:.3f}"),
                f"{row['feature_cpu_share']:.2f}",
                f"{row['load_core_busy']:.2f}",
                f"{row['neighbour_server_share']:.2f} / {row['neighbour_load_share']:.2f}",
                str(row["reruns"]),
                str(row["non200"]),
                str(row["errors"]),
            ]
        )
    return report.markdown_table(headers, table)


def _legend() -> str:
    return (
        "req/s is the median of the rounds (wrk's count of answers), 200/s the same for answers with status 200 "
        "only, which the targets compare. server CPU is the share of its core the server used (1.00: saturated); "
        "CPU µs/req is the server's CPU time per answered request, its cost per request, which a neighbour on the "
        "core disturbs least. feature calls/req counts HTTP calls to the feature service (GETs plus batch calls, "
        "from its own counters) per answered request. feature svc CPU is the feature service's share of the load "
        "core; load core busy adds wrk's share (the worst run): near 1.00 the load side, not the server, may have "
        "set the pace. others on cores is the most of the server core / the load core that other processes "
        "took in any counted run (busy time from /proc/stat minus the server's, or wrk's and the feature "
        "service's; interrupt time, mostly the loopback traffic itself, left out); a run where either "
        "passed the disturbed share was run again, re-runs counts those. "
        "non-200 counts answers other than 200 (wrk's Lua `response` hook); wrk errors are socket "
        "errors, timeouts and 4xx/5xx."
    )


def _targets(comparisons: dict[str, Any]) -> str:
    lines = []
    if "ceiling" in comparisons:
        ceiling = comparisons["ceiling"]
        lines.append(
            f"- the bare-ASGI ceiling is `{ceiling['label']}`: {ceiling['rps']:,.0f} req/s "
            f"({ceiling['rps'] / ceiling['ideal_rps']:.0%} of the ideal {ceiling['ideal_rps']:,})"
        )
    versus = comparisons.get("httpx_vs_aiohttp")
    if versus:
        lines.append(
            f"- httpx vs aiohttp (bare ASGI, one GET per request): httpx {versus['httpx']['rps']:,.0f} req/s at "
            f"{_num(versus['httpx']['cpu_us_per_request'], '{:,.0f}')} µs CPU/request, aiohttp "
            f"{versus['aiohttp']['rps']:,.0f} req/s at {_num(versus['aiohttp']['cpu_us_per_request'], '{:,.0f}')} µs: "
            f"aiohttp serves {_num(versus['aiohttp_rps_over_httpx'], '{:.1f}')}x the requests, httpx costs "
            f"{_num(versus['httpx_cpu_over_aiohttp'], '{:.1f}')}x the CPU per request"
        )
    for target in comparisons.get("targets", []):
        mark = "**met**" if target["met"] else "**not met**"
        rounds = (
            f" (per round: {', '.join(f'{r:.2f}' for r in target['per_round'])})" if target.get("per_round") else ""
        )
        lines.append(f"- {target['target']}: {_num(target['value'], '{:.2f}')}x, {mark}; {target['detail']}{rounds}")
    return "\n".join(lines) or "(no comparison: too few servers measured)"


def _metrics_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["server", "requests", "by status", "round trips", "keys", "keys/round trip", "requests/round trip"]
    headers += ["mean round trip ms", "feature errors", "model batch rows", "loop lag ms"]
    table = []
    for row in rows:
        a = row.get("asyncserve")
        if a is None:
            continue
        table.append(
            [
                f"`{row['label']}`",
                f"{a['requests']:,}",
                ", ".join(f"{k}: {v:,}" for k, v in sorted(a["requests_by_status"].items())),
                f"{a['round_trips']:,}",
                f"{a['keys']:,}",
                _num(a["keys_per_round_trip"], "{:.2f}"),
                _num(a["requests_per_round_trip"], "{:.2f}"),
                _num(a["mean_round_trip_ms"], "{:.1f}"),
                ", ".join(f"{k}: {v:,}" for k, v in sorted(a["feature_errors"].items())) or "0",
                _num(a["model_mean_batch_rows"], "{:.1f}"),
                _num(a["loop_lag_mean_ms"], "{:.2f}"),
            ]
        )
    note = (
        "\n\nA round trip is one `_fetch` of the source (`asyncserve_feature_batch_keys_count`), keys its "
        "`_sum`. With the per-key HttpSource a round trip gathers one GET per key, so its HTTP calls are its keys; "
        "with `batch_url` a round trip is one `POST /users:batch`; with Postgres one `= ANY($1)` query."
    )
    return (report.markdown_table(headers, table) + note) if table else "(no asyncserve server measured)"


def _calibration(data: dict[str, Any]) -> str:
    calibration = data["feature_service_alone"]
    headers = ["c", "ideal GET/s", "GET/s", "p50 ms", "p99 ms", "feature svc CPU", "CPU µs/GET", "non-200 / errors"]
    table = [
        [
            str(row["concurrency"]),
            f"{row['ideal_rps']:,}",
            f"{row['rps']:,.0f}",
            report.ms(row["p50_ms"]),
            report.ms(row["p99_ms"]),
            f"{row['feature_cpu_share']:.2f}",
            _num(row["feature_cpu_us_per_get"], "{:.0f}"),
            f"{row['non200']} / {row['errors']}",
        ]
        for row in calibration.get("rows", [])
    ]
    workers = data["settings"]["feature_workers"]
    return (
        report.markdown_table(headers, table)
        + f"\n\n`GET /users/N` (N random) against the feature service ({workers} uvicorn worker(s) pinned to the load "
        "core), before any server under test started, wrk alone on the server core. Its CPU per GET times the calls "
        "per second of a run is its share of the load core in that run (the results' feature svc CPU column)."
    )


def _logs_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["server", "requests sent (check, warm-up, runs)", "lines logged", "logged / sent"]
    table = [
        [
            f"`{row['label']}`",
            f"{row['requests_sent']:,}" if row.get("requests_sent") else "?",
            f"{row['logged_lines']:,}" if row.get("logged_lines") is not None else "?",
            _num(_div(row.get("logged_lines"), row.get("requests_sent")), "{:.3f}"),
        ]
        for row in rows
    ]
    return report.markdown_table(headers, table) + (
        "\n\nLines in each server's JSONL log after it stopped, against the requests wrk completed (the server "
        "also answers, and logs, requests still in flight when a run ends; failed requests log nothing)."
    )


def _profiles(profiles: dict[str, Any]) -> str:
    parts = []
    for label, prof in profiles.items():
        packages = ", ".join(f"{name} {share:.0%}" for name, share in prof["by_package_self"].items() if share)
        threads = ", ".join(f"{name} {share:.0%}" for name, share in prof["by_thread"].items() if share)
        functions = "\n".join(f"  - {share:.1%} {name}" for name, share in list(prof["top_inclusive"].items())[:20])
        parts.append(
            f"- `{label}` ({prof['rps']:,.0f} req/s, {prof['samples']} samples). By thread: {threads}. "
            f"Self time by package: {packages}.\n"
            f"  Inclusive, top 20:\n{functions}"
        )
    return "\n".join(parts)


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


# Command line


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.tables_from is not None:
        data = json.loads(args.tables_from.read_text())
        return _write(data, args.output_dir, args.name, args.checkout)
    # SIGTERM (and SIGINT, which a shell may ignore for background jobs) unwind normally, so the
    # servers are stopped and the Postgres table is dropped on the way out.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, _stop)
    try:
        settings = resolve(args)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 2
    facts = report.machine_facts(settings.base.server_cpu, settings.base.load_cpu)
    try:
        compared = checkouts.describe(args.checkout)
        measured = measure_all(settings)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    report.record_end(facts)
    commands = {
        variant.label: " ".join(
            server_spec(variant, "http://127.0.0.1:<feature port>", Path("<tmp>"), _PG_PLACEHOLDER).command
        ).replace("{port}", "<port>")
        for variant in settings.variants
    }
    commands["feature-service"] = " ".join(feature_spec(settings.feature_workers).command).replace("{port}", "<port>")
    data = {**results(measured, settings, facts, commands), "checkouts": compared}
    return _write(data, settings.base.output_dir, args.name, args.checkout)


def _write(data: dict[str, Any], directory: Path, name: str, compared: Sequence[Checkout]) -> int:
    text = markdown(data)
    paths = report.write_results(name, data, text, directory, checkouts.placeholders(compared))
    print(report.relative_paths(text, checkouts.placeholders(compared)))
    print(
        "written: "
        + ", ".join(str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path) for path in paths)
    )
    return 0


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


_PG_PLACEHOLDER = {"dsn": "<dsn>", "table": "<table>"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.io", description=(__doc__ or "").split("\n\n")[0])
    measure.add_arguments(parser, CONCURRENCIES)
    labels = [variant.label for variant in VARIANTS]
    parser.add_argument("--servers", nargs="+", choices=labels, help="the servers to measure (default: all)")
    parser.add_argument(
        "--feature-workers", type=int, default=1, help="uvicorn workers of the feature service (default 1)"
    )
    parser.add_argument("--pg-dsn", default=PG_DSN, help=f"the local Postgres (default {PG_DSN})")
    parser.add_argument("--no-postgres", action="store_true", help="leave out the Postgres server")
    parser.add_argument(
        "--profile", nargs="+", default=[], metavar="LABEL", help="py-spy these servers after the rounds"
    )
    parser.add_argument(
        "--disturbed-share",
        type=float,
        default=0.1,
        help="run again a run in which other processes took more than this share of a core (default 0.1)",
    )
    parser.add_argument("--retries", type=int, default=2, help="most re-runs of a disturbed run (default 2)")
    parser.add_argument("--py-spy", help="the py-spy executable (default: py-spy on PATH, or /tmp/pyspy/bin/py-spy)")
    checkouts.add_argument(parser, "each asyncserve server (labelled SERVER@LABEL)")
    parser.add_argument("--name", default="io", help="the results' file name, without .json/.md")
    parser.add_argument("--tables-from", type=Path, help="no run: write the Markdown from this JSON")
    return parser


def resolve(args: argparse.Namespace) -> IoSettings:
    base = measure.resolve(args, CONCURRENCIES, CONCURRENCIES)
    if len(base.concurrencies) != 1:
        raise BenchmarkError("give one --concurrency: the targets compare servers at one concurrency")
    if args.feature_workers < 1:
        raise BenchmarkError("--feature-workers must be >= 1")
    variants = expand(_chosen(args), args.checkout)
    missing = [label for label in args.profile if label not in {variant.label for variant in variants}]
    if missing:
        raise BenchmarkError(f"--profile {' '.join(missing)}: not among the measured servers")
    py_spy = args.py_spy or next(filter(None, (shutil.which(name) for name in PY_SPY_CANDIDATES)), None)
    return IoSettings(
        base=base,
        variants=variants,
        feature_workers=args.feature_workers,
        pg_dsn=args.pg_dsn,
        profile=tuple(args.profile),
        py_spy=py_spy,
        disturbed_share=args.disturbed_share,
        retries=max(0, args.retries),
    )


def _chosen(args: argparse.Namespace) -> list[Variant]:
    """The variants asked for, without the Postgres one if told so or if Postgres does not answer."""
    chosen = [BY_LABEL[label] for label in args.servers] if args.servers else list(VARIANTS)
    if any(variant.postgres for variant in chosen) and not args.no_postgres:
        problem = postgres_available(args.pg_dsn)
        if problem is None:
            return chosen
        _log(f"leaving out the Postgres server: {problem}")
    return [variant for variant in chosen if not variant.postgres]


def expand(variants: Sequence[Variant], compared: Sequence[Checkout]) -> tuple[Variant, ...]:
    """With checkouts, each asyncserve variant once per checkout (``as-per-key@new``, ``as-per-key@old``)."""
    return tuple(
        copy
        for variant in variants
        for copy in (
            [variant.from_checkout(c) for c in compared] if compared and variant.kind == "asyncserve" else [variant]
        )
    )


def describe(label: str) -> str:
    base, _, checkout = label.partition("@")
    return BY_LABEL[base].description + (f" ({checkout})" if checkout else "")


if __name__ == "__main__":
    sys.exit(main())
