"""The measurement loop every benchmark shares, and their common command-line options.

A benchmark declares its servers (``harness.ServerSpec`` values) and its scenarios (``Scenario``
values: a request at a concurrency) as data; ``interleave`` runs them. All servers run at once,
idle but for the one being loaded, so the runs of different servers interleave: a burst of noise
from a neighbour on the shared machine lands on every server alike instead of on whichever
happened to run during it. The order of the servers rotates from one round to the next for the
same reason.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import harness, report, wrk
from benchmarks.harness import Endpoint, Server, ServerSpec
from benchmarks.wrk import WrkResult

RunKey = tuple[str, str, int]
"""(server label, endpoint label, concurrency)."""
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """How long, how often and where to measure."""

    duration_s: int
    concurrencies: tuple[int, ...]
    repeats: int
    warmup_s: int
    server_cpu: int
    load_cpu: int
    ready_timeout_s: float
    quiet_wait_s: float
    output_dir: Path


@dataclass
class Measurements:
    """Every wrk run by key, and each server's exit code after SIGTERM."""

    runs: dict[RunKey, list[WrkResult]] = field(default_factory=dict)
    servers: list[Server] = field(default_factory=list)

    @property
    def exit_codes(self) -> dict[str, int | None]:
        return {server.spec.label: server.exit_code for server in self.servers}

    def summary(self, server: str, endpoint: str, concurrency: int) -> report.Summary:
        return report.Summary.of(self.runs[(server, endpoint, concurrency)])


def add_arguments(parser: argparse.ArgumentParser, concurrencies: Sequence[int]) -> None:
    """The options both benchmarks take; unset ones get defaults from ``resolve`` (``--quick`` or not)."""
    parser.add_argument("--duration-s", type=_positive, help="seconds per wrk run (default 10, quick 2)")
    parser.add_argument(
        "--concurrency",
        type=_positive,
        nargs="+",
        help=f"open connections (default {' '.join(map(str, concurrencies))})",
    )
    parser.add_argument(
        "--repeats", type=_positive, help="runs per row; the table shows the median (default 3, quick 1)"
    )
    parser.add_argument("--warmup-s", type=_positive, help="seconds of load before measuring (default 2, quick 1)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run: 2 s runs, 1 repeat")
    parser.add_argument("--server-cpu", type=int, default=0, help="the core the server is pinned to (default 0)")
    parser.add_argument("--load-cpu", type=int, default=1, help="the core wrk is pinned to (default 1)")
    parser.add_argument("--ready-timeout-s", type=float, default=60.0, help="longest wait for readiness (default 60)")
    parser.add_argument(
        "--quiet-wait-s",
        type=float,
        default=10.0,
        help="before each run, wait up to this long for other processes to leave the CPUs idle (0: never wait)",
    )
    parser.add_argument("--output-dir", type=Path, default=report.RESULTS_DIR, help="where results are written")


def resolve(args: argparse.Namespace, concurrencies: Sequence[int], quick_concurrencies: Sequence[int]) -> Settings:
    quick: bool = args.quick
    return Settings(
        duration_s=args.duration_s or (2 if quick else 10),
        concurrencies=tuple(args.concurrency or (quick_concurrencies if quick else concurrencies)),
        repeats=args.repeats or (1 if quick else 3),
        warmup_s=args.warmup_s or (1 if quick else 2),
        server_cpu=args.server_cpu,
        load_cpu=args.load_cpu,
        ready_timeout_s=args.ready_timeout_s,
        quiet_wait_s=args.quiet_wait_s,
        output_dir=args.output_dir,
    )


def settings_dict(settings: Settings) -> dict[str, Any]:
    return {
        "duration_s": settings.duration_s,
        "concurrencies": list(settings.concurrencies),
        "repeats": settings.repeats,
        "warmup_s": settings.warmup_s,
        "quiet_wait_s": settings.quiet_wait_s,
        "wrk": "wrk -t1 -c<concurrency> -d<duration_s>s --latency --timeout 10s",
    }


