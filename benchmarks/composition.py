"""The composition benchmark: in-flight coalescing and the prediction cache, and an ensemble against its members.

1. **Coalescing.** ``asyncserve serve benchmarks.composition_models:coalescing`` serves two CPU-bound
   models, each under two names that differ only in ``deterministic``: the batching benchmark's NumPy
   MLP (cheap per row, batch-friendly) and a row-by-row recurrent net (1-2 ms per row whatever
   the batch). Two such servers run side by side, one without a prediction cache and one with
   ``ASYNCSERVE_PREDICTION_CACHE=memory``. wrk (c=64) sends a mix drawn per request: with
   probability 0.5 one of 8 hot inputs, otherwise a unique input (a run id and a counter in the
   body, so no two runs share one). Rows: not deterministic (every request computed), deterministic
   (identical requests in flight share one computation), deterministic with the cache (hot inputs
   also answered from the cache across time). asyncserve's ``/metrics`` around each run give the
   coalesced requests, cache hits and misses, and the batches.
2. **Ensemble latency.** ``asyncserve serve benchmarks.composition_models:ensembles``: three
   ``async def`` members sleeping 10, 20 and 50 ms, their mean (``trio``), and two quorum ensembles
   (``min_members=2``) whose 50 ms member has a timeout of 30 or 15 ms. At c=1 and c=16, each
   member alone and each ensemble; wrk's Lua counts the answers that say ``"degraded":true`` and
   every non-200. ``trio`` should take as long as ``m50`` alone, and a quorum ensemble as long as
   ``m20`` alone or ``m50`` alone cut short by its timeout, whichever is longer.

After each run the server's metrics are read once it has finished what wrk left in flight, and the
requests whose client left (wrk stopping) count as received. The Markdown opens with the headline
figures: the throughput ratios with and without coalescing and the cache, and ``trio`` against
``m50`` at c=1 and c=16.

Every server is pinned to one core (``OMP_NUM_THREADS=1``, one executor thread, the jobs API off),
wrk to the other; runs are interleaved (the order rotates every round) and each row is the median
of the rounds. Results go to ``benchmarks/results/composition.{json,md}``.

Usage::

    .venv/bin/python -m benchmarks.composition            # ~7 min: 10 s coalescing runs, 5 s ensemble runs, 3 rounds
    .venv/bin/python -m benchmarks.composition --quick    # ~1.5 min: 2 s runs, 1 round
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks import composition_models as models
from benchmarks import harness, measure, mlp, report, scrape, wrk
from benchmarks.harness import BenchmarkError, Endpoint, Server, ServerSpec
from benchmarks.wrk import WrkResult

THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SERVER_ENV = {**THREAD_ENV, "ASYNCSERVE_JOBS": ""}
"""One BLAS thread (one core per server) and no jobs API (not measured here; no shared var/jobs.db)."""
ENSEMBLE_CONCURRENCIES = (1, 16)
COALESCING_CONCURRENCY = 64
HOT_INPUTS = 8
HOT_SHARE = 0.5
ROUTE = "v1_predict"
PARTS = ("coalescing", "ensemble")
NO_CACHE, MEMORY_CACHE = "no-cache", "memory-cache"
_COUNTS_MARKER = "COMPOSITION_COUNTS "
SETTLE_TIMEOUT_S = 5.0
SETTLE_INTERVAL_S = 0.3
"""After a run, how long the server may take to finish what wrk left in flight, and how often to look."""
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def predict_path(model: str) -> str:
    return f"/v1/models/{model}/predict"


# The servers


def served_command(target: str, env: dict[str, str]) -> tuple[str, ...]:
    """``asyncserve serve TARGET`` with one executor thread, under ``env``, as the other benchmarks run it."""
    variables = (f"{key}={value}" for key, value in env.items())
    return ("env", *variables, *harness.asyncserve_command(target, "--executor-workers", "1"))


COALESCING_SPECS = (
    ServerSpec(NO_CACHE, served_command("benchmarks.composition_models:coalescing", SERVER_ENV)),
    ServerSpec(
        MEMORY_CACHE,
        served_command(
            "benchmarks.composition_models:coalescing", {**SERVER_ENV, "ASYNCSERVE_PREDICTION_CACHE": "memory"}
        ),
    ),
)
ENSEMBLE_SPEC = ServerSpec("ensembles", served_command("benchmarks.composition_models:ensembles", SERVER_ENV))


# Coalescing: the workload


@dataclass(frozen=True)
class Family:
    """One model, served as ``<name>_det`` and ``<name>_nondet``: its input width and a typical row's tail."""

    name: str
    inputs: int
    outputs: int
    description: str

    def tail(self) -> list[float]:
        """The input values after the first two (which tell hot and unique requests apart)."""
        if self.name == "mlp":
            return [float(v) for v in mlp.example_rows(1)[0][2:]]
        return [round(0.1 * (i + 1), 1) for i in range(self.inputs - 2)]


FAMILIES = (
    Family("mlp", mlp.INPUT_SIZE, mlp.OUTPUT_SIZE, "NumPy MLP 256-1024-1024-1024-16, batched"),
    Family("rnn", models.RNN_INPUTS, models.RNN_OUTPUTS, f"recurrent net, {models.RNN_STEPS} steps, row by row"),
)


@dataclass(frozen=True)
class Case:
    """One coalescing row: a model family, served deterministic or not, by the server with or without cache."""

    family: Family
    deterministic: bool
    server: str

    @property
    def model(self) -> str:
        return f"{self.family.name}_{'det' if self.deterministic else 'nondet'}"

    @property
    def label(self) -> str:
        if not self.deterministic:
            return f"{self.family.name} not deterministic"
        return f"{self.family.name} deterministic" + (" + cache" if self.server == MEMORY_CACHE else "")


def coalescing_cases() -> list[Case]:
    return [
        case
        for family in FAMILIES
        for case in (Case(family, False, NO_CACHE), Case(family, True, NO_CACHE), Case(family, True, MEMORY_CACHE))
    ]


def tail_text(family: Family) -> str:
    """The tail values as a client with orjson and NumPy would send them: the shortest text of each float32."""
    values = np.asarray(family.tail(), dtype=np.float32)
    return orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY).decode()[1:-1]


def hot_body(family: Family, index: int) -> bytes:
    """The body of hot input ``index`` (1-based), as the Lua script builds it."""
    return ('{"x":[-1,' + str(index) + "," + tail_text(family) + "]}").encode()


