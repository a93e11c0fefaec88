"""The dynamic-batching benchmark: asyncserve serving a NumPy MLP on one core, against its limit and FastAPI.

In one run, with every server pinned to one core and wrk on another:

- R_b, the MLP's raw in-process throughput at batch sizes 1, 8, 32 and 64 (``benchmarks.mlp``),
  timed before and after the HTTP runs;
- H, the throughput of a bare ASGI app that decodes the same request and answers a same-sized
  output without the model (``benchmarks.bare_mlp``), so the limit of one core that pays for
  HTTP, JSON and the model is L = 1 / (1/R32 + 1/H);
- ``asyncserve serve benchmarks.mlp:service --executor-workers 1`` in both builds, compiled (``make
  compiled``: the wheel a release ships, its request path compiled with mypyc) and interpreted (the
  same sources as .py files), and a FastAPI service that runs the model per request in its thread
  pool (``benchmarks.fastapi_mlp``) at several concurrencies, interleaved; the compiled build's
  ``/metrics`` around each run give its batch sizes and close reasons;
- an overload run on the compiled build (1024 connections, ``X-Request-Timeout: 0.05``; ``benchmarks.overload``).

Results go to ``benchmarks/results/batching.{json,md,png}``; ``benchmarks/BATCHING.md`` explains them.

Usage::

    make compiled
    .venv/bin/pip install -r benchmarks/requirements.txt -r benchmarks/requirements-plot.txt
    .venv/bin/python -m benchmarks.batching            # ~12 min: 10 s runs, 3 repeats, c = 1 8 64 256
    .venv/bin/python -m benchmarks.batching --quick    # ~2 min: 2 s runs, 1 repeat
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks import batching_report, harness, measure, mlp, procstat, report, scrape, wrk
from benchmarks.harness import (
    COMPILED_BUILD,
    HOST,
    REPO,
    BenchmarkError,
    Endpoint,
    Server,
    ServerSpec,
    compiled_command,
    uvicorn_command,
)
from benchmarks.measure import Measurements, Settings
from benchmarks.overload import OverloadSettings, run_overload
from benchmarks.wrk import WrkResult

BARE, SERVED, INTERPRETED, FASTAPI = "bare", "asyncserve", "asyncserve-py", "fastapi"
"""SERVED is the compiled build; INTERPRETED runs the same sources as .py files."""
CONCURRENCIES = (1, 8, 64, 256)
TARGET_CONCURRENCY = 64
RAW_BATCH_SIZES = (1, 8, 32, 64)
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""One BLAS thread everywhere: the model gets one core, like the server around it."""
INFER_PATH = "/v2/models/mlp/infer"


@dataclass(frozen=True)
class RawSettings:
    repeats: int
    min_time_s: float


def request_row() -> np.ndarray[Any, np.dtype[np.float32]]:
    row: np.ndarray[Any, np.dtype[np.float32]] = mlp.example_rows(1)[0]
    return row


def request_body() -> bytes:
    """One V2 row of 256 FP32 values, serialized as a NumPy client with orjson would (shortest float32 text)."""
    tensor = {"name": "x", "shape": [1, mlp.INPUT_SIZE], "datatype": "FP32", "data": request_row()}
    return orjson.dumps({"inputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY)


def output_values(body: bytes) -> list[float] | None:
    """The 16 values of the answer's first output, or None if the answer is not shaped so."""
    try:
        data = orjson.loads(body)["outputs"][0]["data"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(data, list) or len(data) != mlp.OUTPUT_SIZE:
        return None
    return [float(value) for value in data]


def holds_16_values(body: bytes) -> bool:
    return output_values(body) is not None


ENDPOINT = Endpoint("POST v2 infer mlp", "POST", INFER_PATH, request_body(), holds_16_values)


def served_command() -> tuple[str, ...]:
    """``asyncserve serve benchmarks.mlp:service`` with one executor worker, as uvicorn runs the baselines."""
    script = Path(sys.executable).parent / "asyncserve"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "asyncserve"]
    return (
        *launcher, "serve", "benchmarks.mlp:service", "--executor-workers", "1", "--host", HOST, "--port", "{port}",
        "--workers", "1", "--log-level", "warning",
    )  # fmt: skip


SPECS = (
    ServerSpec(BARE, uvicorn_command("benchmarks.bare_mlp:app")),
    ServerSpec(SERVED, compiled_command(served_command())),
    ServerSpec(INTERPRETED, served_command()),
    ServerSpec(FASTAPI, uvicorn_command("benchmarks.fastapi_mlp:app")),
)


@dataclass
class Run:
    """Everything one benchmark run measured."""

    raw: list[dict[str, Any]] = field(default_factory=list)
    measurements: Measurements = field(default_factory=Measurements)
    metrics: dict[int, scrape.Samples] = field(default_factory=dict)
    """asyncserve's metrics deltas summed over the runs at each concurrency."""
    metrics_seconds: dict[int, float] = field(default_factory=dict)
    thread_cpu_s: dict[int, dict[str, float]] = field(default_factory=dict)
    """asyncserve's CPU seconds by thread (``main`` is the event loop), summed over the runs at each concurrency."""
    overload: dict[str, Any] = field(default_factory=dict)


# Measuring


def time_raw(raw: RawSettings, cpu: int, quiet_wait_s: float) -> dict[str, Any]:
    """The MLP's raw rows/s at each batch size, in a subprocess pinned to ``cpu`` with one BLAS thread."""
    busy = harness.wait_for_quiet(quiet_wait_s) if quiet_wait_s > 0 else float("nan")
    command = [sys.executable, "-m", "benchmarks.mlp", "--cpu", str(cpu), "--repeats", str(raw.repeats)]
    command += ["--min-time-s", str(raw.min_time_s), "--batch-sizes", *map(str, RAW_BATCH_SIZES)]
    limit_s = 60 + 2 * raw.repeats * raw.min_time_s * len(RAW_BATCH_SIZES)
    env = {**os.environ, **THREAD_ENV}
    try:
        completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=limit_s)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"the raw timing did not finish within {limit_s:.0f} s") from None
    if completed.returncode != 0:
        raise BenchmarkError(f"the raw timing failed: {completed.stderr.strip()[-1000:]}")
    result: dict[str, Any] = json.loads(completed.stdout)
    _log(f"raw rows/s {result['rows_per_s']} (CPUs {busy:.0%} busy before)")
    return {**result, "busy_before": busy}


