"""Benchmark B, full-stack overhead: asyncserve serving a trivial model vs a bare ASGI app.

``asyncserve serve benchmarks.trivial:service --workers 1`` and ``uvicorn benchmarks.bare_asgi:app``
(uvloop, httptools, no access log, one worker) both compute ``y = x * 2`` on four FP32 values;
the bare app decodes, computes and encodes inline, with nothing around it. Both are pinned to
one core while wrk loads them from another, over the V2 and the plain JSON endpoints at several
concurrencies. Each row gives the ratio served / bare.

Usage::

    .venv/bin/python -m benchmarks.overhead                    # 10 s runs, 3 repeats, c = 1 16 64 256
    .venv/bin/python -m benchmarks.overhead --quick            # a 2 s smoke run at c = 1 and 64
    .venv/bin/python -m benchmarks.overhead --concurrency 64 --duration-s 5
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import endpoints, measure, report
from benchmarks.harness import BenchmarkError, ServerSpec, asyncserve_command, uvicorn_command
from benchmarks.measure import Measurements, Settings

BASELINE = "bare"
SERVED = "asyncserve"
ENDPOINTS = (endpoints.V2_INFER, endpoints.V1_PREDICT)
CONCURRENCIES = (1, 16, 64, 256)
QUICK_CONCURRENCIES = (1, 64)


def served_command(extra_args: Sequence[str], uvicorn_app: str | None) -> tuple[str, ...]:
    """``asyncserve serve benchmarks.trivial:service``, or ``uvicorn_app`` to try the harness without it."""
    if uvicorn_app is not None:
        return uvicorn_command(uvicorn_app)
    return asyncserve_command("benchmarks.trivial:service", *extra_args)


def servers(command: Sequence[str]) -> tuple[ServerSpec, ...]:
    return ServerSpec(BASELINE, uvicorn_command("benchmarks.bare_asgi:app")), ServerSpec(SERVED, tuple(command))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = measure.resolve(args, CONCURRENCIES, QUICK_CONCURRENCIES)
    command = served_command(shlex.split(args.served_args), args.served_uvicorn_app)
    facts = report.machine_facts(settings.server_cpu, settings.load_cpu)
    try:
        measurements = measure.measure(servers(command), measure.grid(ENDPOINTS, settings.concurrencies), settings)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    report.record_end(facts)
    data = results(measurements, settings, facts, command)
    paths = report.write_results("overhead", data, markdown(data), settings.output_dir)
    print(report.relative_paths(markdown(data)))
    print("written: " + ", ".join(str(path) for path in paths))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=(__doc__ or "").split("\n\n")[0])
    measure.add_arguments(parser, CONCURRENCIES)
    parser.add_argument("--served-args", default="", help="extra arguments for `asyncserve serve`, as one string")
    parser.add_argument(
        "--served-uvicorn-app",
        metavar="MODULE:APP",
        help="serve this ASGI app with uvicorn in asyncserve's place (to try the harness itself)",
    )
    return parser


def results(
    measurements: Measurements, settings: Settings, facts: dict[str, Any], command: Sequence[str]
) -> dict[str, Any]:
    rows = [
        _result_row(measurements, endpoint.label, f"{endpoint.method} {endpoint.path}", concurrency)
        for endpoint in ENDPOINTS
        for concurrency in settings.concurrencies
    ]
    return {
        "benchmark": "overhead",
        "machine": facts,
        "settings": {
            **measure.settings_dict(settings),
            "bare": "uvicorn benchmarks.bare_asgi:app --loop uvloop --http httptools --no-access-log --workers 1",
            "served": " ".join(command).replace("{port}", "<port>"),
        },
        "exit_codes": measurements.exit_codes,
        "rows": rows,
    }


def _result_row(measurements: Measurements, label: str, endpoint: str, concurrency: int) -> dict[str, Any]:
    bare = measurements.summary(BASELINE, label, concurrency)
    served = measurements.summary(SERVED, label, concurrency)
    return {
        "endpoint": endpoint,
        "concurrency": concurrency,
        BASELINE: bare.as_dict(),
        SERVED: served.as_dict(),
        "ratio_served_to_bare": report.ratios(served, bare),
        "runs": {
            server: [run.as_dict() for run in measurements.runs[(server, label, concurrency)]]
            for server in (BASELINE, SERVED)
        },
    }


def markdown(data: dict[str, Any]) -> str:
    headers = ["endpoint", "c", "bare req/s", "served req/s", "req/s ratio", "bare p50 ms", "served p50 ms"]
    headers += ["p50 ratio", "bare p99 ms", "served p99 ms", "p99 ratio", "req/CPU-s ratio", "server CPU bare / served"]
    headers += ["errors bare / served"]
    settings = data["settings"]
    parts = [
        "# Full-stack overhead: asyncserve vs a bare ASGI app",
        report.facts_markdown(data["machine"]),
        measure.method_markdown(settings) + f"\n\n- bare: `{settings['bare']}`\n- served: `{settings['served']}`",
        report.markdown_table(headers, [_row(row) for row in data["rows"]]),
        "Ratios are served / bare: a req/s or req/CPU-s ratio below 1, and a latency ratio above 1, are "
        "asyncserve's overhead. " + report.LEGEND,
        report.load_warning(row[server]["load_cpu_share"] for row in data["rows"] for server in (BASELINE, SERVED)),
    ]
    return "\n\n".join(parts) + "\n"


def _row(row: dict[str, Any]) -> list[str]:
    bare, served, ratio = row[BASELINE], row[SERVED], row["ratio_served_to_bare"]
    return [
        row["endpoint"],
        str(row["concurrency"]),
        f"{bare['rps']:,.0f}",
        f"{served['rps']:,.0f}",
        f"{ratio['rps']:.2f}",
        report.ms(bare["p50_ms"]),
        report.ms(served["p50_ms"]),
        f"{ratio['p50']:.2f}",
        report.ms(bare["p99_ms"]),
        report.ms(served["p99_ms"]),
        f"{ratio['p99']:.2f}",
        f"{ratio['requests_per_cpu_s']:.2f}",
        f"{bare['cpu_share']:.2f} / {served['cpu_share']:.2f}",
        f"{bare['errors']} / {served['errors']}",
    ]


if __name__ == "__main__":
    sys.exit(main())