def mixed_script(family: Family, directory: Path, run_id: int, hot_inputs: int, hot_share: float) -> Path:
    """A wrk script: each request is one of ``hot_inputs`` hot bodies with probability ``hot_share``, else unique.

    Hot bodies are ``{"x": [-1, i, <tail>]}``; unique ones ``{"x": [run_id, n, <tail>]}`` with ``n``
    counting this run's unique requests, so no two runs (and no warm-up) send the same unique input.
    """
    base = wrk.write_script(Endpoint("mixed", "POST", "/", None, lambda _: True), directory)
    tail = tail_text(family)
    extra = f"""
wrk.headers["Content-Type"] = "application/json"
local tail = ",{tail}]}}"
local hot = {{}}
for i = 1, {hot_inputs} do hot[i] = '{{"x":[-1,' .. i .. tail end
local prefix = '{{"x":[{run_id},'
local unique = 0
math.randomseed({run_id})
request = function()
  if math.random() < {hot_share!r} then
    return wrk.format(nil, nil, nil, hot[math.random({hot_inputs})])
  end
  unique = unique + 1
  return wrk.format(nil, nil, nil, prefix .. unique .. tail)
end
"""
    path = directory / f"mixed-{family.name}-{run_id}.lua"
    path.write_text(base.read_text() + extra)
    base.unlink()
    return path


def output_values(body: bytes, width: int) -> list[float] | None:
    try:
        values = orjson.loads(body)["y"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(values, list) or len(values) != width or not all(isinstance(v, float) for v in values):
        return None
    return [float(v) for v in values]


def check_coalescing_answers(servers: dict[str, Server], cases: Sequence[Case]) -> None:
    """Every case answers a hot input with its outputs, and the same outputs on every server and model name."""
    for family in {case.family for case in cases}:
        answers: dict[str, list[float]] = {}
        for case in (c for c in cases if c.family == family):
            status, body = harness.request(
                servers[case.server].port, "POST", predict_path(case.model), hot_body(family, 1)
            )
            values = output_values(body, family.outputs)
            if status != 200 or values is None or not all(math.isfinite(v) for v in values):
                raise BenchmarkError(f"{case.label} answered {status} {body[:300]!r}, not {family.outputs} values")
            answers[case.label] = values
        first = next(iter(answers.values()))
        if not all(np.allclose(values, first, rtol=1e-5, atol=1e-5) for values in answers.values()):
            raise BenchmarkError(f"the {family.name} models answer the same input differently: {answers}")


# Ensembles: the workload


@dataclass(frozen=True)
class Target:
    """One ensemble row: a model, the answer it must give to ``x = 2``, and its expected latency."""

    model: str
    score: float
    members_used: str | None
    degraded: bool
    expected: str

    def check(self, body: bytes) -> bool:
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(answer, dict) or not math.isclose(answer.get("score", math.nan), self.score):
            return False
        if self.members_used is None:
            return set(answer) == {"score"}
        return answer.get("members_used") == self.members_used and answer.get("degraded") is self.degraded


ENSEMBLE_BODY = b'{"x":2.0}'
TARGETS = (
    Target("m10", 2.0, None, False, "10 ms"),
    Target("m20", 4.0, None, False, "20 ms"),
    Target("m50", 6.0, None, False, "50 ms"),
    Target("trio", 4.0, "m10,m20,m50", False, "max(members) = m50"),
    Target("quorum_30ms", 3.0, "m10,m20", True, "max(m20, m50 cut at 30 ms)"),
    Target("quorum_15ms", 3.0, "m10,m20", True, "max(m20, m50 cut at 15 ms)"),
)
MEMBERS = ("m10", "m20", "m50")


def counting_script(target: Target, directory: Path) -> Path:
    """A wrk script sending ``ENSEMBLE_BODY`` that also counts non-200 answers and ``"degraded":true`` ones."""
    base = wrk.write_script(
        Endpoint(target.model, "POST", predict_path(target.model), ENSEMBLE_BODY, target.check), directory
    )
    extra = f"""
local threads = {{}}
setup = function(thread) table.insert(threads, thread) end
degraded = 0
failed = 0
response = function(status, headers, body)
  if status ~= 200 then
    failed = failed + 1
  elseif string.find(body, '"degraded":true', 1, true) then
    degraded = degraded + 1
  end
end
local summary_done = done
done = function(summary, latency, requests)
  summary_done(summary, latency, requests)
  local d, f = 0, 0
  for _, thread in ipairs(threads) do
    d = d + thread:get("degraded")
    f = f + thread:get("failed")
  end
  io.write(string.format('{_COUNTS_MARKER}{{"degraded":%d,"failed":%d}}\\n', d, f))
end
"""
    base.write_text(base.read_text() + extra)
    return base


def run_counting_wrk(
    port: int, path: str, script: Path, concurrency: int, duration_s: int, cpu: int
) -> tuple[WrkResult, dict[str, int]]:
    """``wrk.run_wrk`` for a script that also prints a counts line: the summary and the counts."""
    stdout, load_cpu_s = wrk.run_command(port, path, script, concurrency, duration_s, cpu)
    result = dataclasses.replace(wrk.parse_summary(stdout), load_cpu_s=load_cpu_s)
    for line in stdout.splitlines():
        if line.startswith(_COUNTS_MARKER):
            counts: dict[str, int] = json.loads(line[len(_COUNTS_MARKER) :])
            return result, counts
    raise BenchmarkError(f"wrk printed no counts line; its output was:\n{stdout[:1000]}")


# Measuring


@dataclass(frozen=True)
class Options:
    """What this benchmark adds to the shared settings."""

    coalescing_concurrency: int
    ensemble_duration_s: int
    hot_inputs: int
    hot_share: float
    disturbed_share: float = 0.1
    """Run again a run in which other processes took more than this share of the server's core."""
    retries: int = 2
    parts: tuple[str, ...] = PARTS
    log_dir: Path | None = None
    """Where the servers' logs (and wrk's scripts) go; None: a temporary directory."""


@dataclass
class Run:
    """One wrk run and what the server's metrics and CPU time said about it."""

    result: WrkResult
    metrics: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)
    neighbour_share: float = 0.0
    """The share of the server's core that other processes used during the run."""
    discarded: list[dict[str, Any]] = field(default_factory=list)
    """Earlier attempts at this run, dropped because other processes took too much of the server's core."""