def check_answers(server: Server) -> None:
    """Refuse to measure a model server whose answer is not the MLP's output for the row sent."""
    status, body = harness.request(server.port, ENDPOINT.method, ENDPOINT.path, ENDPOINT.body)
    expected = mlp.forward(mlp.make_layers(), request_row()[None, :])[0]
    values = output_values(body)
    if status != 200 or values is None or not np.allclose(values, expected, rtol=1e-4, atol=1e-4):
        raise BenchmarkError(f"{server.spec.label} answered {status} {body[:300]!r}, not the MLP's output")


def run_all(settings: Settings, overload: OverloadSettings, raw: RawSettings) -> Run:
    """Raw timing, the interleaved rounds, the overload run, raw timing again."""
    harness.require_tool("wrk")
    harness.require_tool("taskset")
    harness.check_cpus(settings.server_cpu, settings.load_cpu)
    run = Run()
    run.raw.append(time_raw(raw, settings.server_cpu, settings.quiet_wait_s))
    with tempfile.TemporaryDirectory(prefix="asyncserve-batching-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        servers = [
            stack.enter_context(harness.running_server(spec, settings.server_cpu, workdir, settings.ready_timeout_s))
            for spec in SPECS
        ]
        run.measurements.servers = servers
        _measure(servers, workdir, settings, run)
        _log(f"overload: c={overload.concurrency} for {overload.duration_s} s")
        run.overload = run_overload(_served(servers), ENDPOINT, overload, settings.load_cpu, workdir)
    run.raw.append(time_raw(raw, settings.server_cpu, settings.quiet_wait_s))
    return run


def _served(servers: Sequence[Server]) -> Server:
    return next(server for server in servers if server.spec.label == SERVED)


def _measure(servers: list[Server], workdir: Path, settings: Settings, run: Run) -> None:
    harness.check_all(servers, [ENDPOINT])
    for server in servers:
        if server.spec.label != BARE:
            check_answers(server)
        if server.spec.label in (SERVED, INTERPRETED):
            scrape.check_build(server, compiled=server.spec.label == SERVED)
    script = wrk.write_script(ENDPOINT, workdir)
    for server in servers:
        _log(f"warm-up {server.spec.label}")
        wrk.run_wrk(server.port, INFER_PATH, script, max(settings.concurrencies), settings.warmup_s, settings.load_cpu)
    for repeat in range(settings.repeats):
        shift = repeat % len(servers)
        for concurrency in settings.concurrencies:
            for server in [*servers[shift:], *servers[:shift]]:
                result = _run_once(server, script, concurrency, settings, run)
                _log(f"{server.spec.label:>10} c={concurrency:<4} {_brief(result)}")
                run.measurements.runs.setdefault((server.spec.label, ENDPOINT.label, concurrency), []).append(result)


