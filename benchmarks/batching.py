"""The dynamic-batching benchmark: asyncserve serving a NumPy MLP on one core, against its limit and FastAPI.

In one run, with every server pinned to one core and wrk on another:

- R_b, the MLP's raw in-process throughput at batch sizes 1, 8, 32 and 64 (``benchmarks.mlp``),
  timed before and after the HTTP runs;
- H, the throughput of a bare ASGI app that decodes the same request and answers a same-sized
  output without the model (``benchmarks.bare_mlp``), so the limit of one core that pays for
  HTTP, JSON and the model is L = 1 / (1/R32 + 1/H);
- ``asyncserve serve benchmarks.mlp:service --executor-workers 1`` (the asyncserve installed, or
  with ``--checkout LABEL=PATH ...`` one server per checkout, to compare commits) and a FastAPI
  service that runs the model per request in its thread pool (``benchmarks.fastapi_mlp``) at
  several concurrencies, interleaved; asyncserve's ``/metrics`` around each run give its batch
  sizes and close reasons;
- an overload run on the (first) asyncserve (1024 connections, ``X-Request-Timeout: 0.05``;
  ``benchmarks.overload``).

Results go to ``benchmarks/results/batching.{json,md,png}`` (``--name`` changes the file names);
``benchmarks/BATCHING.md`` explains them.

Usage::

    .venv/bin/pip install -r benchmarks/requirements.txt -r benchmarks/requirements-plot.txt
    .venv/bin/python -m benchmarks.batching            # ~12 min: 10 s runs, 3 repeats, c = 1 8 64 256
    .venv/bin/python -m benchmarks.batching --quick    # ~2 min: 2 s runs, 1 repeat
    .venv/bin/python -m benchmarks.batching --checkout new=. old=../asyncserve-old --concurrency 64 --name ab
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

from benchmarks import batching_report, checkouts, harness, measure, mlp, procstat, report, scrape, wrk
from benchmarks.checkouts import Checkout
from benchmarks.harness import REPO, BenchmarkError, Endpoint, Server, ServerSpec, asyncserve_command, uvicorn_command
from benchmarks.measure import Measurements, Scenario, Settings
from benchmarks.overload import OverloadSettings, run_overload
from benchmarks.wrk import WrkResult

BARE, SERVED, FASTAPI = "bare", "asyncserve", "fastapi"
"""SERVED is the asyncserve installed; with checkouts, each asyncserve server is labelled by its checkout."""
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


def served_command(launcher: Sequence[str] = ()) -> tuple[str, ...]:
    """``asyncserve serve benchmarks.mlp:service`` with one executor worker, as uvicorn runs the baselines."""
    return asyncserve_command("benchmarks.mlp:service", "--executor-workers", "1", launcher=launcher)


def server_specs(compared: Sequence[Checkout] = ()) -> tuple[ServerSpec, ...]:
    """The servers, as data: the bare app (H), asyncserve (installed, or one per checkout) and FastAPI."""
    served = [ServerSpec(c.label, served_command(c.launcher)) for c in compared] or [
        ServerSpec(SERVED, served_command())
    ]
    bare = ServerSpec(BARE, uvicorn_command("benchmarks.bare_mlp:app"))
    return bare, *served, ServerSpec(FASTAPI, uvicorn_command("benchmarks.fastapi_mlp:app"))


def served_labels(specs: Sequence[ServerSpec]) -> tuple[str, ...]:
    """The asyncserve servers among ``specs``; the first is the one the targets and the overload run are about."""
    return tuple(spec.label for spec in specs if spec.label not in (BARE, FASTAPI))


def scenarios(concurrencies: Sequence[int]) -> tuple[Scenario, ...]:
    return measure.grid([ENDPOINT], concurrencies)


MetricsKey = tuple[str, int]
"""(asyncserve server label, concurrency)."""


@dataclass
class Run:
    """Everything one benchmark run measured."""

    specs: tuple[ServerSpec, ...]
    raw: list[dict[str, Any]] = field(default_factory=list)
    measurements: Measurements = field(default_factory=Measurements)
    metrics: dict[MetricsKey, scrape.Samples] = field(default_factory=dict)
    """Each asyncserve's metrics deltas summed over its runs at each concurrency."""
    metrics_seconds: dict[MetricsKey, float] = field(default_factory=dict)
    thread_cpu_s: dict[MetricsKey, dict[str, float]] = field(default_factory=dict)
    """Each asyncserve's CPU seconds by thread (``main`` is the event loop), summed over its runs at a concurrency."""
    overload: dict[str, Any] = field(default_factory=dict)

    @property
    def served(self) -> tuple[str, ...]:
        return served_labels(self.specs)


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