def method_markdown(settings: dict[str, Any]) -> str:
    """One paragraph saying how the rows were measured, from ``settings_dict``."""
    return (
        f"Each row is the median of {settings['repeats']} runs of `{settings['wrk']}` (d={settings['duration_s']} s), "
        f"interleaved across servers after a {settings['warmup_s']} s warm-up; each run started once the CPUs were "
        f"under {harness.QUIET_BUSY_SHARE:.0%} busy or after {settings['quiet_wait_s']:g} s of waiting for that."
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


@dataclass(frozen=True)
class Scenario:
    """One load every server takes in turn: a request, repeated by wrk at a concurrency."""

    endpoint: Endpoint
    concurrency: int

    def key(self, server: Server) -> RunKey:
        return (server.spec.label, self.endpoint.label, self.concurrency)


def grid(endpoints: Sequence[Endpoint], concurrencies: Sequence[int]) -> tuple[Scenario, ...]:
    """Every endpoint at every concurrency, in that order."""
    return tuple(Scenario(endpoint, concurrency) for endpoint in endpoints for concurrency in concurrencies)


def start_servers(
    stack: contextlib.ExitStack, specs: Sequence[ServerSpec], settings: Settings, workdir: Path, cpu: int | None = None
) -> list[Server]:
    """Start every server of ``specs`` pinned to ``cpu`` (the server core); ``stack`` stops them, checking exits."""
    core = settings.server_cpu if cpu is None else cpu
    return [
        stack.enter_context(harness.running_server(spec, core, workdir, settings.ready_timeout_s)) for spec in specs
    ]


def interleave(
    servers: Sequence[Server],
    scenarios: Sequence[Scenario],
    rounds: int,
    run_once: Callable[[Server, Scenario, int], T],
    *,
    rotate: bool = True,
) -> dict[RunKey, list[T]]:
    """The rounds every benchmark runs: in each, every scenario on every server back to back.

    ``run_once(server, scenario, round)`` measures one run (rounds count from 1). With ``rotate``
    the server order shifts by one from a round to the next, so that no server always follows the
    same one. Returns every run by ``(server, endpoint, concurrency)``, in round order.
    """
    runs: dict[RunKey, list[T]] = {}
    for number in range(1, rounds + 1):
        order = _rotated(servers, number - 1) if rotate else list(servers)
        for scenario in scenarios:
            for server in order:
                runs.setdefault(scenario.key(server), []).append(run_once(server, scenario, number))
    return runs


def write_scripts(scenarios: Sequence[Scenario], workdir: Path) -> dict[str, Path]:
    """wrk's script for each endpoint of ``scenarios``, by endpoint label."""
    endpoints = {scenario.endpoint.label: scenario.endpoint for scenario in scenarios}
    return {label: wrk.write_script(endpoint, workdir) for label, endpoint in endpoints.items()}


def warm_up(
    servers: Sequence[Server], scenarios: Sequence[Scenario], scripts: dict[str, Path], settings: Settings
) -> None:
    """Load each server on each endpoint for ``settings.warmup_s``, at the highest concurrency measured."""
    top = max(scenario.concurrency for scenario in scenarios)
    for server in servers:
        for label in scripts:
            endpoint = next(s.endpoint for s in scenarios if s.endpoint.label == label)
            _log(f"warm-up {server.spec.label} {label}")
            wrk.run_wrk(server.port, endpoint.path, scripts[label], top, settings.warmup_s, settings.load_cpu)


def run_wrk(server: Server, scenario: Scenario, script: Path, settings: Settings) -> WrkResult:
    """One wrk run once the machine is quiet (or the wait ran out), with the CPU time the server spent in it."""
    busy_before = harness.wait_for_quiet(settings.quiet_wait_s) if settings.quiet_wait_s > 0 else float("nan")
    cpu_before = harness.process_cpu_s(server.pid)
    path, concurrency = scenario.endpoint.path, scenario.concurrency
    result = wrk.run_wrk(server.port, path, script, concurrency, settings.duration_s, settings.load_cpu)
    server_cpu_s = round(harness.process_cpu_s(server.pid) - cpu_before, 2)
    return dataclasses.replace(result, server_cpu_s=server_cpu_s, busy_before=busy_before)


def measure(
    specs: Sequence[ServerSpec],
    scenarios: Sequence[Scenario],
    settings: Settings,
    check: Callable[[Server], None] | None = None,
) -> Measurements:
    """Start every server, check its answers (and ``check`` it), warm it up, then run the interleaved rounds."""
    harness.require_tool("wrk")
    harness.require_tool("taskset")
    harness.check_cpus(settings.server_cpu, settings.load_cpu)
    measurements = Measurements()
    with tempfile.TemporaryDirectory(prefix="asyncserve-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        servers = measurements.servers = start_servers(stack, specs, settings, workdir)
        harness.check_all(servers, list({s.endpoint.label: s.endpoint for s in scenarios}.values()))
        if check is not None:
            for server in servers:
                check(server)
        scripts = write_scripts(scenarios, workdir)
        warm_up(servers, scenarios, scripts, settings)

        def run_once(server: Server, scenario: Scenario, number: int) -> WrkResult:
            result = run_wrk(server, scenario, scripts[scenario.endpoint.label], settings)
            _log(f"round {number} {server.spec.label:>10} {scenario.endpoint.label:<24} c={scenario.concurrency:<4} "
                 f"{brief(result)}")  # fmt: skip
            return result

        measurements.runs = interleave(servers, scenarios, settings.repeats, run_once)
    return measurements


def _rotated(servers: Sequence[Server], shift: int) -> list[Server]:
    shift %= len(servers)
    return [*servers[shift:], *servers[:shift]]


def brief(result: WrkResult) -> str:
    """One run on one line, for the progress log."""
    return (
        f"{result.rps:9.0f} req/s  p50 {result.p50_ms:7.3f} ms  p99 {result.p99_ms:7.3f} ms  "
        f"cpu {result.cpu_share:4.2f}  {result.requests_per_cpu_s:8.0f} req/cpu-s  errors {result.errors}"
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