def _run_once(server: Server, script: Path, concurrency: int, settings: Settings, run: Run) -> WrkResult:
    """One wrk run once the CPUs are quiet; for asyncserve, with its metrics before and after."""
    busy_before = harness.wait_for_quiet(settings.quiet_wait_s) if settings.quiet_wait_s > 0 else float("nan")
    served = server.spec.label == SERVED
    before = scrape.scrape(server.port) if served else {}
    threads_before = procstat.thread_cpu_s(server.pid)
    cpu_before = harness.process_cpu_s(server.pid)
    result = wrk.run_wrk(server.port, INFER_PATH, script, concurrency, settings.duration_s, settings.load_cpu)
    server_cpu_s = round(harness.process_cpu_s(server.pid) - cpu_before, 2)
    if served:
        threads = procstat.thread_cpu_delta(threads_before, procstat.thread_cpu_s(server.pid))
        _add(run.thread_cpu_s.setdefault(concurrency, {}), threads)
        _add(run.metrics.setdefault(concurrency, {}), scrape.delta(before, scrape.scrape(server.port)))
        run.metrics_seconds[concurrency] = run.metrics_seconds.get(concurrency, 0.0) + result.duration_s
    return dataclasses.replace(result, server_cpu_s=server_cpu_s, busy_before=busy_before)


def _add(totals: dict[Any, float], added: dict[Any, float]) -> None:
    for key, value in added.items():
        totals[key] = totals.get(key, 0.0) + value


