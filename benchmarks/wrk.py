"""Run wrk pinned to one core and read its summary, which a Lua ``done`` hook prints as JSON."""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import HOST, BenchmarkError, Endpoint

_MARKER = "WRK_JSON "

# wrk reports times in microseconds; the hook prints them as they are and Python converts.
_DONE_HOOK = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"socket_errors":%d,"status_errors":%d,"timeouts":%d,'
      .. '"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"max_us":%.1f,"mean_us":%.1f}\\n',
    "MARKER", summary.requests, summary.duration, e.connect + e.read + e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
""".replace("MARKER", _MARKER)


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput, latency percentiles in milliseconds, and every kind of failure."""

    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: int
    """Connect, read and write errors, timeouts, and answers other than 2xx/3xx."""
    server_cpu_s: float = float("nan")
    """CPU seconds the server process used during the run (all its threads), when measured."""
    load_cpu_s: float = float("nan")
    """CPU seconds wrk used: near ``duration_s`` would mean the load generator, not the server, was the limit."""
    busy_before: float = float("nan")
    """The busy share of all CPUs just before the run, when the servers were idle: a neighbour's load."""

    @property
    def cpu_share(self) -> float:
        """The part of one core the server had: near 1 when it was saturated and had its core alone."""
        return round(self.server_cpu_s / self.duration_s, 3) if self.duration_s > 0 else float("nan")

    @property
    def requests_per_cpu_s(self) -> float:
        """Requests per CPU second of the server: its efficiency, which neighbours on the core disturb least."""
        return round(self.requests / self.server_cpu_s, 1) if self.server_cpu_s > 0 else float("nan")

    @property
    def load_cpu_share(self) -> float:
        return round(self.load_cpu_s / self.duration_s, 3) if self.duration_s > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        derived = {"cpu_share": self.cpu_share, "requests_per_cpu_s": self.requests_per_cpu_s}
        return {**asdict(self), **derived, "load_cpu_share": self.load_cpu_share}


def write_script(endpoint: Endpoint, directory: Path) -> Path:
    """The Lua script wrk runs for ``endpoint``: its method, headers and body, and the JSON hook."""
    lines = [f'wrk.method = "{endpoint.method}"']
    if endpoint.body is not None:
        body = endpoint.body.decode()
        if "]==]" in body:
            raise BenchmarkError(f"the body of {endpoint.label} cannot be quoted as a Lua long string")
        lines += ['wrk.headers["Content-Type"] = "application/json"', f"wrk.body = [==[{body}]==]"]
    path = directory / f"{endpoint.label.replace(' ', '_').replace('/', '_')}.lua"
    path.write_text("\n".join(lines) + "\n" + _DONE_HOOK)
    return path


def run_wrk(port: int, path: str, script: Path, concurrency: int, duration_s: int, cpu: int) -> WrkResult:
    """``wrk -t1 -c<concurrency> -d<duration_s>s --latency``, pinned to ``cpu``, against loopback."""
    stdout, load_cpu_s = run_command(port, path, script, concurrency, duration_s, cpu)
    return dataclasses.replace(parse_summary(stdout), load_cpu_s=load_cpu_s)


def run_command(port: int, path: str, script: Path, concurrency: int, duration_s: int, cpu: int) -> tuple[str, float]:
    """Run wrk with ``script`` as :func:`run_wrk` does; its standard output and the CPU seconds it used.

    For benchmarks whose scripts print more than the summary (counts, statuses) and parse it themselves.
    """
    command = [
        "taskset", "-c", str(cpu), "wrk", "-t1", f"-c{concurrency}", f"-d{duration_s}s", "--latency",
        "--timeout", "10s", "-s", str(script), f"http://{HOST}:{port}{path}",
    ]  # fmt: skip
    cpu_before = _children_cpu_s()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 30, check=False)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"wrk did not finish within {duration_s + 30} s: {' '.join(command)}") from None
    if completed.returncode != 0:
        raise BenchmarkError(f"wrk exited with {completed.returncode}: {completed.stderr.strip()[:500]}")
    return completed.stdout, round(_children_cpu_s() - cpu_before, 2)


def _children_cpu_s() -> float:
    # Only children that have exited count, so this is wrk's CPU time and not the servers'.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parse_summary(stdout: str) -> WrkResult:
    """Read the line the ``done`` hook printed."""
    for line in stdout.splitlines():
        if line.startswith(_MARKER):
            raw: dict[str, Any] = json.loads(line[len(_MARKER) :])
            return result_from_summary(raw)
    raise BenchmarkError(f"wrk printed no summary line; its output was:\n{stdout[:1000]}")


def result_from_summary(raw: dict[str, Any]) -> WrkResult:
    """A WrkResult from the JSON of the ``done`` hook (durations in µs); ``load_cpu_s`` left at 0."""
    duration_s = raw["duration_us"] / 1e6
    return WrkResult(
        requests=raw["requests"],
        duration_s=round(duration_s, 3),
        rps=round(raw["requests"] / duration_s, 1) if duration_s > 0 else 0.0,
        p50_ms=round(raw["p50_us"] / 1000, 3),
        p90_ms=round(raw["p90_us"] / 1000, 3),
        p99_ms=round(raw["p99_us"] / 1000, 3),
        max_ms=round(raw["max_us"] / 1000, 3),
        mean_ms=round(raw["mean_us"] / 1000, 3),
        errors=raw["socket_errors"] + raw["status_errors"] + raw["timeouts"],
    )


def version() -> str:
    completed = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10, check=False)
    return (completed.stdout + completed.stderr).splitlines()[0].strip() if completed.stdout + completed.stderr else "?"
