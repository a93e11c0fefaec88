"""Interleaved before/after of the HTTP-layer rewrite: asyncserve at two commits vs a bare ASGI app on uvicorn.

Each asyncserve variant is a checkout (a ``git worktree``) whose ``asyncserve`` package is imported
first (``src/asyncserve`` in the new layout, ``asyncserve`` in the old); ``benchmarks`` comes from
this repository. All servers of a group start together pinned to one core and idle while wrk, pinned
to the other, loads one of them: each round runs every server once, in the same order (A, B, C, A,
B, C, ...), so the machine's drift falls on all alike and ratios are taken within a round::

    git worktree add /tmp/asyncserve-old ef40070
    git worktree add /tmp/asyncserve-new 70d17ed
    python -m benchmarks.http_layer --new /tmp/asyncserve-new --old /tmp/asyncserve-old
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import batching, endpoints, harness, measure, report, wrk
from benchmarks.checkouts import Checkout
from benchmarks.harness import REPO, BenchmarkError, Endpoint, Server, ServerSpec

NEW, OLD, BARE = "new", "old", "bare"
_MARKER = "WRK_JSON "  # the line the done hook of benchmarks/wrk.py prints


@dataclass(frozen=True)
class Scenario:
    name: str
    group: str
    """Which servers: ``trivial`` (new, old, bare) or ``mlp`` (new, old)."""
    endpoint: Endpoint
    concurrency: int
    rounds: int


def served(checkout: Checkout, service: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """``python -m asyncserve serve SERVICE`` with ``checkout``'s asyncserve first on the import path."""
    return harness.asyncserve_command(service, *extra, launcher=checkout.launcher)


def groups(new: Checkout, old: Checkout) -> dict[str, tuple[ServerSpec, ...]]:
    mlp_args = ("--executor-workers", "1")
    bare_env = ("env", f"PYTHONPATH={REPO}", "PYTHONSAFEPATH=1")
    return {
        "trivial": (
            ServerSpec(NEW, served(new, "benchmarks.trivial:service")),
            ServerSpec(OLD, served(old, "benchmarks.trivial:service")),
            ServerSpec(BARE, (*bare_env, *harness.uvicorn_command("benchmarks.bare_asgi:app"))),
        ),
        "mlp": (
            ServerSpec(NEW, served(new, "benchmarks.mlp:service", mlp_args)),
            ServerSpec(OLD, served(old, "benchmarks.mlp:service", mlp_args)),
        ),
    }


def scenarios(rounds: int, mlp_rounds: int, concurrencies: Sequence[int]) -> list[Scenario]:
    trivial = [Scenario(f"v1 predict c={c}", "trivial", endpoints.V1_PREDICT, c, rounds) for c in concurrencies]
    mlp = [Scenario("mlp v2 infer c=64", "mlp", batching.ENDPOINT, 64, mlp_rounds)] if mlp_rounds else []
    return trivial + mlp


def run_once(server: Server, scenario: Scenario, script: Path, args: argparse.Namespace) -> dict[str, Any]:
    busy = harness.wait_for_quiet(args.quiet_wait_s)
    wrk.run_command(server.port, scenario.endpoint.path, script, scenario.concurrency, args.warmup_s, args.load_cpu)
    cpu_before = harness.process_cpu_s(server.pid)
    stdout, load_cpu_s = wrk.run_command(
        server.port, scenario.endpoint.path, script, scenario.concurrency, args.duration_s, args.load_cpu
    )
    server_cpu_s = harness.process_cpu_s(server.pid) - cpu_before
    line = next((x for x in stdout.splitlines() if x.startswith(_MARKER)), None)
    if line is None:
        raise BenchmarkError(f"wrk printed no summary:\n{stdout[:1000]}")
    raw: dict[str, Any] = json.loads(line[len(_MARKER) :])
    result = wrk.result_from_summary(raw)
    return {
        "server": server.spec.label,
        "rps": result.rps,
        "requests": result.requests,
        "duration_s": result.duration_s,
        "p50_ms": result.p50_ms,
        "p90_ms": result.p90_ms,
        "p99_ms": result.p99_ms,
        "socket_errors": raw["socket_errors"],
        "non_2xx": raw["status_errors"],
        "timeouts": raw["timeouts"],
        "server_cpu_s": round(server_cpu_s, 2),
        "requests_per_cpu_s": round(result.requests / server_cpu_s, 1) if server_cpu_s > 0 else None,
        "load_cpu_s": load_cpu_s,
        "busy_before": busy,
    }


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def round_ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    pairs = [(NEW, BARE), (OLD, BARE), (NEW, OLD)]
    ratios: dict[str, float | None] = {}
    for a, b in pairs:
        if a in runs and b in runs:
            ratios[f"rps {a}/{b}"] = _ratio(runs[a]["rps"], runs[b]["rps"])
            ratios[f"p50 {a}/{b}"] = _ratio(runs[a]["p50_ms"], runs[b]["p50_ms"])
            ratios[f"req/CPU-s {a}/{b}"] = _ratio(
                runs[a]["requests_per_cpu_s"] or 0, runs[b]["requests_per_cpu_s"] or 0
            )
    return ratios


