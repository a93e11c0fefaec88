"""The Python client: ``AsyncClient`` against a bare aiohttp loop on the same server, and time to a stream's first part.

    python -m benchmarks.client            # about 5 min: 5 s runs, 5 rounds, c = 1 64 256, 50 streams
    python -m benchmarks.client --quick    # about 1 min: 2 s runs, 1 round

One ``asyncserve serve benchmarks.trivial:service`` pinned to CPU 0 (``taskset``); the clients run
in this process, pinned to CPU 1, on asyncio's own event loop (``--loop uvloop`` for uvloop's).

- **Throughput**: ``c`` coroutines each send ``POST /v1/models/echo/predict`` ``{"x": [1, 2, 3, 4]}``
  one after another for ``--duration-s`` (after ``--warmup-s`` on the same connections), through
  ``AsyncClient.predict`` or through a bare aiohttp loop (one ``ClientSession`` with a connector of
  ``c`` connections: ``session.post(url, data=orjson.dumps(row))``, ``await response.read()``,
  ``orjson.loads``). Both run once per round, interleaved (``measure.interleave``; the order rotates
  between rounds), and each round gives the ratio ``AsyncClient req/s ÷ bare req/s``; the table shows
  the medians. CPU per request is this process's CPU time (the client's whole cost) per answer.
- **Time to first part**: ``POST /v1/models/ticker/predict`` with ``Accept: text/event-stream`` to a
  second server (``benchmarks.client:streaming``, also on CPU 0), whose model yields 10 parts 10 ms
  apart: the time from sending to the first part and to the end, one stream at a time, with
  ``AsyncClient.stream`` and with aiohttp reading the events itself.

Results: ``results/client.{json,md}``. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import orjson

from asyncserve import AsyncClient
from asyncserve.model import Model
from asyncserve.service import Service
from asyncserve.tensors import Tensor
from benchmarks import harness, measure, report
from benchmarks.harness import HOST, Endpoint, Server, ServerSpec
from benchmarks.measure import Scenario

CONCURRENCIES = (1, 64, 256)
QUICK_CONCURRENCIES = (1, 256)
ROW = {"x": [1.0, 2.0, 3.0, 4.0]}
EXPECTED = {"y": [2.0, 4.0, 6.0, 8.0]}
TARGET_RATIO = 0.8
"""AsyncClient must keep at least this share of a bare aiohttp loop's throughput at 256 requests in flight."""
PARTS, PART_PAUSE_S = 10, 0.01
VARIANTS = ("AsyncClient", "bare aiohttp")


# --- the streaming server's model (served by `asyncserve serve benchmarks.client:streaming`) ---------------


class Ticker(Model):
    """Yields ``parts`` parts, ``pause_s`` apart (a model computing each one)."""

    name = "ticker"
    inputs = {"parts": Tensor("INT64"), "pause_s": Tensor("FP64")}
    outputs = {"i": Tensor("INT64")}

    def predict(self, parts: npt.NDArray[np.int64], pause_s: npt.NDArray[np.float64]) -> Iterator[dict[str, Any]]:
        for i in range(int(parts[0])):
            time.sleep(float(pause_s[0]))
            yield {"i": [i]}


streaming = Service(Ticker(), name="streaming")


# --- throughput ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One variant at one concurrency in one round."""

    variant: str
    concurrency: int
    round: int
    requests: int
    errors: int
    duration_s: float
    client_cpu_s: float
    server_cpu_s: float
    busy_before: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s

    @property
    def client_cpu_us_per_request(self) -> float:
        return self.client_cpu_s / self.requests * 1e6 if self.requests else float("nan")


Send = Callable[[], Awaitable[Any]]


@contextlib.asynccontextmanager
async def sender(variant: str, url: str, concurrency: int) -> AsyncIterator[Send]:
    """How one request is sent by ``variant``: the AsyncClient, or aiohttp as one would use it bare."""
    if variant == "AsyncClient":
        async with AsyncClient(url, max_connections=concurrency) as client:
            yield lambda: client.predict("echo", ROW)
        return
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        predict_url = f"{url}/v1/models/echo/predict"
        headers = {"Content-Type": "application/json"}

        async def send() -> Any:
            async with session.post(predict_url, data=orjson.dumps(ROW), headers=headers) as response:
                body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"the server answered {response.status}: {body[:200]!r}")
            return orjson.loads(body)

        yield send


