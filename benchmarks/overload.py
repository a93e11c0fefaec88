"""The overload run of the batching benchmark: far more clients than the server can serve, with tight deadlines.

wrk keeps ``concurrency`` connections busy with ``X-Request-Timeout`` set, while
- a probe (one more connection, in a thread), from the first second on, sends a request every
  ``probe_interval_s`` and times each answer by status, which wrk cannot tell apart: a 503 must
  come back at once;
- the server's resident memory (``VmRSS`` in ``/proc/<pid>/status``) is sampled, to show whether
  it stays flat;
- asyncserve's ``/metrics`` before and after give the answers by status, the rows shed and why,
  and the server's own request durations, which must not pass the deadline.
"""

from __future__ import annotations

import http.client
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import scrape, wrk
from benchmarks.harness import HOST, BenchmarkError, Endpoint, Server, process_cpu_s
from benchmarks.procstat import rss_mib
from benchmarks.wrk import WrkResult

FLAT_RSS_GROWTH_MIB = 16.0
"""The most the server's memory may grow from the first second of overload to its end and still count as flat."""
RSS_SETTLE_S = 1.0
"""Memory before this many seconds of overload is ramp-up (buffers for every new connection), not growth."""


@dataclass(frozen=True)
class OverloadSettings:
    concurrency: int = 1024
    duration_s: int = 15
    request_timeout_s: float = 0.05
    """The ``X-Request-Timeout`` header every request carries."""
    probe_interval_s: float = 0.02
    rss_interval_s: float = 0.5


def run_overload(
    server: Server, endpoint: Endpoint, settings: OverloadSettings, load_cpu: int, workdir: Path
) -> dict[str, Any]:
    """Overload ``server`` with wrk on ``load_cpu`` and return what happened, as a JSON-ready dict."""
    script = write_script(endpoint, workdir, settings.request_timeout_s)
    idle_mib = rss_mib(server.pid)
    before = scrape.scrape(server.port)
    cpu_before = process_cpu_s(server.pid)
    probe = Probe(server.port, endpoint, settings.request_timeout_s, settings.probe_interval_s)
    try:
        result, rss = _load(server, endpoint, script, settings, load_cpu, probe)
    finally:
        probe.stop()
    cpu_s = process_cpu_s(server.pid) - cpu_before
    after = scrape.scrape(server.port)
    run = scrape.delta(before, after)
    requests = scrape.requests_summary(run, "v2_infer", "mlp")
    return {
        "concurrency": settings.concurrency,
        "duration_s": settings.duration_s,
        "request_timeout_s": settings.request_timeout_s,
        "wrk": result.as_dict(),
        **requests,
        "answered_200_per_s": round(requests["by_status"].get("200", 0) / result.duration_s, 1),
        "server_cpu_share": round(cpu_s / result.duration_s, 3),
        "server_cpu_us_per_answer": round(1e6 * cpu_s / result.requests, 1) if result.requests else None,
        "batching": scrape.batching_summary(run, "mlp", result.duration_s),
        "loop_lag": scrape.loop_lag_summary(run),
        "deadline": _deadline_check(requests["duration_buckets"], settings.request_timeout_s),
        "probe": probe.summary(),
        "rss_mib": _rss_summary(idle_mib, rss, settings.duration_s),
    }


def write_script(endpoint: Endpoint, directory: Path, request_timeout_s: float) -> Path:
    """wrk's script for ``endpoint`` (see ``wrk.write_script``) with the ``X-Request-Timeout`` header added."""
    path = wrk.write_script(endpoint, directory)
    overload_path = path.with_name(path.stem + "_overload.lua")
    header = f'wrk.headers["X-Request-Timeout"] = "{request_timeout_s:g}"\n'
    overload_path.write_text(header + path.read_text())
    return overload_path