@dataclass
class Measured:
    coalescing: dict[str, list[Run]] = field(default_factory=dict)
    ensembles: dict[tuple[str, int], list[Run]] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    run_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))


def measure_all(settings: measure.Settings, options: Options) -> Measured:
    harness.require_tool("wrk")
    harness.require_tool("taskset")
    harness.check_cpus(settings.server_cpu, settings.load_cpu)
    measured = Measured()
    with contextlib.ExitStack() as stack:
        if options.log_dir is not None:
            options.log_dir.mkdir(parents=True, exist_ok=True)
            workdir = options.log_dir
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="asyncserve-composition-")))
        if "coalescing" in options.parts:
            _measure_coalescing(settings, options, workdir, measured)
        if "ensemble" in options.parts:
            _measure_ensembles(settings, options, workdir, measured)
    return measured


@contextlib.contextmanager
def _servers(specs: Sequence[ServerSpec], settings: measure.Settings, workdir: Path) -> Iterator[dict[str, Server]]:
    """Start every server of ``specs``; on the way out each gets SIGTERM and its exit is checked."""
    with contextlib.ExitStack() as stack:
        yield {
            spec.label: stack.enter_context(
                harness.running_server(spec, settings.server_cpu, workdir, settings.ready_timeout_s)
            )
            for spec in specs
        }


def _measure_coalescing(settings: measure.Settings, options: Options, workdir: Path, measured: Measured) -> None:
    cases = coalescing_cases()
    with _servers(COALESCING_SPECS, settings, workdir) as servers:
        check_coalescing_answers(servers, cases)
        for case in cases:
            _log(f"warm-up {case.label}")
            script = mixed_script(case.family, workdir, next(measured.run_ids), options.hot_inputs, options.hot_share)
            wrk.run_wrk(
                servers[case.server].port,
                predict_path(case.model),
                script,
                options.coalescing_concurrency,
                settings.warmup_s,
                settings.load_cpu,
            )
        for repeat in range(settings.repeats):
            for family in FAMILIES:
                group = [case for case in cases if case.family == family]
                shift = repeat % len(group)
                for case in [*group[shift:], *group[:shift]]:
                    run = _coalescing_run(servers[case.server], case, settings, options, workdir, measured)
                    _log(f"{case.label:<28} c={options.coalescing_concurrency:<3} {_brief(run)}")
                    measured.coalescing.setdefault(case.label, []).append(run)
    measured.exit_codes.update({label: server.exit_code for label, server in servers.items()})


def _coalescing_run(
    server: Server, case: Case, settings: measure.Settings, options: Options, workdir: Path, measured: Measured
) -> Run:
    script = mixed_script(case.family, workdir, next(measured.run_ids), options.hot_inputs, options.hot_share)
    return _measured_run(
        server,
        settings,
        options,
        lambda: (
            wrk.run_wrk(
                server.port,
                predict_path(case.model),
                script,
                options.coalescing_concurrency,
                settings.duration_s,
                settings.load_cpu,
            ),
            {},
        ),
        lambda delta, result: coalescing_metrics(delta, case.model, result),
    )


def _measure_ensembles(settings: measure.Settings, options: Options, workdir: Path, measured: Measured) -> None:
    with _servers([ENSEMBLE_SPEC], settings, workdir) as servers:
        server = servers[ENSEMBLE_SPEC.label]
        scripts = {target.model: counting_script(target, workdir) for target in TARGETS}
        for target in TARGETS:
            status, body = harness.request(server.port, "POST", predict_path(target.model), ENSEMBLE_BODY)
            if status != 200 or not target.check(body):
                raise BenchmarkError(f"{target.model} answered {status} {body[:300]!r}, not score {target.score}")
            _log(f"warm-up {target.model}")
            run_counting_wrk(
                server.port,
                predict_path(target.model),
                scripts[target.model],
                max(settings.concurrencies),
                settings.warmup_s,
                settings.load_cpu,
            )
        for repeat in range(settings.repeats):
            for concurrency in settings.concurrencies:
                shift = repeat % len(TARGETS)
                for target in [*TARGETS[shift:], *TARGETS[:shift]]:
                    run = _ensemble_run(server, target, concurrency, scripts[target.model], settings, options)
                    _log(f"{target.model:<12} c={concurrency:<3} {_brief(run)}  {run.counts}")
                    measured.ensembles.setdefault((target.model, concurrency), []).append(run)
    measured.exit_codes[ENSEMBLE_SPEC.label] = server.exit_code


def _ensemble_run(
    server: Server, target: Target, concurrency: int, script: Path, settings: measure.Settings, options: Options
) -> Run:
    return _measured_run(
        server,
        settings,
        options,
        lambda: run_counting_wrk(
            server.port,
            predict_path(target.model),
            script,
            concurrency,
            options.ensemble_duration_s,
            settings.load_cpu,
        ),
        lambda delta, result: ensemble_metrics(delta, target.model),
    )


def _measured_run(
    server: Server,
    settings: measure.Settings,
    options: Options,
    load: Callable[[], tuple[WrkResult, dict[str, int]]],
    summarize: Callable[[scrape.Samples, WrkResult], dict[str, Any]],
) -> Run:
    """A run, again (at most ``options.retries`` times) while other processes took the server's core."""
    discarded: list[dict[str, Any]] = []
    while True:
        run = _one_run(server, settings, load, summarize)
        if run.neighbour_share <= options.disturbed_share or len(discarded) >= options.retries:
            run.discarded = discarded
            return run
        _log(f"  run again: other processes took {run.neighbour_share:.0%} of the server's core ({_brief(run)})")
        discarded.append({**run.result.as_dict(), "neighbour_share": run.neighbour_share})


def _one_run(
    server: Server,
    settings: measure.Settings,
    load: Callable[[], tuple[WrkResult, dict[str, int]]],
    summarize: Callable[[scrape.Samples, WrkResult], dict[str, Any]],
) -> Run:
    """One run once the CPUs are quiet: the server's metrics and CPU time around ``load()``, and its neighbours'."""
    busy_before = harness.wait_for_quiet(settings.quiet_wait_s) if settings.quiet_wait_s > 0 else float("nan")
    before = scrape.scrape(server.port)
    cpu_before = harness.process_cpu_s(server.pid)
    core_before = core_busy_s(settings.server_cpu)
    result, counts = load()
    core_s = core_busy_s(settings.server_cpu) - core_before
    server_cpu_s = round(harness.process_cpu_s(server.pid) - cpu_before, 2)
    result = dataclasses.replace(result, server_cpu_s=server_cpu_s, busy_before=busy_before)
    delta = scrape.delta(before, settled_scrape(server.port))
    neighbour = round(max(0.0, core_s - server_cpu_s) / result.duration_s, 3) if result.duration_s > 0 else 0.0
    return Run(result, summarize(delta, result), counts, neighbour)