async def load(send: Send, concurrency: int, duration_s: float) -> tuple[int, int, float]:
    """``concurrency`` loops sending requests for ``duration_s``: (answers, errors, seconds)."""
    counts = [0, 0]
    started = time.perf_counter()
    end = started + duration_s

    async def loop() -> None:
        while time.perf_counter() < end:
            try:
                await send()
                counts[0] += 1
            except Exception:
                counts[1] += 1

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(loop())
    return counts[0], counts[1], time.perf_counter() - started


async def measure_run(
    variant: str, url: str, concurrency: int, settings: measure.Settings
) -> tuple[int, int, float, float]:
    """Warm the connections up, then load: (answers, errors, seconds, this process's CPU seconds)."""
    async with sender(variant, url, concurrency) as send:
        if await send() != EXPECTED:
            raise harness.BenchmarkError(f"{variant}: the server did not answer {EXPECTED}")
        await load(send, concurrency, settings.warmup_s)
        cpu_before = time.process_time()
        requests, errors, seconds = await load(send, concurrency, settings.duration_s)
        return requests, errors, seconds, time.process_time() - cpu_before


def run_loop(work: Awaitable[Any], loop_name: str) -> Any:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(work)  # type: ignore[arg-type]
    return asyncio.run(work)  # type: ignore[arg-type]


def throughput(server: Server, settings: measure.Settings, loop_name: str) -> list[Run]:
    """Every variant at every concurrency, round after round, through ``measure.interleave``."""
    # measure.interleave rotates servers; here the server is one, seen by each client variant in turn.
    views = [dataclasses.replace(server, spec=ServerSpec(variant, server.spec.command)) for variant in VARIANTS]
    endpoint = Endpoint("v1 predict", "POST", "/v1/models/echo/predict", orjson.dumps(ROW), lambda body: True)
    url = f"http://{HOST}:{server.port}"

    def run_once(view: Server, scenario: Scenario, number: int) -> Run:
        busy = harness.wait_for_quiet(settings.quiet_wait_s) if settings.quiet_wait_s > 0 else float("nan")
        server_before = harness.process_cpu_s(server.pid)
        requests, errors, seconds, cpu_s = run_loop(
            measure_run(view.spec.label, url, scenario.concurrency, settings), loop_name
        )
        server_cpu_s = harness.process_cpu_s(server.pid) - server_before
        run = Run(view.spec.label, scenario.concurrency, number, requests, errors, seconds, cpu_s, server_cpu_s, busy)
        _log(f"round {number} {run.variant:>12} c={run.concurrency:<4} {run.rps:8.0f} req/s  "
             f"client {run.client_cpu_us_per_request:6.1f} µs CPU/request  errors {errors}")  # fmt: skip
        return run

    runs = measure.interleave(views, measure.grid([endpoint], settings.concurrencies), settings.repeats, run_once)
    return [run for per_key in runs.values() for run in per_key]


# --- time to first part ------------------------------------------------------------------------------------


STREAM_INPUTS = {"parts": PARTS, "pause_s": PART_PAUSE_S}


async def client_stream_times(url: str, streams: int) -> list[tuple[float, float]]:
    """(seconds to the first part, seconds to the end) of ``streams`` streams, one at a time, by AsyncClient."""
    times = []
    async with AsyncClient(url) as client:
        for _ in range(streams):
            started = time.perf_counter()
            first = None
            async for _part in client.stream("ticker", STREAM_INPUTS):
                first = first or time.perf_counter() - started
            times.append((first or float("nan"), time.perf_counter() - started))
    return times


async def bare_stream_times(url: str, streams: int) -> list[tuple[float, float]]:
    """The same with aiohttp alone, splitting the events from the chunks as they come."""
    times = []
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    body = orjson.dumps(STREAM_INPUTS)
    async with aiohttp.ClientSession() as session:
        for _ in range(streams):
            started = time.perf_counter()
            first = None
            async with session.post(f"{url}/v1/models/ticker/predict", data=body, headers=headers) as response:
                async for chunk in response.content.iter_any():
                    if first is None and b"data: " in chunk:
                        first = time.perf_counter() - started
            times.append((first or float("nan"), time.perf_counter() - started))
    return times