def medians(rounds: list[dict[str, Any]]) -> dict[str, float]:
    keys = rounds[0]["ratios"].keys()
    result: dict[str, float] = {}
    for key in keys:
        values = [r["ratios"][key] for r in rounds if r["ratios"][key] is not None]
        if values:
            result[key] = round(statistics.median(values), 3)
    for server in rounds[0]["runs"]:
        result[f"rps {server}"] = round(statistics.median(r["runs"][server]["rps"] for r in rounds), 1)
        result[f"p50_ms {server}"] = round(statistics.median(r["runs"][server]["p50_ms"] for r in rounds), 3)
    return result


def run_group(
    specs: Sequence[ServerSpec], todo: Sequence[Scenario], args: argparse.Namespace, workdir: Path
) -> list[dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(harness.running_server(spec, args.server_cpu, workdir, args.ready_timeout_s))
            for spec in specs
        ]
        return [run_scenario(servers, scenario, args, workdir) for scenario in todo]


def run_scenario(
    servers: Sequence[Server], scenario: Scenario, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """The rounds of one scenario, in a fixed order (A, B, C, A, B, C, ...): ratios are taken within a round."""
    harness.check_all(servers, [scenario.endpoint])
    script = wrk.write_script(scenario.endpoint, workdir)

    def measured(server: Server, _: measure.Scenario, number: int) -> dict[str, Any]:
        run = run_once(server, scenario, script, args)
        print(f"{scenario.name} round {number} {run['server']:4s} {run['rps']:8.0f} req/s "
              f"p50 {run['p50_ms']:.3f} ms errors {run['socket_errors']}/{run['non_2xx']}/"
              f"{run['timeouts']} cpu {run['server_cpu_s']}", flush=True)  # fmt: skip
        return run

    load = measure.Scenario(scenario.endpoint, scenario.concurrency)
    runs = measure.interleave(servers, [load], scenario.rounds, measured, rotate=False)
    by_server = {label: label_runs for (label, _, _), label_runs in runs.items()}
    rounds = []
    for index in range(scenario.rounds):
        round_runs = {label: label_runs[index] for label, label_runs in by_server.items()}
        rounds.append({"round": index + 1, "runs": round_runs, "ratios": round_ratios(round_runs)})
    return {
        "scenario": scenario.name,
        "endpoint": f"{scenario.endpoint.method} {scenario.endpoint.path}",
        "concurrency": scenario.concurrency,
        "rounds": rounds,
        "medians": medians(rounds),
    }


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _scenario_markdown(scenario: dict[str, Any]) -> str:
    servers = list(scenario["rounds"][0]["runs"])
    ratio_keys = [k for k in ("rps new/bare", "rps old/bare", "rps new/old") if k in scenario["medians"]]
    headers = ["round", *(f"{s} req/s" for s in servers), *ratio_keys, *(f"{s} p50 ms" for s in servers)]
    headers.append("errors (socket/non-2xx/timeout)")
    rows = []
    for r in scenario["rounds"]:
        runs = r["runs"]
        errors = ", ".join(
            f"{s} {runs[s]['socket_errors']}/{runs[s]['non_2xx']}/{runs[s]['timeouts']}" for s in servers
        )
        rows.append([
            str(r["round"]), *(f"{runs[s]['rps']:,.0f}" for s in servers),
            *(_fmt(r["ratios"][k]) for k in ratio_keys), *(_fmt(runs[s]["p50_ms"], ".3f") for s in servers), errors,
        ])  # fmt: skip
    m = scenario["medians"]
    rows.append([
        "**median**", *(f"{m[f'rps {s}']:,.0f}" for s in servers), *(f"**{_fmt(m.get(k))}**" for k in ratio_keys),
        *(_fmt(m[f"p50_ms {s}"], ".3f") for s in servers), "",
    ])  # fmt: skip
    p50_keys = [k for k in ("p50 new/bare", "p50 old/bare", "p50 new/old") if k in m]
    cpu_keys = [k for k in ("req/CPU-s new/bare", "req/CPU-s old/bare", "req/CPU-s new/old") if k in m]
    extra = ", ".join(f"{k} {_fmt(m[k])}" for k in p50_keys + cpu_keys)
    title = f"### {scenario['scenario']}: `{scenario['endpoint']}`, c={scenario['concurrency']}"
    return f"{title}\n\n{report.markdown_table(headers, rows)}\n\nMedian ratios of the rounds: {extra}."


def markdown(data: dict[str, Any]) -> str:
    """The tables of ``data``; the prose around them is written by hand in the results file."""
    return "\n\n".join(_scenario_markdown(s) for s in data["scenarios"]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_layer", description=__doc__)
    parser.add_argument("--new", type=Path, required=True, help="checkout of the new commit")
    parser.add_argument("--old", type=Path, required=True, help="checkout of the old commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mlp-rounds", type=int, default=1, help="rounds of the MLP scenario (0: none)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 1, 256])
    parser.add_argument("--duration-s", type=int, default=10)
    parser.add_argument("--warmup-s", type=int, default=2)
    parser.add_argument("--quiet-wait-s", type=float, default=5.0)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--ready-timeout-s", type=float, default=60.0)
    parser.add_argument("--output", type=Path, default=report.RESULTS_DIR / "http-layer.json")
    parser.add_argument("--tables-from", type=Path, help="only print the Markdown tables of this JSON file")
    args = parser.parse_args(argv)
    if args.tables_from is not None:
        print(markdown(json.loads(args.tables_from.read_text())), end="")
        return 0
    new, old = Checkout(NEW, args.new.resolve()), Checkout(OLD, args.old.resolve())
    specs = groups(new, old)
    todo = scenarios(args.rounds, args.mlp_rounds, args.concurrency)
    facts = report.machine_facts(args.server_cpu, args.load_cpu)
    try:
        harness.check_cpus(args.server_cpu, args.load_cpu)
        harness.require_tool("wrk")
        imports = {NEW: new.check_imports()["asyncserve"], OLD: old.check_imports()["asyncserve"]}
        results: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory() as workdir:
            for group, group_specs in specs.items():
                wanted = [s for s in todo if s.group == group]
                if wanted:
                    results += run_group(group_specs, wanted, args, Path(workdir))
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    report.record_end(facts)
    data = {
        "benchmark": "http-layer",
        "machine": facts,
        "commits": {NEW: new.commit(), OLD: old.commit()},
        "asyncserve_imported_from": {**imports, BARE: "(no asyncserve: bare ASGI app)"},
        "settings": {
            "duration_s": args.duration_s,
            "warmup_s": args.warmup_s,
            "quiet_wait_s": args.quiet_wait_s,
            "server_cpu": args.server_cpu,
            "load_cpu": args.load_cpu,
            "rounds": args.rounds,
            "mlp_rounds": args.mlp_rounds,
            "wrk": "wrk -t1 -c<c> -d<d>s --latency --timeout 10s (taskset -c 1)",
        },
        "servers": {
            group: {spec.label: " ".join(spec.command).replace("{port}", "<port>") for spec in group_specs}
            for group, group_specs in specs.items()
        },
        "scenarios": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    placeholders = {new.path: new.placeholder, old.path: old.placeholder}
    args.output.write_text(report.relative_paths(json.dumps(data, indent=2) + "\n", placeholders))
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