def settled_scrape(port: int) -> scrape.Samples:
    """The server's metrics once it has finished what wrk left in flight when it stopped.

    wrk stops with up to ``-c`` requests in flight; the server still predicts the batch it is running
    (and counts its rows) after their clients left. Scraping at once would leave those rows out of this
    run and the requests in it: the server is settled when nothing is in flight on the route and no
    batch has ended for ``SETTLE_INTERVAL_S``.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    samples = scrape.scrape(port)
    while time.monotonic() < deadline:
        time.sleep(SETTLE_INTERVAL_S)
        later = scrape.scrape(port)
        in_flight = scrape.total(later, "asyncserve_requests_in_flight", route=ROUTE)
        if in_flight == 0 and _batches_ended(later) == _batches_ended(samples):
            return later
        samples = later
    raise BenchmarkError(f"the server on port {port} was still busy {SETTLE_TIMEOUT_S:g} s after wrk stopped")


def _batches_ended(samples: scrape.Samples) -> float:
    return scrape.total(samples, "asyncserve_batch_rows_count")


def core_busy_s(cpu: int) -> float:
    """CPU seconds core ``cpu`` has spent running processes so far (user, nice, system, steal), from ``/proc/stat``.

    Interrupt time is left out: the kernel charges it to no process, and most of it is the loopback
    traffic of the measured server itself.
    """
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name == f"cpu{cpu}":
            user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(value) for value in fields[:8])
            return (user + nice + system + steal) / _CLOCK_TICKS
    raise BenchmarkError(f"/proc/stat has no line for CPU {cpu}")


def coalescing_metrics(delta: scrape.Samples, model: str, result: WrkResult) -> dict[str, Any]:
    """What the server counted in one coalescing run: requests, coalesced, cache, batches, loop lag."""
    return {
        "requests_ok": int(scrape.total(delta, "asyncserve_requests_total", route=ROUTE, model=model, status="200")),
        "requests": int(scrape.total(delta, "asyncserve_requests_total", route=ROUTE, model=model)),
        "disconnects": int(scrape.total(delta, "asyncserve_client_disconnects_total", route=ROUTE, model=model)),
        "coalesced": int(scrape.total(delta, "asyncserve_coalesced_requests_total")),
        "cache_hits": int(scrape.total(delta, "asyncserve_prediction_cache_hits_total")),
        "cache_misses": int(scrape.total(delta, "asyncserve_prediction_cache_misses_total")),
        "batching": scrape.batching_summary(delta, model, result.duration_s),
        "loop_lag": scrape.loop_lag_summary(delta),
    }


def ensemble_metrics(delta: scrape.Samples, model: str) -> dict[str, Any]:
    """Requests by status, and each model's batches (close reasons, queue wait) during one ensemble run."""
    involved = [model, *MEMBERS] if model not in MEMBERS else [model]
    return {
        "requests": scrape.requests_summary(delta, ROUTE, model)["by_status"],
        "batching": {name: scrape.batching_summary(delta, name, 0.0) for name in involved},
        "loop_lag": scrape.loop_lag_summary(delta),
    }


def _brief(run: Run) -> str:
    r = run.result
    return (
        f"{r.rps:8.0f} req/s  p50 {r.p50_ms:8.3f} ms  p99 {r.p99_ms:8.3f} ms  cpu {r.cpu_share:4.2f}  errors {r.errors}"
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Results


def _sum(runs: Sequence[Run], key: str) -> int:
    return sum(int(run.metrics[key]) for run in runs)


def _median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None and not math.isnan(value)]
    return round(statistics.median(present), 3) if present else None


