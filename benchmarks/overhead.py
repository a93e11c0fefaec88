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

With ``--checkout LABEL=PATH ...`` one asyncserve server per checkout (a ``git worktree`` at some
commit) runs beside the bare app, interleaved, and the table compares each with the first checkout;
``--traced LABEL`` also runs that checkout with tracing on, its spans exported to ``--otlp-endpoint``
(start a collector there, ``python -m benchmarks.otlp_sink``)::

    git worktree add ../parent HEAD~1
    .venv/bin/python -m benchmarks.overhead --checkout parent=../parent branch=. --traced branch \
        --concurrency 64 --duration-s 5 --name overhead-tracing
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import checkouts, endpoints, measure, report
from benchmarks.checkouts import Checkout
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


def checkout_servers(variants: Sequence[Checkout], traced: Sequence[str], otlp_endpoint: str) -> tuple[ServerSpec, ...]:
    """The bare app, one server per checkout, and a traced one (``LABEL+otel``) per label in ``traced``."""
    specs = [ServerSpec(BASELINE, uvicorn_command("benchmarks.bare_asgi:app"))]
    for checkout in variants:
        command = asyncserve_command("benchmarks.trivial:service", launcher=checkout.launcher)
        specs.append(ServerSpec(checkout.label, command))
        if checkout.label in traced:
            launcher = ("env", f"ASYNCSERVE_OTLP_ENDPOINT={otlp_endpoint}", *checkout.launcher)
            specs.append(ServerSpec(f"{checkout.label}+otel", asyncserve_command("benchmarks.trivial:service",
                                                                                  launcher=launcher)))  # fmt: skip
    return tuple(specs)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = measure.resolve(args, CONCURRENCIES, QUICK_CONCURRENCIES)
    if args.checkout:
        return _compare_checkouts(args, settings)
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


def _compare_checkouts(args: argparse.Namespace, settings: Settings) -> int:
    specs = checkout_servers(args.checkout, args.traced, args.otlp_endpoint)
    facts = report.machine_facts(settings.server_cpu, settings.load_cpu)
    facts["checkouts"] = checkouts.describe(args.checkout)
    try:
        measurements = measure.measure(specs, measure.grid(ENDPOINTS, settings.concurrencies), settings)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    report.record_end(facts)
    labels = [spec.label for spec in specs[1:]]
    every = [BASELINE, *labels]
    rows = [
        {
            "endpoint": f"{endpoint.method} {endpoint.path}", "concurrency": concurrency,
            **{label: measurements.summary(label, endpoint.label, concurrency).as_dict() for label in every},
            "runs": {label: [run.as_dict() for run in measurements.runs[(label, endpoint.label, concurrency)]]
                     for label in every},
        }
        for endpoint in ENDPOINTS
        for concurrency in settings.concurrencies
    ]  # fmt: skip
    data = {"benchmark": "overhead-checkouts", "machine": facts, "settings": measure.settings_dict(settings),
            "servers": {spec.label: " ".join(spec.command) for spec in specs}, "labels": labels,
            "exit_codes": measurements.exit_codes, "rows": rows}  # fmt: skip
    text = checkouts_markdown(data)
    where = checkouts.placeholders(args.checkout)
    paths = report.write_results(args.name or "overhead-checkouts", data, text, settings.output_dir, where)
    print(report.relative_paths(text, where))
    print("written: " + ", ".join(str(path) for path in paths))
    return 0


def checkouts_markdown(data: dict[str, Any]) -> str:
    labels: list[str] = data["labels"]
    first = labels[0]
    headers = ["endpoint", "c", "bare req/s"] + [f"{label} req/s" for label in labels]
    headers += [f"{label} / {first} req/s" for label in labels[1:]] + [f"{label} p50 ms" for label in labels]
    headers += [f"{label} / {first} req/CPU-s" for label in labels[1:]]
    table = []
    for row in data["rows"]:
        cells = [row["endpoint"], str(row["concurrency"]), f"{row[BASELINE]['rps']:,.0f}"]
        cells += [f"{row[label]['rps']:,.0f}" for label in labels]
        cells += [f"{row[label]['rps'] / row[first]['rps']:.3f}" for label in labels[1:]]
        cells += [report.ms(row[label]["p50_ms"]) for label in labels]
        per_cpu = "requests_per_cpu_s"
        cells += [f"{row[label][per_cpu] / row[first][per_cpu]:.3f}" for label in labels[1:]]
        table.append(cells)
    servers = "\n".join(f"- {label}: `{command}`" for label, command in data["servers"].items())
    commits = "\n".join(f"- {label}: {c['commit']}" for label, c in data["machine"]["checkouts"].items())
    parts = [
        "# Full-stack overhead of checkouts, interleaved",
        report.facts_markdown(data["machine"]),
        measure.method_markdown(data["settings"]) + "\n\n" + servers + "\n\nCommits:\n" + commits,
        report.markdown_table(headers, table),
        f"Ratios are each checkout's median over {first}'s, from runs interleaved round by round; req/CPU-s (requests "
        "per second of the server's CPU time) is the steadier figure on a shared machine.",
    ]
    return "\n\n".join(parts) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=(__doc__ or "").split("\n\n")[0])
    measure.add_arguments(parser, CONCURRENCIES)
    parser.add_argument("--served-args", default="", help="extra arguments for `asyncserve serve`, as one string")
    checkouts.add_argument(parser, "asyncserve")
    parser.add_argument("--traced", nargs="+", default=[], metavar="LABEL", help="also run these checkouts traced")
    parser.add_argument("--otlp-endpoint", default="http://127.0.0.1:4318", help="where traced servers send spans")
    parser.add_argument("--name", help="results file name (with --checkout; default overhead-checkouts)")
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