def run_all(specs: Sequence[ServerSpec], settings: Settings, overload: OverloadSettings, raw: RawSettings) -> Run:
    """Raw timing, the interleaved rounds, the overload run, raw timing again."""
    harness.require_tool("wrk")
    harness.require_tool("taskset")
    harness.check_cpus(settings.server_cpu, settings.load_cpu)
    run = Run(tuple(specs))
    run.raw.append(time_raw(raw, settings.server_cpu, settings.quiet_wait_s))
    with tempfile.TemporaryDirectory(prefix="asyncserve-batching-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        servers = run.measurements.servers = measure.start_servers(stack, specs, settings, workdir)
        _measure(servers, workdir, settings, run)
        first = next(server for server in servers if server.spec.label == run.served[0])
        _log(f"overload {first.spec.label}: c={overload.concurrency} for {overload.duration_s} s")
        run.overload = run_overload(first, ENDPOINT, overload, settings.load_cpu, workdir)
    run.raw.append(time_raw(raw, settings.server_cpu, settings.quiet_wait_s))
    return run


def _measure(servers: list[Server], workdir: Path, settings: Settings, run: Run) -> None:
    harness.check_all(servers, [ENDPOINT])
    for server in servers:
        if server.spec.label != BARE:
            check_answers(server)
    todo = scenarios(settings.concurrencies)
    scripts = measure.write_scripts(todo, workdir)
    measure.warm_up(servers, todo, scripts, settings)

    def run_once(server: Server, scenario: Scenario, number: int) -> WrkResult:
        result = _run_once(server, scripts[scenario.endpoint.label], scenario.concurrency, settings, run)
        _log(f"round {number} {server.spec.label:>10} c={scenario.concurrency:<4} {_brief(result)}")
        return result

    run.measurements.runs = measure.interleave(servers, todo, settings.repeats, run_once)


def _run_once(server: Server, script: Path, concurrency: int, settings: Settings, run: Run) -> WrkResult:
    """One wrk run once the CPUs are quiet; for asyncserve, with its metrics before and after."""
    busy_before = harness.wait_for_quiet(settings.quiet_wait_s) if settings.quiet_wait_s > 0 else float("nan")
    served = server.spec.label in run.served
    before = scrape.scrape(server.port) if served else {}
    threads_before = procstat.thread_cpu_s(server.pid)
    cpu_before = harness.process_cpu_s(server.pid)
    result = wrk.run_wrk(server.port, INFER_PATH, script, concurrency, settings.duration_s, settings.load_cpu)
    server_cpu_s = round(harness.process_cpu_s(server.pid) - cpu_before, 2)
    if served:
        key = (server.spec.label, concurrency)
        threads = procstat.thread_cpu_delta(threads_before, procstat.thread_cpu_s(server.pid))
        _add(run.thread_cpu_s.setdefault(key, {}), threads)
        _add(run.metrics.setdefault(key, {}), scrape.delta(before, scrape.scrape(server.port)))
        run.metrics_seconds[key] = run.metrics_seconds.get(key, 0.0) + result.duration_s
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


def limit(r32: float, h: float) -> float:
    """L = 1 / (1/R32 + 1/H): one core that pays for HTTP and JSON as the bare app does, and for the model."""
    return 1 / (1 / r32 + 1 / h)


def results(run: Run, settings: Settings, overload: OverloadSettings, facts: dict[str, Any]) -> dict[str, Any]:
    raw = raw_rows_per_s(run.raw)
    h = http_ceiling(run, settings.concurrencies)
    h_cpu = http_ceiling(run, settings.concurrencies, per_cpu_s=True)
    data = {
        "benchmark": "batching",
        "machine": facts,
        "settings": {
            **measure.settings_dict(settings),
            "overload": dataclasses.asdict(overload),
            "servers": {spec.label: " ".join(spec.command).replace("{port}", "<port>") for spec in run.specs},
            "thread_env": THREAD_ENV,
            "request_bytes": len(ENDPOINT.body or b""),
        },
        "asyncserve": list(run.served),
        "exit_codes": run.measurements.exit_codes,
        "raw": {"rows_per_s": {str(k): v for k, v in raw.items()}, "timings": run.raw},
        "H": h,
        "L": round(limit(raw[32], h), 1),
        "H_per_cpu_s": h_cpu,
        "L_per_cpu_s": round(limit(raw[32], h_cpu), 1),
        "rows": [_row(run, concurrency, raw[32]) for concurrency in settings.concurrencies],
        "overload": run.overload,
    }
    data["targets"] = targets(data, raw[1])
    return data


def _row(run: Run, concurrency: int, r32: float) -> dict[str, Any]:
    labels = [spec.label for spec in run.specs]
    summaries = {label: run.measurements.summary(label, ENDPOINT.label, concurrency) for label in labels}
    runs = {label: run.measurements.runs[(label, ENDPOINT.label, concurrency)] for label in labels}
    h, h_cpu = summaries[BARE].rps, summaries[BARE].requests_per_cpu_s
    row_limit, fastapi = limit(r32, h), summaries[FASTAPI].rps
    keys = {label: (label, concurrency) for label in run.served}
    return {
        "concurrency": concurrency,
        **{label: summary.as_dict() for label, summary in summaries.items()},
        "to_L": {label: round(summaries[label].rps / row_limit, 3) for label in run.served},
        "to_L_per_cpu_s": {
            label: round(summaries[label].requests_per_cpu_s / limit(r32, h_cpu), 3) for label in run.served
        },
        "to_fastapi": {label: _div(summaries[label].rps, fastapi) for label in run.served},
        "cpu_us_per_request": {label: _cpu_per_request(run, label, concurrency) for label in run.served},
        "batching": {
            label: scrape.batching_summary(run.metrics.get(key, {}), mlp.MLP.name, run.metrics_seconds.get(key, 0.0))
            for label, key in keys.items()
        },
        "loop_lag": {label: scrape.loop_lag_summary(run.metrics.get(key, {})) for label, key in keys.items()},
        "rounds": rounds(runs, run.served, r32),
        "runs": {label: [r.as_dict() for r in label_runs] for label, label_runs in runs.items()},
    }


def rounds(runs: dict[str, list[WrkResult]], served: Sequence[str], r32: float) -> list[dict[str, Any]]:
    """Each round's req/s, each asyncserve's ratio to that round's L (from that round's H), and the first
    asyncserve's ratio to each other one: servers measured minutes apart at most."""
    out = []
    for index in range(min(map(len, runs.values()))):
        rps = {label: label_runs[index].rps for label, label_runs in runs.items()}
        round_limit = limit(r32, rps[BARE]) if rps[BARE] > 0 else float("nan")
        out.append({
            "round": index + 1,
            "rps": rps,
            "L": round(round_limit, 1),
            "to_L": {label: round(rps[label] / round_limit, 3) for label in served},
            "first_to": {label: _div(rps[served[0]], rps[label]) for label in served[1:]},
        })  # fmt: skip
    return out


def _div(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def _cpu_per_request(run: Run, label: str, concurrency: int) -> dict[str, float]:
    """asyncserve's CPU microseconds per request, by thread: ``main`` is the event loop, the executor's are named."""
    requests = sum(result.requests for result in run.measurements.runs[(label, ENDPOINT.label, concurrency)])
    threads = run.thread_cpu_s.get((label, concurrency), {})
    return {name: round(1e6 * seconds / requests, 1) for name, seconds in threads.items() if seconds > 0 and requests}


def targets(data: dict[str, Any], r1: float) -> list[dict[str, Any]]:
    """Each target of the issue: what was measured, the bound, and whether it holds (about the first asyncserve)."""
    rows = {row["concurrency"]: row for row in data["rows"]}
    served: list[str] = data["asyncserve"]
    first = served[0]
    found: list[dict[str, Any]] = []
    if TARGET_CONCURRENCY in rows:
        row = rows[TARGET_CONCURRENCY]
        bound = 0.85 * data["L"]
        for label in served:
            name = "c=64 throughput >= 0.85 x L" + (f" ({label})" if len(served) > 1 else "")
            found.append(_target(name, row[label]["rps"], bound, row[label]["rps"] >= bound))
        fastapi = 3 * row[FASTAPI]["rps"]
        found.append(
            _target("c=64 throughput >= 3 x FastAPI", row[first]["rps"], fastapi, row[first]["rps"] >= fastapi)
        )
        for label in served[1:]:
            ratios = [r["first_to"][label] for r in row["rounds"] if r["first_to"][label] is not None]
            median = float(np.median(ratios)) if ratios else float("nan")
            found.append(_target(f"c=64 req/s {first} / {label} >= 1 (median of the rounds)", median, 1.0, median >= 1))
    if 1 in rows:
        bound_ms = 1000 / r1 + 1
        p50 = rows[1][first]["p50_ms"]
        found.append(_target("c=1 p50 <= raw single-item latency + 1 ms", p50, bound_ms, p50 <= bound_ms))
    return found + _overload_targets(data["overload"])


def _overload_targets(overload: dict[str, Any]) -> list[dict[str, Any]]:
    past = overload["deadline"]["past_deadline_by_margin"]
    statuses_ok = set(overload["by_status"]) <= {"200", "503", "504"}
    rss = overload["rss_mib"]
    return [
        _target("overload: no request held past its deadline", past, 0, past == 0 and statuses_ok),
        _target("overload: memory flat (MiB growth)", rss["growth"], 16.0, rss["flat"]),
    ]


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
    checkouts.add_argument(parser, "asyncserve")
    parser.add_argument("--name", default="batching", help="the results' file name, without .json/.md/.png")
    parser.add_argument("--tables-from", type=Path, help="no run: write the Markdown and the plot from this JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = measure.resolve(args, CONCURRENCIES, CONCURRENCIES)
    if args.tables_from is not None:
        return _write(json.loads(args.tables_from.read_text()), settings.output_dir, args.name, args.checkout)
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
    specs = server_specs(args.checkout)
    if len({spec.label for spec in specs}) != len(specs):
        print(f"the checkouts' labels must differ from each other and from {BARE} and {FASTAPI}")
        return 2
    os.environ.update(THREAD_ENV)  # the servers inherit it
    facts = report.machine_facts(settings.server_cpu, settings.load_cpu)
    try:
        compared = checkouts.describe(args.checkout)
        run = run_all(specs, settings, overload, raw)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    report.record_end(facts)
    data = {**results(run, settings, overload, facts), "checkouts": compared}
    return _write(data, settings.output_dir, args.name, args.checkout)


def _write(data: dict[str, Any], directory: Path, name: str, compared: Sequence[Checkout]) -> int:
    markdown = batching_report.markdown(data, plot=f"{name}.png")
    paths = [*report.write_results(name, data, markdown, directory, checkouts.placeholders(compared))]
    plot = batching_report.write_plot(data, directory / f"{name}.png")
    paths += [plot] if plot is not None else []
    print(report.relative_paths(markdown, checkouts.placeholders(compared)))
    print(
        "written: "
        + ", ".join(str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path) for path in paths)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
