"""Benchmark A, the framework choice: a bare ASGI app, Starlette and FastAPI on the same uvicorn.

Each app serves the same echo endpoint (``POST /v2/models/echo/infer``) and a tiny JSON
(``GET /v2/health/ready``) under uvicorn with uvloop and httptools, one worker, no access log,
pinned to one core while wrk loads it from another. The table gives each framework's requests/s
and latency percentiles and their ratio to the bare app.

Usage::

    .venv/bin/pip install -r benchmarks/requirements.txt
    .venv/bin/python -m benchmarks.frameworks            # 10 s runs, 3 repeats, concurrency 64
    .venv/bin/python -m benchmarks.frameworks --quick    # a 2 s smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import endpoints, measure, report
from benchmarks.harness import BenchmarkError, ServerSpec, uvicorn_command
from benchmarks.measure import Measurements, Settings

BASELINE = "bare"
SERVERS = (
    ServerSpec(BASELINE, uvicorn_command("benchmarks.bare_asgi:app")),
    ServerSpec("starlette", uvicorn_command("benchmarks.starlette_app:app")),
    ServerSpec("fastapi", uvicorn_command("benchmarks.fastapi_app:app")),
)
ENDPOINTS = (endpoints.V2_INFER, endpoints.READY)
CONCURRENCIES = (64,)
UVICORN_OPTIONS = "--loop uvloop --http httptools --no-access-log --workers 1"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.frameworks", description=(__doc__ or "").split("\n\n")[0]
    )
    measure.add_arguments(parser, CONCURRENCIES)
    settings = measure.resolve(parser.parse_args(argv), CONCURRENCIES, CONCURRENCIES)
    missing = [name for name in ("starlette", "fastapi", "pydantic") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"{', '.join(missing)} not installed; run: .venv/bin/pip install -r benchmarks/requirements.txt")
        return 2
    facts = report.machine_facts(settings.server_cpu, settings.load_cpu)
    try:
        measurements = measure.measure(SERVERS, measure.grid(ENDPOINTS, settings.concurrencies), settings)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    report.record_end(facts)
    data = results(measurements, settings, facts)
    paths = report.write_results("frameworks", data, markdown(data), settings.output_dir)
    print(report.relative_paths(markdown(data)))
    print("written: " + ", ".join(str(path) for path in paths))
    return 0


def results(measurements: Measurements, settings: Settings, facts: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for endpoint in ENDPOINTS:
        for concurrency in settings.concurrencies:
            baseline = measurements.summary(BASELINE, endpoint.label, concurrency)
            for spec in SERVERS:
                summary = measurements.summary(spec.label, endpoint.label, concurrency)
                rows.append(
                    {
                        "endpoint": f"{endpoint.method} {endpoint.path}",
                        "framework": spec.label,
                        "concurrency": concurrency,
                        **summary.as_dict(),
                        "ratio_to_bare": report.ratios(summary, baseline),
                        "runs": [run.as_dict() for run in measurements.runs[(spec.label, endpoint.label, concurrency)]],
                    }
                )
    return {
        "benchmark": "frameworks",
        "machine": facts,
        "settings": {**measure.settings_dict(settings), "uvicorn": UVICORN_OPTIONS},
        "exit_codes": measurements.exit_codes,
        "rows": rows,
    }


def markdown(data: dict[str, Any]) -> str:
    headers = ["endpoint", "c", "framework", "req/s", "p50 ms", "p99 ms", "req/s ÷ bare", "p50 ÷ bare", "p99 ÷ bare"]
    headers += ["req/CPU-s ÷ bare", "server CPU", "req/s min-max", "errors"]
    table = report.markdown_table(headers, [_row(row) for row in data["rows"]])
    settings = data["settings"]
    return (
        "\n\n".join(
            [
                "# Framework choice: bare ASGI vs Starlette vs FastAPI on uvicorn",
                report.facts_markdown(data["machine"]),
                measure.method_markdown(settings) + f" uvicorn `{settings['uvicorn']}`.",
                table,
                "Ratios are framework / bare: req/s and req/CPU-s below 1, and latency above 1, are slower than "
                "the bare ASGI app. " + report.LEGEND,
                report.load_warning(row["load_cpu_share"] for row in data["rows"]),
            ]
        )
        + "\n"
    )


def _row(row: dict[str, Any]) -> list[str]:
    ratio = row["ratio_to_bare"]
    return [
        row["endpoint"],
        str(row["concurrency"]),
        row["framework"],
        f"{row['rps']:,.0f}",
        report.ms(row["p50_ms"]),
        report.ms(row["p99_ms"]),
        f"{ratio['rps']:.2f}",
        f"{ratio['p50']:.2f}",
        f"{ratio['p99']:.2f}",
        f"{ratio['requests_per_cpu_s']:.2f}",
        f"{row['cpu_share']:.2f}",
        f"{row['rps_min']:,.0f}-{row['rps_max']:,.0f}",
        str(row["errors"]),
    ]


if __name__ == "__main__":
    sys.exit(main())