def _div(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return round(a / b, digits) if a is not None and b else None


def coalescing_row(case: Case, runs: Sequence[Run]) -> dict[str, Any]:
    """The median wrk figures of a case, and its server counts summed over the runs.

    The requests the server received are those it answered and those whose client left first (wrk
    stopping with requests in flight): the model computed some of the latter before it noticed.
    """
    requests = _sum(runs, "requests")
    received = requests + _sum(runs, "disconnects")
    batches = sum(run.metrics["batching"]["batches"] for run in runs)
    rows = sum(run.metrics["batching"]["rows"] for run in runs)
    coalesced, hits = _sum(runs, "coalesced"), _sum(runs, "cache_hits")
    reasons: dict[str, int] = {}
    for run in runs:
        for reason, count in run.metrics["batching"]["close_reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    return {
        "label": case.label,
        "model": case.model,
        "server": case.server,
        "deterministic": case.deterministic,
        **report.Summary.of([run.result for run in runs]).as_dict(),
        "requests": requests,
        "requests_ok": _sum(runs, "requests_ok"),
        "disconnects": received - requests,
        "coalesced": coalesced,
        "cache_hits": hits,
        "cache_misses": _sum(runs, "cache_misses"),
        "without_model_share": _div(coalesced + hits, received),
        "coalesced_share": _div(coalesced, received),
        "cache_hit_share": _div(hits, received),
        "batches": batches,
        "model_rows": rows,
        "rows_per_request": _div(rows, received),
        "mean_batch_rows": _div(rows, batches, 1),
        "close_reasons": reasons,
        "model_us_per_row": _median([_scaled(run.metrics["batching"]["predict_s_per_row"], 1e6) for run in runs]),
        "model_share_of_wall": _median([run.metrics["batching"]["predict_share_of_wall"] for run in runs]),
        "loop_lag_mean_ms": _median([run.metrics["loop_lag"]["mean_ms"] for run in runs]),
        "neighbour_share": _median([run.neighbour_share for run in runs]),
        "runs": [_run_dict(run) for run in runs],
    }


def _run_dict(run: Run) -> dict[str, Any]:
    return {
        **run.result.as_dict(),
        "neighbour_share": run.neighbour_share,
        "counts": run.counts,
        "server_metrics": run.metrics,
        "discarded": run.discarded,
    }


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def coalescing_results(measured: Measured) -> dict[str, Any]:
    cases = coalescing_cases()
    rows = [coalescing_row(case, measured.coalescing[case.label]) for case in cases]
    by_label = {row["label"]: row for row in rows}
    ratios = {}
    for family in FAMILIES:
        base = by_label[f"{family.name} not deterministic"]
        det, cached = by_label[f"{family.name} deterministic"], by_label[f"{family.name} deterministic + cache"]
        ratios[family.name] = {
            "deterministic_rps": _div(det["rps"], base["rps"]),
            "cache_rps": _div(cached["rps"], base["rps"]),
            "deterministic_requests_per_cpu_s": _div(det["requests_per_cpu_s"], base["requests_per_cpu_s"]),
            "cache_requests_per_cpu_s": _div(cached["requests_per_cpu_s"], base["requests_per_cpu_s"]),
            "deterministic_p50": _div(det["p50_ms"], base["p50_ms"]),
            "cache_p50": _div(cached["p50_ms"], base["p50_ms"]),
            "deterministic_rps_per_round": _per_round(measured, det["label"], base["label"]),
            "cache_rps_per_round": _per_round(measured, cached["label"], base["label"]),
        }
    return {"rows": rows, "ratios": ratios}


def _per_round(measured: Measured, label: str, baseline: str) -> list[float | None]:
    pairs = zip(measured.coalescing[label], measured.coalescing[baseline], strict=True)
    return [_div(run.result.rps, base.result.rps) for run, base in pairs]


def ensemble_row(target: Target, concurrency: int, runs: Sequence[Run]) -> dict[str, Any]:
    answered = sum(run.result.requests for run in runs)
    degraded = sum(run.counts.get("degraded", 0) for run in runs)
    batching: dict[str, dict[str, Any]] = {}
    for run in runs:
        for name, summary in run.metrics["batching"].items():
            into = batching.setdefault(name, {"batches": 0, "rows": 0, "close_reasons": {}, "queue_wait_ms": []})
            into["batches"] += summary["batches"]
            into["rows"] += summary["rows"]
            into["queue_wait_ms"].append(summary["mean_queue_wait_ms"])
            for reason, count in summary["close_reasons"].items():
                into["close_reasons"][reason] = into["close_reasons"].get(reason, 0) + count
    for summary in batching.values():
        summary["mean_batch_rows"] = _div(summary["rows"], summary["batches"], 2)
        summary["mean_queue_wait_ms"] = _median(summary.pop("queue_wait_ms"))
    return {
        "model": target.model,
        "concurrency": concurrency,
        "expected": target.expected,
        **report.Summary.of([run.result for run in runs]).as_dict(),
        "mean_ms": _median([run.result.mean_ms for run in runs]),
        "requests": answered,
        "degraded": degraded,
        "degraded_share": _div(degraded, answered),
        "failed": sum(run.counts.get("failed", 0) for run in runs),
        "batching": batching,
        "loop_lag_mean_ms": _median([run.metrics["loop_lag"]["mean_ms"] for run in runs]),
        "neighbour_share": _median([run.neighbour_share for run in runs]),
        "runs": [_run_dict(run) for run in runs],
    }


def ensemble_results(measured: Measured, concurrencies: Sequence[int]) -> dict[str, Any]:
    rows = [
        ensemble_row(target, concurrency, measured.ensembles[(target.model, concurrency)])
        for concurrency in concurrencies
        for target in TARGETS
    ]
    at = {(row["model"], row["concurrency"]): row for row in rows}
    ratios = {}
    for c in concurrencies:
        m20, m50, trio = at[("m20", c)], at[("m50", c)], at[("trio", c)]
        late_expected = quorum_expected_p50_ms(m20["p50_ms"], m50["p50_ms"], models.QUORUM_LATE_TIMEOUT_S)
        early_expected = quorum_expected_p50_ms(m20["p50_ms"], m50["p50_ms"], models.QUORUM_EARLY_TIMEOUT_S)
        ratios[str(c)] = {
            "trio_p50_over_m50_p50": _div(trio["p50_ms"], m50["p50_ms"]),
            "trio_p99_over_m50_p99": _div(trio["p99_ms"], m50["p99_ms"]),
            "trio_p50_minus_m50_p50_ms": round(trio["p50_ms"] - m50["p50_ms"], 3),
            "quorum_30ms_expected_p50_ms": round(late_expected, 3),
            "quorum_30ms_p50_over_expected": _div(at[("quorum_30ms", c)]["p50_ms"], late_expected),
            "quorum_15ms_expected_p50_ms": round(early_expected, 3),
            "quorum_15ms_p50_over_expected": _div(at[("quorum_15ms", c)]["p50_ms"], early_expected),
        }
    return {"rows": rows, "ratios": ratios}


def quorum_expected_p50_ms(m20_p50_ms: float, m50_p50_ms: float, timeout_s: float) -> float:
    """A quorum ensemble's expected p50: when its slow member answers, or when it is known not to.

    The slow member takes 50 ms. Given a ``timeout_s`` shorter than that, its batcher, which has
    learned its cost, drops its row as the batch forms (``would_expire``: the batch would end past
    the member's deadline), so the ensemble answers once the 20 ms member has, without waiting for
    the timeout to run out. Both from the members alone in the same run, so the server's own time
    per request (which grows with the concurrency) is in the expectation as in the measurement.
    """
    if timeout_s < models.Member50ms.delay_s:
        return m20_p50_ms
    return max(m20_p50_ms, m50_p50_ms)


def checks(data: dict[str, Any]) -> list[dict[str, Any]]:
    """What the issue expects, each with the measured value, its bound and whether it holds."""
    found: list[dict[str, Any]] = []
    ensemble = data["ensemble"] or {"ratios": {}, "rows": []}
    coalescing = data["coalescing"] or {"rows": []}
    for c, ratio in ensemble["ratios"].items():
        trio = ratio["trio_p50_over_m50_p50"]
        found.append(_check(f"c={c}: trio p50 / m50 p50 <= 1.10 (members run concurrently)", trio, 1.10, trio <= 1.10))
        for name in ("quorum_30ms", "quorum_15ms"):
            value = ratio[f"{name}_p50_over_expected"]
            found.append(
                _check(f"c={c}: {name} p50 / expected p50 in [0.95, 1.15]", value, 1.15, 0.95 <= value <= 1.15)
            )
    for row in ensemble["rows"]:
        want = 1.0 if row["model"].startswith("quorum") else 0.0
        ok = row["degraded_share"] == want and row["failed"] == 0 and row["errors"] == 0
        name = f"c={row['concurrency']}: {row['model']} answers degraded share {want:g}, no errors"
        found.append(_check(name, row["degraded_share"] or 0.0, want, ok))
    hot_share = data["settings"]["hot_share"]
    for row in coalescing["rows"]:
        found.append(_coalescing_check(row, hot_share))
    return found


def _coalescing_check(row: dict[str, Any], hot_share: float) -> dict[str, Any]:
    """Not deterministic: one model row per request received; with the cache: the hot share skips the model."""
    label, errors = row["label"], row["errors"]
    if not row["deterministic"]:
        rows = row["rows_per_request"] or 0.0
        return _check(f"{label}: model rows / request in [0.98, 1.02]", rows, 1.0, 0.98 <= rows <= 1.02 and not errors)
    shared = row["without_model_share"] or 0.0
    if row["server"] == MEMORY_CACHE:
        bound = round(0.9 * hot_share, 3)
        return _check(
            f"{label}: share answered without the model >= 0.9 x hot share",
            shared,
            bound,
            shared >= bound and not errors,
        )
    return _check(f"{label}: share answered without the model > 0", shared, 0.0, shared > 0 and not errors)


def _check(name: str, measured: float, bound: float, passed: bool) -> dict[str, Any]:
    return {"check": name, "measured": round(measured, 3), "bound": bound, "pass": bool(passed)}


def results(measured: Measured, settings: measure.Settings, options: Options, facts: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "benchmark": "composition",
        "machine": facts,
        "settings": {
            **measure.settings_dict(settings),
            "coalescing_concurrency": options.coalescing_concurrency,
            "ensemble_duration_s": options.ensemble_duration_s,
            "hot_inputs": options.hot_inputs,
            "hot_share": options.hot_share,
            "servers": {
                spec.label: " ".join(spec.command).replace("{port}", "<port>")
                for spec in (*COALESCING_SPECS, ENSEMBLE_SPEC)
            },
            "request_bytes": {family.name: len(hot_body(family, 1)) for family in FAMILIES},
        },
        "exit_codes": measured.exit_codes,
        "coalescing": coalescing_results(measured) if "coalescing" in options.parts else None,
        "ensemble": ensemble_results(measured, settings.concurrencies) if "ensemble" in options.parts else None,
    }
    data["checks"] = checks(data)
    return data


# Markdown


def markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    parts = [
        "# Composition: coalescing and the prediction cache; an ensemble against its members",
        _headline(data),
        report.facts_markdown(data["machine"]),
        f"Every server runs `asyncserve serve` with one executor thread and `{_env_text()}`, pinned to CPU "
        f"{data['machine']['server_cpu']}; wrk (`-t1`) is pinned to CPU {data['machine']['load_cpu']}. Each row is "
        f"the median of {s['repeats']} interleaved runs (the order rotates every round) after a {s['warmup_s']} s "
        f"warm-up; each run started once the CPUs were under {harness.QUIET_BUSY_SHARE:.0%} busy or after "
        f"{s['quiet_wait_s']:g} s of waiting for that. Exit codes after SIGTERM: "
        + ", ".join(f"{label} {code}" for label, code in data["exit_codes"].items())
        + ".",
        "## Checks",
        report.markdown_table(
            ["check", "measured", "bound", "result"],
            [
                [c["check"], f"{c['measured']:.3f}", f"{c['bound']:g}", "PASS" if c["pass"] else "FAIL"]
                for c in data["checks"]
            ],
        ),
        _coalescing_markdown(data) if data["coalescing"] else "",
        _ensemble_markdown(data) if data["ensemble"] else "",
    ]
    return "\n\n".join(filter(None, parts)) + "\n"


def _headline(data: dict[str, Any]) -> str:
    """What was measured and the figures that answer it, before the details."""
    s = data["settings"]
    passed = sum(check["pass"] for check in data["checks"])
    parts = [
        "What this measures, on one server core: (1) the throughput of a model declared `deterministic` "
        "(identical requests in flight share one computation), with and without the in-memory prediction cache, "
        f"over the same model not declared so, at c={s['coalescing_concurrency']} with "
        f"{s['hot_share']:.0%} of the requests one of {s['hot_inputs']} hot inputs and the rest unique; (2) the "
        "latency of an ensemble of three `async def` members sleeping 10, 20 and 50 ms against its slowest member "
        f"alone, and of two quorum ensembles (2 of 3, the 50 ms member cut at 30 or 15 ms). Checks: {passed} of "
        f"{len(data['checks'])} pass.",
    ]
    if data["coalescing"]:
        parts.append(_coalescing_headline(data["coalescing"]))
    if data["ensemble"]:
        parts.append(_ensemble_headline(data["ensemble"]))
    return "\n\n".join(parts)


def _coalescing_headline(coalescing: dict[str, Any]) -> str:
    rows = {row["label"]: row for row in coalescing["rows"]}
    lines = []
    for family in FAMILIES:
        ratio = coalescing["ratios"][family.name]
        det, cached = rows[f"{family.name} deterministic"], rows[f"{family.name} deterministic + cache"]
        with_coalescing = _ratio_text(ratio["deterministic_rps"], ratio["deterministic_rps_per_round"])
        with_cache = _ratio_text(ratio["cache_rps"], ratio["cache_rps_per_round"])
        lines.append(
            f"- `{family.name}` ({family.description}): throughput with coalescing ÷ without {with_coalescing}, "
            f"with coalescing and the cache {with_cache}; the model computed {_num(det['rows_per_request'], '.2f')} "
            f"and {_num(cached['rows_per_request'], '.2f')} rows per request instead of 1 "
            f"({_pct(det['coalesced_share'])} coalesced; {_pct(cached['cache_hit_share'])} from the cache)."
        )
    return "\n".join(lines)


def _ratio_text(median: float | None, per_round: Sequence[float | None]) -> str:
    """``**1.38x** (rounds 1.37, 1.41, 1.34)``: the ratio of the medians, and each round's own."""
    return f"**{_num(median, '.2f')}x** (rounds {', '.join(_num(value, '.2f') for value in per_round)})"


def _ensemble_headline(ensemble: dict[str, Any]) -> str:
    at = {(row["model"], row["concurrency"]): row for row in ensemble["rows"]}
    cells = []
    for c, ratio in ensemble["ratios"].items():
        trio, m50 = at[("trio", int(c))], at[("m50", int(c))]
        late, early = at[("quorum_30ms", int(c))], at[("quorum_15ms", int(c))]
        cells.append(
            [
                c,
                f"{report.ms(trio['p50_ms'])} / {report.ms(trio['p99_ms'])}",
                f"{report.ms(m50['p50_ms'])} / {report.ms(m50['p99_ms'])}",
                f"**{_num(ratio['trio_p50_over_m50_p50'], '.3f')}** / {_num(ratio['trio_p99_over_m50_p99'], '.3f')}",
                f"{report.ms(late['p50_ms'])} / {report.ms(late['p99_ms'])} ({_pct(late['degraded_share'])})",
                f"{report.ms(early['p50_ms'])} / {report.ms(early['p99_ms'])} ({_pct(early['degraded_share'])})",
            ]
        )
    table = report.markdown_table(
        [
            "c",
            "ensemble p50 / p99 ms",
            "slowest member (m50) alone",
            "ratio p50 / p99",
            "quorum_30ms (degraded)",
            "quorum_15ms (degraded)",
        ],
        cells,
    )
    return (
        "The ensemble `trio` against its slowest member (the members run concurrently, so it should take "
        "the slowest member's time, not the 80 ms of their sum):\n\n" + table
    )


_OTHERS = (
    "others on core is the median share of the server's core that other processes used during the row's runs "
    "(from /proc/stat, less the server's own CPU time); a run in which they took more than the --disturbed-share "
    "limit was run again, up to --retries times (the JSON keeps the discarded attempts)."
)


def _env_text() -> str:
    return " ".join(f"{key}={value}" for key, value in SERVER_ENV.items())


def _coalescing_markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    rows = data["coalescing"]["rows"]
    ratios = data["coalescing"]["ratios"]
    table = report.markdown_table(
        [
            "case",
            "req/s",
            "min-max",
            "÷ not det.",
            "p50 ms",
            "p99 ms",
            "req/CPU-s ÷ not det.",
            "server CPU",
            "coalesced",
            "cache hits",
            "model rows / request",
            "mean batch",
            "model µs/row",
            "loop lag ms",
            "others on core",
            "errors",
        ],
        [_coalescing_cells(row, ratios[row["model"].split("_")[0]]) for row in rows],
    )
    body = [
        f"## 1. Coalescing: 50% duplicate inputs, c={s['coalescing_concurrency']}",
        f"wrk `-t1 -c{s['coalescing_concurrency']} -d{s['duration_s']}s` on `POST /v1/models/<model>/predict`; its Lua "
        f"script draws each request: with probability {s['hot_share']:g} one of {s['hot_inputs']} hot inputs "
        '(`{"x": [-1, i, ...]}`), otherwise a unique one (`{"x": [run id, n, ...]}`, n counting the run\'s unique '
        "requests). Models: "
        + "; ".join(f"`{f.name}_det` / `{f.name}_nondet`: {f.description}" for f in FAMILIES)
        + f" (request bodies {', '.join(f'{k} {v} B' for k, v in s['request_bytes'].items())}). The `no-cache` "
        "server has no prediction cache; the `memory-cache` server has `ASYNCSERVE_PREDICTION_CACHE=memory` "
        "(TTL 60 s, 10,000 entries, the defaults).",
        table,
        "÷ not det. is the row's req/s over the same model's not-deterministic row, both medians "
        "(per round: " + "; ".join(_per_round_text(name, r) for name, r in ratios.items()) + "). coalesced and "
        "cache hits are shares of the requests the server received (asyncserve_coalesced_requests_total, "
        "asyncserve_prediction_cache_hits_total); model rows / request is rows predicted over requests received "
        "(1.00: every request computed). Received counts the requests answered and those whose client left "
        "before its answer (wrk stopping with requests in flight; asyncserve_client_disconnects_total), and the "
        "metrics are read once the server has finished them. mean batch is rows per predict call; model µs/row is "
        "the wall time inside predict per row: the executor thread shares the core (and the GIL) with the event "
        "loop, so it grows when the loop has more requests to handle per row predicted. loop lag is how late the "
        "event loop woke its 50 ms probe timer, on average. " + _OTHERS + " " + report.LEGEND,
        report.load_warning(row["load_cpu_share"] for row in rows),
    ]
    return "\n\n".join(body)


def _coalescing_cells(row: dict[str, Any], ratio: dict[str, Any]) -> list[str]:
    if not row["deterministic"]:
        rps_ratio, cpu_ratio = "1.00", "1.00"
    elif row["server"] == MEMORY_CACHE:
        rps_ratio, cpu_ratio = _num(ratio["cache_rps"], ".2f"), _num(ratio["cache_requests_per_cpu_s"], ".2f")
    else:
        rps_ratio = _num(ratio["deterministic_rps"], ".2f")
        cpu_ratio = _num(ratio["deterministic_requests_per_cpu_s"], ".2f")
    return [
        row["label"],
        f"{row['rps']:,.0f}",
        f"{row['rps_min']:,.0f}-{row['rps_max']:,.0f}",
        f"**{rps_ratio}**",
        report.ms(row["p50_ms"]),
        report.ms(row["p99_ms"]),
        cpu_ratio,
        f"{row['cpu_share']:.2f}",
        _pct(row["coalesced_share"]),
        _pct(row["cache_hit_share"]),
        _num(row["rows_per_request"], ".2f"),
        _num(row["mean_batch_rows"], ".1f"),
        _num(row["model_us_per_row"], ",.0f"),
        _num(row["loop_lag_mean_ms"], ".2f"),
        _pct(row["neighbour_share"]),
        str(row["errors"]),
    ]


def _per_round_text(name: str, ratio: dict[str, Any]) -> str:
    det = ", ".join(_num(v, ".2f") for v in ratio["deterministic_rps_per_round"])
    cached = ", ".join(_num(v, ".2f") for v in ratio["cache_rps_per_round"])
    return f"{name} deterministic {det}, + cache {cached}"


def _ensemble_markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    rows = data["ensemble"]["rows"]
    table = report.markdown_table(
        [
            "c",
            "model",
            "expected",
            "req/s",
            "p50 ms",
            "p99 ms",
            "mean ms",
            "degraded",
            "errors",
            "loop lag ms",
            "others on core",
        ],
        [
            [
                str(row["concurrency"]),
                f"`{row['model']}`",
                row["expected"],
                f"{row['rps']:,.0f}",
                report.ms(row["p50_ms"]),
                report.ms(row["p99_ms"]),
                _num(row["mean_ms"], ".2f"),
                _pct(row["degraded_share"]),
                str(row["errors"]),
                _num(row["loop_lag_mean_ms"], ".2f"),
                _pct(row["neighbour_share"]),
            ]
            for row in rows
        ],
    )
    ratio_rows = [
        [
            c,
            _num(r["trio_p50_over_m50_p50"], ".3f"),
            f"{r['trio_p50_minus_m50_p50_ms']:+.2f}",
            _num(r["trio_p99_over_m50_p99"], ".3f"),
            report.ms(r["quorum_30ms_expected_p50_ms"]),
            _num(r["quorum_30ms_p50_over_expected"], ".3f"),
            report.ms(r["quorum_15ms_expected_p50_ms"]),
            _num(r["quorum_15ms_p50_over_expected"], ".3f"),
        ]
        for c, r in data["ensemble"]["ratios"].items()
    ]
    body = [
        "## 2. Ensemble latency against its members",
        f'wrk `-t1 -c<c> -d{s["ensemble_duration_s"]}s` on `POST /v1/models/<model>/predict` with `{{"x": 2.0}}`. '
        "Members `m10`, `m20`, `m50` are `async def` models that sleep 10, 20 and 50 ms (an I/O-bound model); "
        "`trio` is their mean; `quorum_30ms` and `quorum_15ms` need 2 of the 3 and give `m50` a timeout of 30 and "
        "15 ms. An ensemble answers once every member has an outcome (an answer, an error or its timeout), so a "
        "quorum ensemble should take max(second-slowest member, the slow member's timeout). degraded is the share "
        "of answers carrying `\"degraded\":true` (counted by wrk's Lua on every answer); errors counts wrk's "
        "socket errors, timeouts and answers other than 2xx (the JSON also has `failed`, the answers other than 200 "
        "that the Lua counted). " + _OTHERS,
        table,
        report.markdown_table(
            [
                "c",
                "trio p50 ÷ m50 p50",
                "trio p50 - m50 p50 ms",
                "trio p99 ÷ m50 p99",
                "quorum_30ms expected p50",
                "measured ÷ expected",
                "quorum_15ms expected p50",
                "measured ÷ expected",
            ],
            ratio_rows,
        ),
        "The expected p50 of a quorum ensemble is max(`m20` p50, `m50` p50 - (50 ms - the timeout)): its "
        "second-slowest member, or its slow member cut short by the timeout, both alone in the same run, so that "
        "the server's own time per request is in the expectation as it is in the measurement.",
        _ensemble_batching_table(rows),
        "Batches during each ensemble's runs, by model (the ensemble itself and each member it called): close "
        "reasons (idle: nothing else running; wait: held up to max_wait_s = 2 ms for company while another batch "
        "ran; deadline: released at once because the tightest deadline in it, here the member's timeout, left no "
        "time to wait) and mean queue wait.",
        report.load_warning(row["load_cpu_share"] for row in rows),
    ]
    return "\n\n".join(body)


def _ensemble_batching_table(rows: Sequence[dict[str, Any]]) -> str:
    cells = []
    for row in rows:
        if row["model"] in MEMBERS:
            continue
        for name, summary in row["batching"].items():
            reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(summary["close_reasons"].items()))
            cells.append(
                [
                    str(row["concurrency"]),
                    f"`{row['model']}`",
                    f"`{name}`",
                    f"{summary['batches']:,}",
                    _num(summary["mean_batch_rows"], ".2f"),
                    reasons or "-",
                    _num(summary["mean_queue_wait_ms"], ".3f"),
                ]
            )
    return report.markdown_table(
        ["c", "run of", "model", "batches", "mean rows", "close reasons", "mean queue wait ms"], cells
    )


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.composition", description=(__doc__ or "").split("\n\n")[0]
    )
    measure.add_arguments(parser, ENSEMBLE_CONCURRENCIES)
    parser.add_argument(
        "--coalescing-concurrency",
        type=int,
        default=COALESCING_CONCURRENCY,
        help=f"connections of the coalescing runs (default {COALESCING_CONCURRENCY}); --concurrency sets the "
        "ensemble runs'",
    )
    parser.add_argument("--ensemble-duration-s", type=int, help="seconds per ensemble run (default 5, quick 2)")
    parser.add_argument("--hot-inputs", type=int, default=HOT_INPUTS, help=f"hot inputs (default {HOT_INPUTS})")
    parser.add_argument(
        "--hot-share", type=float, default=HOT_SHARE, help=f"share of requests with a hot input (default {HOT_SHARE})"
    )
    parser.add_argument(
        "--disturbed-share",
        type=float,
        default=0.1,
        help="run again a run in which other processes took more than this share of the server's core (default 0.1)",
    )
    parser.add_argument("--retries", type=int, default=2, help="most re-runs of a disturbed run (default 2)")
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: both)"
    )
    parser.add_argument("--log-dir", type=Path, help="keep the servers' logs here (default: a temporary directory)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, _stop)  # unwind normally, so that the servers are stopped
    if args.hot_inputs < 1 or not 0 <= args.hot_share <= 1 or args.coalescing_concurrency < 1:
        print("--hot-inputs and --coalescing-concurrency must be >= 1, --hot-share in [0, 1]", file=sys.stderr)
        return 2
    settings = measure.resolve(args, ENSEMBLE_CONCURRENCIES, ENSEMBLE_CONCURRENCIES)
    options = Options(
        coalescing_concurrency=args.coalescing_concurrency,
        ensemble_duration_s=args.ensemble_duration_s or (2 if args.quick else 5),
        hot_inputs=args.hot_inputs,
        hot_share=args.hot_share,
        disturbed_share=args.disturbed_share,
        retries=max(0, args.retries),
        parts=tuple(part for part in PARTS if part in args.parts),
        log_dir=args.log_dir,
    )
    facts = report.machine_facts(settings.server_cpu, settings.load_cpu)
    try:
        measured = measure_all(settings, options)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    report.record_end(facts)
    data = results(measured, settings, options, facts)
    text = markdown(data)
    paths = report.write_results("composition", data, text, settings.output_dir)
    print(report.relative_paths(text))
    print("written: " + ", ".join(str(path) for path in paths))
    return 0


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