def first_parts(server: Server, streams: int, rounds: int, loop_name: str) -> dict[str, list[tuple[float, float]]]:
    url = f"http://{HOST}:{server.port}"
    measured: dict[str, list[tuple[float, float]]] = {variant: [] for variant in VARIANTS}
    for number in range(rounds):
        order = VARIANTS if number % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            timing = client_stream_times if variant == "AsyncClient" else bare_stream_times
            measured[variant] += run_loop(timing(url, streams), loop_name)
            _log(f"round {number + 1} {variant:>12} first part, median {_ms(measured[variant], 0):.2f} ms")
    return measured


def _ms(times: Sequence[tuple[float, float]], index: int, quantile: float = 0.5) -> float:
    values = sorted(t[index] for t in times)
    return values[min(len(values) - 1, int(quantile * len(values)))] * 1000 if values else float("nan")


# --- the report --------------------------------------------------------------------------------------------


def summarize(runs: Sequence[Run], concurrencies: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for concurrency in concurrencies:
        by_variant = {v: [r for r in runs if r.variant == v and r.concurrency == concurrency] for v in VARIANTS}
        client, bare = by_variant["AsyncClient"], by_variant["bare aiohttp"]
        ratios = [c.rps / b.rps for c, b in zip(client, bare, strict=True) if b.rps > 0]
        cpu_ratios = [
            b.client_cpu_us_per_request / c.client_cpu_us_per_request for c, b in zip(client, bare, strict=True)
        ]
        rows.append({
            "concurrency": concurrency,
            "async_client_rps": round(statistics.median(r.rps for r in client), 1),
            "bare_aiohttp_rps": round(statistics.median(r.rps for r in bare), 1),
            "ratio_per_round": [round(ratio, 3) for ratio in ratios],
            "ratio_median": round(statistics.median(ratios), 3),
            "requests_per_cpu_s_ratio_median": round(statistics.median(cpu_ratios), 3),
            "async_client_cpu_us_per_request": round(statistics.median(r.client_cpu_us_per_request for r in client), 1),
            "bare_aiohttp_cpu_us_per_request": round(statistics.median(r.client_cpu_us_per_request for r in bare), 1),
            "errors": sum(r.errors for r in (*client, *bare)),
        })  # fmt: skip
    return rows


def stream_summary(measured: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, float]]:
    return {
        variant: {
            "streams": len(times),
            "first_part_p50_ms": round(_ms(times, 0), 2),
            "first_part_p90_ms": round(_ms(times, 0, 0.9), 2),
            "last_part_p50_ms": round(_ms(times, 1), 2),
        }
        for variant, times in measured.items()
    }


def markdown(data: dict[str, Any]) -> str:
    rows = [
        [
            str(row["concurrency"]), f"{row['async_client_rps']:,.0f}", f"{row['bare_aiohttp_rps']:,.0f}",
            f"**{row['ratio_median']:.3f}**", ", ".join(f"{r:.3f}" for r in row["ratio_per_round"]),
            f"{row['async_client_cpu_us_per_request']:.0f}", f"{row['bare_aiohttp_cpu_us_per_request']:.0f}",
            f"{row['requests_per_cpu_s_ratio_median']:.3f}", str(row["errors"]),
        ]
        for row in data["throughput"]
    ]  # fmt: skip
    table = report.markdown_table(
        ["in flight", "AsyncClient req/s", "bare aiohttp req/s", "ratio (median)", "ratio per round",
         "AsyncClient µs CPU/req", "bare µs CPU/req", "req/CPU-s ratio", "errors"],
        rows,
    )  # fmt: skip
    streams = report.markdown_table(
        ["client", "streams", "first part p50 (ms)", "first part p90 (ms)", "last part p50 (ms)"],
        [
            [variant, str(s["streams"]), f"{s['first_part_p50_ms']:.2f}", f"{s['first_part_p90_ms']:.2f}",
             f"{s['last_part_p50_ms']:.2f}"]
            for variant, s in data["streams"].items()
        ],
    )  # fmt: skip
    verdict = data["verdict"]
    return "\n\n".join([
        "# The Python client: AsyncClient vs a bare aiohttp loop",
        f"At 256 requests in flight AsyncClient keeps **{verdict['ratio_at_256']:.3f}** of the bare aiohttp loop's "
        f"throughput against the same server (target >= {TARGET_RATIO}): **{'met' if verdict['met'] else 'NOT met'}**.",
        table,
        f"`POST /v1/models/echo/predict` to `asyncserve serve benchmarks.trivial:service` (CPU "
        f"{data['facts']['server_cpu']}); the clients in one process on CPU {data['facts']['load_cpu']}, on "
        f"{data['settings']['loop']}'s event loop. Each round runs both clients at each concurrency, back to back "
        f"(the order rotating), for {data['settings']['duration_s']} s after {data['settings']['warmup_s']} s of "
        f"warm-up on the same connections; the ratio is AsyncClient ÷ bare of the same round, and the table "
        f"shows medians over {data['settings']['repeats']} rounds. µs CPU/req is the client process's CPU time "
        "per answer: the client's whole cost, and req/CPU-s ratio its inverse ratio (bare ÷ AsyncClient per "
        "round, median), the steadiest measure on a shared machine. Where the client's core is the bottleneck "
        "(the server, on its own core, answers faster than one Python process can ask), req/s measures the "
        "clients, not the server.",
        "## Time to the first part of a stream",
        streams,
        f"`ticker` yields {PARTS} parts {PART_PAUSE_S * 1000:.0f} ms apart (`benchmarks.client:streaming`, "
        "CPU 0), one stream at a time, Server-Sent Events; the bare client reads aiohttp's chunks until the "
        "first `data:`.",
        "## Machine",
        report.facts_markdown(data["facts"]),
    ]) + "\n"  # fmt: skip