def _brief(result: WrkResult) -> str:
    return (
        f"{result.rps:8.0f} req/s  p50 {result.p50_ms:8.3f} ms  p99 {result.p99_ms:8.3f} ms  "
        f"cpu {result.cpu_share:4.2f}  errors {result.errors}"
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Results


def raw_rows_per_s(raw_runs: Sequence[dict[str, Any]]) -> dict[int, float]:
    """The median over every timing, before and after, at each batch size."""
    return {
        size: round(float(np.median([v for raw in raw_runs for v in raw["runs"][str(size)]])), 1)
        for size in RAW_BATCH_SIZES
    }


def http_ceiling(run: Run, concurrencies: Sequence[int], *, per_cpu_s: bool = False) -> float:
    """H: the bare app's req/s (or requests per CPU second) at c=64, or at its best concurrency without c=64."""

    def value(concurrency: int) -> float:
        summary = run.measurements.summary(BARE, ENDPOINT.label, concurrency)
        return summary.requests_per_cpu_s if per_cpu_s else summary.rps

    return value(TARGET_CONCURRENCY) if TARGET_CONCURRENCY in concurrencies else max(map(value, concurrencies))


def results(run: Run, settings: Settings, overload: OverloadSettings, facts: dict[str, Any]) -> dict[str, Any]:
    raw = raw_rows_per_s(run.raw)
    h = http_ceiling(run, settings.concurrencies)
    limit = 1 / (1 / raw[32] + 1 / h)
    h_cpu = http_ceiling(run, settings.concurrencies, per_cpu_s=True)
    limit_cpu = 1 / (1 / raw[32] + 1 / h_cpu)
    rows = [_row(run, concurrency, limit, limit_cpu) for concurrency in settings.concurrencies]
    data = {
        "benchmark": "batching",
        "machine": facts,
        "settings": {
            **measure.settings_dict(settings),
            "overload": dataclasses.asdict(overload),
            "servers": {spec.label: " ".join(spec.command).replace("{port}", "<port>") for spec in SPECS},
            "thread_env": THREAD_ENV,
            "request_bytes": len(ENDPOINT.body or b""),
        },
        "exit_codes": run.measurements.exit_codes,
        "raw": {"rows_per_s": {str(k): v for k, v in raw.items()}, "timings": run.raw},
        "H": h,
        "L": round(limit, 1),
        "H_per_cpu_s": h_cpu,
        "L_per_cpu_s": round(limit_cpu, 1),
        "rows": rows,
        "overload": run.overload,
    }
    data["targets"] = targets(data, raw[1])
    return data


def _row(run: Run, concurrency: int, limit: float, limit_cpu: float) -> dict[str, Any]:
    summaries = {spec.label: run.measurements.summary(spec.label, ENDPOINT.label, concurrency) for spec in SPECS}
    served, interpreted, fastapi = summaries[SERVED], summaries[INTERPRETED], summaries[FASTAPI]
    metrics = run.metrics.get(concurrency, {})
    return {
        "concurrency": concurrency,
        **{label: summary.as_dict() for label, summary in summaries.items()},
        "served_to_L": round(served.rps / limit, 3),
        "served_to_L_per_cpu_s": round(served.requests_per_cpu_s / limit_cpu, 3),
        "interpreted_to_L": round(interpreted.rps / limit, 3),
        "interpreted_to_L_per_cpu_s": round(interpreted.requests_per_cpu_s / limit_cpu, 3),
        "served_cpu_us_per_request": _cpu_per_request(run, concurrency),
        "served_to_fastapi": round(served.rps / fastapi.rps, 2) if fastapi.rps > 0 else None,
        "batching": scrape.batching_summary(metrics, mlp.MLP.name, run.metrics_seconds.get(concurrency, 0.0)),
        "loop_lag": scrape.loop_lag_summary(metrics),
        "runs": {
            label: [r.as_dict() for r in run.measurements.runs[(label, ENDPOINT.label, concurrency)]]
            for label in summaries
        },
    }


def _cpu_per_request(run: Run, concurrency: int) -> dict[str, float]:
    """asyncserve's CPU microseconds per request, by thread: ``main`` is the event loop, the executor's are named."""
    requests = sum(result.requests for result in run.measurements.runs[(SERVED, ENDPOINT.label, concurrency)])
    threads = run.thread_cpu_s.get(concurrency, {})
    return {name: round(1e6 * seconds / requests, 1) for name, seconds in threads.items() if seconds > 0 and requests}


def targets(data: dict[str, Any], r1: float) -> list[dict[str, Any]]:
    """Each target of the issue: what was measured, the bound, and whether it holds."""
    rows = {row["concurrency"]: row for row in data["rows"]}
    found: list[dict[str, Any]] = []
    if TARGET_CONCURRENCY in rows:
        row = rows[TARGET_CONCURRENCY]
        served, interpreted, fastapi_c64 = row[SERVED]["rps"], row[INTERPRETED]["rps"], row[FASTAPI]["rps"]
        bound = 0.85 * data["L"]
        found.append(_target("c=64 throughput >= 0.85 x L", served, bound, served >= bound))
        interpreted_name = "(interpreted build) c=64 throughput >= 0.85 x L"
        found.append(_target(interpreted_name, interpreted, bound, interpreted >= bound))
        found.append(_target("c=64 throughput >= 3 x FastAPI", served, 3 * fastapi_c64, served >= 3 * fastapi_c64))
    if 1 in rows:
        bound_ms = 1000 / r1 + 1
        p50 = rows[1][SERVED]["p50_ms"]
        found.append(_target("c=1 p50 <= raw single-item latency + 1 ms", p50, bound_ms, p50 <= bound_ms))
    overload = data["overload"]
    past = overload["deadline"]["past_deadline_by_margin"]
    statuses_ok = set(overload["by_status"]) <= {"200", "503", "504"}
    found.append(_target("overload: no request held past its deadline", past, 0, past == 0 and statuses_ok))
    rss = overload["rss_mib"]
    found.append(_target("overload: memory flat (MiB growth)", rss["growth"], 16.0, rss["flat"]))
    return found


def _target(name: str, measured: float, bound: float, passed: bool) -> dict[str, Any]:
    return {"target": name, "measured": round(measured, 3), "bound": round(bound, 3), "pass": passed}


# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batching", description=(__doc__ or "").split("\n")[0])
    measure.add_arguments(parser, CONCURRENCIES)
    parser.add_argument("--overload-duration-s", type=int, help="seconds of the overload run (default 15, quick 5)")
    parser.add_argument("--overload-concurrency", type=int, default=1024, help="connections (default 1024)")
    parser.add_argument("--overload-timeout-s", type=float, default=0.05, help="X-Request-Timeout (default 0.05)")
    parser.add_argument("--raw-repeats", type=int, help="raw timings per batch size (default 5, quick 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = measure.resolve(args, CONCURRENCIES, CONCURRENCIES)
    overload = OverloadSettings(
        concurrency=args.overload_concurrency,
        duration_s=args.overload_duration_s or (5 if args.quick else 15),
        request_timeout_s=args.overload_timeout_s,
    )
    raw = RawSettings(repeats=args.raw_repeats or (3 if args.quick else 5), min_time_s=0.2 if args.quick else 0.5)
    missing = [name for name in ("fastapi", "pydantic") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"{', '.join(missing)} not installed; run: .venv/bin/pip install -r benchmarks/requirements.txt")
        return 2
    if not (COMPILED_BUILD / ".built").exists():
        print(f"no compiled build in {COMPILED_BUILD.relative_to(REPO)}; run: make compiled")
        return 2
    os.environ.update(THREAD_ENV)  # the servers inherit it
    facts = report.machine_facts(settings.server_cpu, settings.load_cpu)
    try:
        run = run_all(settings, overload, raw)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    report.record_end(facts)
    data = results(run, settings, overload, facts)
    markdown = batching_report.markdown(data)
    paths = [*report.write_results("batching", data, markdown, settings.output_dir)]
    plot = batching_report.write_plot(data, settings.output_dir / "batching.png")
    paths += [plot] if plot is not None else []
    print(markdown)
    print("written: " + ", ".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
