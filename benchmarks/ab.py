"""Interleaved A/B of asyncserve checkouts on the batching benchmark's MLP: where did a change move the cost?

Each variant is ``label=PATH``: a checkout (a ``git worktree``) whose ``asyncserve`` package is
imported first, ``PATH/src/asyncserve`` in the src layout or ``PATH/asyncserve`` in the older one
(``benchmarks.checkouts``); the ``benchmarks`` package is this repository's. Every variant runs
``asyncserve serve benchmarks.mlp:service --executor-workers 1`` pinned to the server core, and
wrk on the other core loads each in turn, round after round (the order rotating), so that the
machine's drift falls on all of them alike. Per run it prints req/s, the CPU time per request of
the event loop's thread and of the other threads (the executor: the model), the mean batch and the
loop's lag; then the medians::

    git worktree add ../base HEAD~1
    python -m benchmarks.ab --concurrency 64 --repeats 4 base=../base new=.

On this two-core shared machine a difference under about 5% in one A/B is noise: repeat it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import batching, harness, measure, procstat, scrape, wrk
from benchmarks.checkouts import Checkout
from benchmarks.harness import BenchmarkError, Server, ServerSpec
from benchmarks.measure import Scenario


@dataclass(frozen=True)
class Sample:
    rps: float
    loop_us: float
    other_us: float
    mean_batch: float
    lag_ms: float

    def line(self, label: str) -> str:
        return (
            f"{label:12s} {self.rps:8.0f} req/s  loop {self.loop_us:6.1f} µs  other {self.other_us:6.1f} µs  "
            f"total {self.loop_us + self.other_us:6.1f} µs  batch {self.mean_batch:5.1f}  lag {self.lag_ms:5.2f} ms"
        )


def variant(checkout: Checkout) -> ServerSpec:
    return ServerSpec(checkout.label, batching.served_command(checkout.launcher))


def sample(server: Server, script: Path, concurrency: int, duration_s: int, load_cpu: int) -> Sample:
    cpu_before, metrics_before = procstat.thread_cpu_s(server.pid), scrape.scrape(server.port)
    result = wrk.run_wrk(server.port, batching.INFER_PATH, script, concurrency, duration_s, load_cpu)
    cpu = procstat.thread_cpu_delta(cpu_before, procstat.thread_cpu_s(server.pid))
    metrics = scrape.delta(metrics_before, scrape.scrape(server.port))
    if result.errors or not result.requests:
        raise BenchmarkError(f"{server.spec.label}: {result.errors} errors in {result.requests} requests")
    loop_s = cpu.get("main", 0.0)
    other_s = sum(seconds for name, seconds in cpu.items() if name != "main")
    batches = sum(scrape.select(metrics, "asyncserve_batch_rows_count").values())
    rows = sum(scrape.select(metrics, "asyncserve_batch_rows_sum").values())
    wakeups = sum(scrape.select(metrics, "asyncserve_event_loop_lag_seconds_count").values())
    lag_s = sum(scrape.select(metrics, "asyncserve_event_loop_lag_seconds_sum").values())
    return Sample(
        rps=result.rps,
        loop_us=1e6 * loop_s / result.requests,
        other_us=1e6 * other_s / result.requests,
        mean_batch=rows / batches if batches else 0.0,
        lag_ms=1e3 * lag_s / wakeups if wakeups else 0.0,
    )


def median(samples: Sequence[Sample]) -> Sample:
    return Sample(
        rps=statistics.median(s.rps for s in samples),
        loop_us=statistics.median(s.loop_us for s in samples),
        other_us=statistics.median(s.other_us for s in samples),
        mean_batch=statistics.median(s.mean_batch for s in samples),
        lag_ms=statistics.median(s.lag_ms for s in samples),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("variants", type=Checkout.parse, nargs="+", metavar="label=PATH")
    parser.add_argument("--concurrency", type=int, default=64, help="open connections (default 64)")
    parser.add_argument("--duration-s", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (default 3)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        samples = run(args)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    print(f"medians of {args.repeats} runs at c={args.concurrency}:")
    for key, runs in samples.items():
        print(median(runs).line(key[0]))
    return 0


def run(args: argparse.Namespace) -> dict[measure.RunKey, list[Sample]]:
    harness.check_cpus(args.server_cpu, args.load_cpu)
    harness.require_tool("wrk")
    for checkout in args.variants:
        imports = checkout.check_imports()
        print(f"{checkout.label}: {checkout.commit()}, asyncserve from {imports['asyncserve']}", flush=True)
    scenario = Scenario(batching.ENDPOINT, args.concurrency)
    with tempfile.TemporaryDirectory() as workdir, contextlib.ExitStack() as stack:
        script = wrk.write_script(batching.ENDPOINT, Path(workdir))
        servers = [
            stack.enter_context(harness.running_server(variant(checkout), args.server_cpu, Path(workdir)))
            for checkout in args.variants
        ]
        for server in servers:  # warm up
            wrk.run_wrk(server.port, batching.INFER_PATH, script, args.concurrency, 2, args.load_cpu)

        def run_once(server: Server, _: Scenario, number: int) -> Sample:
            result = sample(server, script, args.concurrency, args.duration_s, args.load_cpu)
            print(f"round {number} " + result.line(server.spec.label), flush=True)
            return result

        return measure.interleave(servers, [scenario], args.repeats, run_once)


if __name__ == "__main__":
    sys.exit(main())