def _load(
    server: Server, endpoint: Endpoint, script: Path, settings: OverloadSettings, load_cpu: int, probe: Probe
) -> tuple[WrkResult, list[tuple[float, float]]]:
    """Run wrk while sampling the server's memory, the probe joining once overload has set in.

    Returns wrk's summary and the memory samples, as (seconds since wrk started, MiB).
    """
    command = [
        "taskset", "-c", str(load_cpu), "wrk", "-t1", f"-c{settings.concurrency}", f"-d{settings.duration_s}s",
        "--latency", "--timeout", "10s", "-s", str(script), f"http://{HOST}:{server.port}{endpoint.path}",
    ]  # fmt: skip
    limit_s = settings.duration_s + 30
    started = time.monotonic()
    samples: list[tuple[float, float]] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        while process.poll() is None and time.monotonic() - started < limit_s:
            elapsed = time.monotonic() - started
            samples.append((round(elapsed, 2), rss_mib(server.pid)))
            if elapsed >= RSS_SETTLE_S:
                probe.start()
            time.sleep(settings.rss_interval_s)
        if process.poll() is None:
            process.kill()
            raise BenchmarkError(f"wrk did not finish within {limit_s} s: {' '.join(command)}")
        stdout, stderr = process.communicate(timeout=10)
    if process.returncode != 0:
        raise BenchmarkError(f"wrk exited with {process.returncode}: {stderr.strip()[:500]}")
    return wrk.parse_summary(stdout), samples


def _rss_summary(idle_mib: float, samples: list[tuple[float, float]], duration_s: float) -> dict[str, Any]:
    during = [(t, mib) for t, mib in samples if t <= duration_s]
    settled = [mib for t, mib in during if t >= RSS_SETTLE_S] or [mib for _, mib in during]
    start, end = settled[0], settled[-1]
    return {
        "idle_before": idle_mib,
        "start": start,
        "middle": settled[len(settled) // 2],
        "end": end,
        "max": max(settled),
        "growth": round(end - start, 1),
        "flat": end - start <= FLAT_RSS_GROWTH_MIB,
        "samples": [list(sample) for sample in samples],
    }


def _deadline_check(buckets: dict[str, int], timeout_s: float) -> dict[str, Any]:
    """Server-side durations against the deadline, at the resolution of the duration histogram's buckets."""
    margin_bound = min((float(le) for le in buckets if float(le) > timeout_s), default=float("inf"))
    return {
        "answered": buckets.get("+Inf"),
        "over_deadline": scrape.count_above(buckets, timeout_s),
        "past_deadline_by_margin": scrape.count_above(buckets, margin_bound),
        "margin_s": round(margin_bound - timeout_s, 6),
    }


class Probe:
    """One extra client that sends a request every ``interval_s`` and times the answer, by status."""

    def __init__(self, port: int, endpoint: Endpoint, request_timeout_s: float, interval_s: float) -> None:
        self._port, self._endpoint, self._interval_s = port, endpoint, interval_s
        self._headers = {"Content-Type": "application/json", "X-Request-Timeout": f"{request_timeout_s:g}"}
        self._answers: dict[str, list[tuple[float, float]]] = {}
        """By status: (seconds since the probe started, latency in milliseconds) of each answer."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="overload-probe", daemon=True)

    def start(self) -> None:
        """Start probing; a no-op once started."""
        if self._thread.ident is None:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=15.0)

    def _run(self) -> None:
        connection = http.client.HTTPConnection(HOST, self._port, timeout=10.0)
        begun = time.perf_counter()
        while not self._stop.wait(self._interval_s):
            started = time.perf_counter()
            try:
                connection.request(self._endpoint.method, self._endpoint.path, self._endpoint.body, self._headers)
                response = connection.getresponse()
                response.read()
                status = str(response.status)
            except (OSError, http.client.HTTPException):
                status = "error"
                connection.close()
            answer = (round(started - begun, 3), 1000 * (time.perf_counter() - started))
            self._answers.setdefault(status, []).append(answer)
        connection.close()

    def summary(self) -> dict[str, dict[str, float]]:
        """Per status: the answers, their p50, p99 and max latency in ms, and when the first and last came."""
        return {status: _percentiles(answers) for status, answers in sorted(self._answers.items())}


def _percentiles(answers: list[tuple[float, float]]) -> dict[str, float]:
    ordered = sorted(latency for _, latency in answers)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {
        "count": len(ordered),
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(p99, 3),
        "max_ms": round(ordered[-1], 3),
        "first_s": answers[0][0],
        "last_s": answers[-1][0],
    }