# --- running -----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[measure.Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.client", description=__doc__.split("\n")[0])
    measure.add_arguments(parser, CONCURRENCIES)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="the clients' event loop")
    parser.add_argument("--streams", type=int, help="streams per client and round (default 50, quick 20)")
    parser.set_defaults(quiet_wait_s=5.0)  # 30 runs: at most 2.5 min of waiting for a quiet machine
    args = parser.parse_args(argv)
    settings = measure.resolve(args, CONCURRENCIES, QUICK_CONCURRENCIES)
    if args.duration_s is None:
        settings = dataclasses.replace(settings, duration_s=2 if args.quick else 5)
    if args.repeats is None:
        settings = dataclasses.replace(settings, repeats=1 if args.quick else 5)
    if args.warmup_s is None:
        settings = dataclasses.replace(settings, warmup_s=1)
    args.streams = args.streams or (20 if args.quick else 50)
    return settings, args


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = parse_args(argv)
    harness.require_tool("taskset")
    harness.check_cpus(settings.server_cpu, settings.load_cpu)
    facts = report.machine_facts(settings.server_cpu, settings.load_cpu)
    trivial = ServerSpec("asyncserve", harness.asyncserve_command("benchmarks.trivial:service"))
    streams = ServerSpec("streaming", harness.asyncserve_command("benchmarks.client:streaming"))
    with tempfile.TemporaryDirectory(prefix="asyncserve-bench-") as tmp, contextlib.ExitStack() as stack:
        server, stream_server = measure.start_servers(stack, [trivial, streams], settings, Path(tmp))
        os.sched_setaffinity(0, {settings.load_cpu})  # the clients: this process, on the other core
        runs = throughput(server, settings, args.loop)
        timings = first_parts(stream_server, args.streams, settings.repeats, args.loop)
    report.record_end(facts)
    rows = summarize(runs, settings.concurrencies)
    at_256 = next((row["ratio_median"] for row in rows if row["concurrency"] == 256), float("nan"))
    run_settings = {k: v for k, v in measure.settings_dict(settings).items() if k != "wrk"}
    data: dict[str, Any] = {
        "settings": {**run_settings, "loop": args.loop, "streams": args.streams},
        "facts": facts,
        "throughput": rows,
        "streams": stream_summary(timings),
        "verdict": {"ratio_at_256": at_256, "target": TARGET_RATIO, "met": bool(at_256 >= TARGET_RATIO)},
        "runs": [{**dataclasses.asdict(run), "rps": round(run.rps, 1)} for run in runs],
    }
    json_path, md_path = report.write_results("client", data, markdown(data), settings.output_dir)
    _log(f"wrote {json_path} and {md_path}")
    return 0 if data["verdict"]["met"] else 1


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
