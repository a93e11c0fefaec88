"""gRPC against V2 REST binary on one asyncserve server: the batching MLP, at c=64 and c=1.

One ``asyncserve serve benchmarks.mlp:service --executor-workers 1 --grpc-port G`` pinned to one
core; h2load (nghttp2's load generator, C, pinned to the other core) sends the same request over
both protocols, so the load generator costs the same whichever is measured:

- REST: ``POST /v2/models/mlp/infer`` over HTTP/1.1, one row of 256 FP32 values as binary tensor
  data (1024 bytes after the JSON header, ``Inference-Header-Content-Length``), the output asked
  as binary: what ``tritonclient.http`` sends by default;
- gRPC: ``/inference.GRPCInferenceService/ModelInfer`` over HTTP/2, the same row in
  ``raw_input_contents``: what ``tritonclient.grpc`` sends.

Each connection has one request in flight (``h2load -c C -m 1``): c=64 is 64 connections, as wrk's
c=64 in the batching benchmark. Runs interleave A, B, A, B (the first protocol alternating from one
round to the next), and the throughput target compares the two within each round: the median over
the rounds of gRPC's req/s over REST's. p50 comes from h2load's per-request log; h2load counts HTTP 2xx, so the
server's own counters (``asyncserve_grpc_requests_total{code="OK"}``, ``asyncserve_requests_total
{status="200"}``) are checked against it after every run. The server's CPU time by thread, read
from /proc around each run, gives the CPU each protocol costs per request.

Usage::

    apt-get install -y nghttp2-client
    .venv/bin/python -m benchmarks.grpc            # ~6 min: 10 s runs, 5 rounds, c = 64 and 1
    .venv/bin/python -m benchmarks.grpc --quick    # 3 s runs, 1 round

Results go to ``benchmarks/results/grpc.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks import harness, mlp, procstat, report, scrape
from benchmarks.harness import HOST, BenchmarkError, Server, ServerSpec
from benchmarks.scrape import Samples

REST, GRPC, FLOOR = "rest", "grpc", "grpc-bare"
"""FLOOR: a bare grpc.aio server answering a fixed response (benchmarks/grpc_floor.py), grpc.aio's own cost:
what asyncserve's gRPC stood on before it had its own HTTP/2, kept as the reference a grpc.aio server cannot beat."""
INFER_PATH = "/v2/models/mlp/infer"
GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Options:
    duration_s: int
    warmup_s: int
    rounds: int
    concurrencies: tuple[int, ...]
    server_cpu: int
    load_cpu: int


@dataclass
class RunResult:
    protocol: str
    concurrency: int
    requests_per_s: float
    succeeded: int
    failed: int
    p50_ms: float
    p99_ms: float
    served_ok: int
    """What the server counted as answered OK during the run (its /metrics)."""
    server_cpu_s: dict[str, float]
    """The server's CPU seconds by thread during the run (``main`` is the event loop)."""
    mean_batch: float

    @property
    def cpu_us_per_request(self) -> float:
        return sum(self.server_cpu_s.values()) / max(1, self.succeeded) * 1e6

    @property
    def loop_cpu_us_per_request(self) -> float:
        return self.server_cpu_s.get("main", 0.0) / max(1, self.succeeded) * 1e6


# The two requests


def row() -> np.ndarray[Any, np.dtype[np.float32]]:
    value: np.ndarray[Any, np.dtype[np.float32]] = mlp.example_rows(1)[0].astype("<f4")
    return value


def rest_body() -> tuple[bytes, int]:
    """The V2 binary request, and the length of its JSON header."""
    data = row().tobytes()
    header = {
        "inputs": [
            {
                "name": "x",
                "shape": [1, mlp.INPUT_SIZE],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(data)},
            }
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }
    json_part = orjson.dumps(header)
    return json_part + data, len(json_part)


def grpc_message() -> bytes:
    """The ModelInferRequest of the same row, serialized."""
    from asyncserve.grpc import inference_pb2 as pb  # the benchmark's process only: no tritonclient here

    request = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[row().tobytes()])
    request.inputs.add(name="x", datatype="FP32", shape=[1, mlp.INPUT_SIZE])
    return request.SerializeToString()


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, then the length, big-endian."""
    return struct.pack(">BI", 0, len(message)) + message


def check_answers(server: Server, grpc_port: int) -> None:
    """One request of each kind answers the MLP's 16 outputs (a fast error would be no result)."""
    body, header_length = rest_body()
    connection = http.client.HTTPConnection(HOST, server.port, timeout=5)
    try:
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}
        connection.request("POST", INFER_PATH, body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    length = int(response.getheader("inference-header-content-length") or 0)
    if response.status != 200 or len(answer) - length != 4 * mlp.OUTPUT_SIZE:
        raise BenchmarkError(f"REST answered {response.status} {answer[:300]!r}")
    check_grpc_answer(grpc_port)


def check_grpc_answer(grpc_port: int) -> None:  # (what the bare server answers too)
    import grpc

    from asyncserve.grpc import inference_pb2 as pb

    with grpc.insecure_channel(f"{HOST}:{grpc_port}") as channel:
        infer = channel.unary_unary(GRPC_PATH, response_deserializer=pb.ModelInferResponse.FromString)
        response = infer(grpc_message(), timeout=5)
    if len(response.raw_output_contents) != 1 or len(response.raw_output_contents[0]) != 4 * mlp.OUTPUT_SIZE:
        raise BenchmarkError(f"gRPC answered {response}")


# One run


def h2load_command(
    protocol: str, server: Server, grpc_port: int, files: dict[str, Path], concurrency: int
) -> list[str]:
    common = ["-t1", f"-c{concurrency}", "-m1", f"--log-file={files['log']}"]
    if protocol == REST:
        _, header_length = rest_body()
        headers = [
            "-H",
            "content-type: application/octet-stream",
            "-H",
            f"inference-header-content-length: {header_length}",
        ]
        return [*common, "--h1", "-d", str(files[REST]), *headers, f"http://{HOST}:{server.port}{INFER_PATH}"]
    headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    return [*common, "-d", str(files[GRPC]), *headers, f"http://{HOST}:{grpc_port}{GRPC_PATH}"]


def run_once(protocol: str, target: Target, files: dict[str, Path], concurrency: int, options: Options) -> RunResult:
    grpc_port = target.floor_port if protocol == FLOOR else target.grpc_port
    command = h2load_command(GRPC if protocol == FLOOR else protocol, target.server, grpc_port, files, concurrency)
    timing = [f"--warm-up-time={options.warmup_s}s", f"-D{options.duration_s}"]
    pid = target.floor_pid if protocol == FLOOR else target.server.pid
    files["log"].unlink(missing_ok=True)
    before, cpu_before = scrape.scrape(target.server.port), procstat.thread_cpu_s(pid)
    result = subprocess.run(
        ["taskset", "-c", str(options.load_cpu), "h2load", *timing, *command],
        capture_output=True,
        text=True,
        check=False,
    )
    cpu_after, after = procstat.thread_cpu_s(pid), scrape.scrape(target.server.port)
    if result.returncode != 0:
        raise BenchmarkError(f"h2load failed: {result.stderr or result.stdout}")
    succeeded, failed, per_s = parse_h2load(result.stdout)
    latencies = read_latencies_ms(files["log"])
    run = scrape.delta(before, after)
    bare = protocol == FLOOR  # it counts nothing: h2load's count stands
    return RunResult(
        protocol, concurrency, per_s, succeeded, failed,
        percentile(latencies, 50), percentile(latencies, 99), succeeded if bare else served_ok(run, protocol),
        procstat.thread_cpu_delta(cpu_before, cpu_after), float("nan") if bare else mean_batch(run),
    )  # fmt: skip


@dataclass
class Target:
    """The asyncserve server, its gRPC port, and the bare grpc.aio server (its process and port)."""

    server: Server
    grpc_port: int
    floor_pid: int
    floor_port: int


def parse_h2load(stdout: str) -> tuple[int, int, float]:
    """(requests succeeded, failed, requests per second) from h2load's summary."""
    succeeded = failed = -1
    per_s = float("nan")
    for line in stdout.splitlines():
        words = line.replace(",", "").split()
        if line.startswith("requests:"):
            succeeded, failed = int(words[words.index("succeeded") - 1]), int(words[words.index("failed") - 1])
        elif line.startswith("finished in"):
            per_s = float(words[3])
    if succeeded < 0:
        raise BenchmarkError(f"h2load printed no summary:\n{stdout}")
    return succeeded, failed, per_s


def read_latencies_ms(log: Path) -> list[float]:
    """Each request's latency from h2load's log (start time, status, microseconds; tab-separated)."""
    return sorted(int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line.strip())


def percentile(values: Sequence[float], q: int) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def served_ok(run: Samples, protocol: str) -> int:
    if protocol == GRPC:
        return int(scrape.total(run, "asyncserve_grpc_requests_total", method="ModelInfer", model="mlp", code="OK"))
    return int(scrape.total(run, "asyncserve_requests_total", route="v2_infer", model="mlp", status="200"))


def mean_batch(run: Samples) -> float:
    rows = scrape.total(run, "asyncserve_batch_rows_sum", model="mlp")
    batches = scrape.total(run, "asyncserve_batch_rows_count", model="mlp")
    return round(rows / batches, 1) if batches else float("nan")


# The whole benchmark


def measure(options: Options, workdir: Path) -> list[RunResult]:
    harness.require_tool("taskset")
    harness.require_tool("h2load")
    harness.check_cpus(options.server_cpu, options.load_cpu)
    body, _ = rest_body()
    files = {REST: workdir / "rest.bin", GRPC: workdir / "grpc.bin", "log": workdir / "requests.log"}
    files[REST].write_bytes(body)
    files[GRPC].write_bytes(grpc_frame(grpc_message()))
    grpc_port = harness.free_port()
    spec = ServerSpec(
        "asyncserve", harness.asyncserve_command(
            "benchmarks.mlp:service", "--executor-workers", "1", "--grpc-port", str(grpc_port)
        ),
    )  # fmt: skip
    results: list[RunResult] = []
    with harness.running_server(spec, options.server_cpu, workdir) as server, running_floor(options, workdir) as floor:
        check_answers(server, grpc_port)
        check_grpc_answer(floor[1])
        target = Target(server, grpc_port, *floor)
        for concurrency in options.concurrencies:
            for number in range(options.rounds):
                order = [REST, GRPC] if number % 2 == 0 else [GRPC, REST]
                if concurrency == max(options.concurrencies):
                    order.append(FLOOR)
                for protocol in order:
                    harness.wait_for_quiet(10.0)
                    result = run_once(protocol, target, files, concurrency, options)
                    _log(
                        f"c={concurrency} round {number + 1} {protocol}: {result.requests_per_s:,.0f} req/s, "
                        f"p50 {result.p50_ms:.3f} ms, {result.cpu_us_per_request:.0f} µs CPU/req, "
                        f"batch {result.mean_batch}"
                    )
                    results.append(result)
    return results


@contextlib.contextmanager
def running_floor(options: Options, workdir: Path) -> Iterator[tuple[int, int]]:
    """The bare grpc.aio server (benchmarks/grpc_floor.py) pinned beside asyncserve: (pid, port), once it answers."""
    port = harness.free_port()
    command = [
        "taskset",
        "-c",
        str(options.server_cpu),
        sys.executable,
        "-m",
        "benchmarks.grpc_floor",
        "--port",
        str(port),
    ]
    with (workdir / "grpc-bare.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=harness.REPO)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                check_grpc_answer(port)
                break
            except Exception:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise BenchmarkError("the bare grpc.aio server did not start") from None
                time.sleep(0.1)
        yield process.pid, port
    finally:
        process.terminate()
        process.wait(timeout=10)


def summary(results: Sequence[RunResult], protocol: str, concurrency: int) -> dict[str, Any]:
    runs = [r for r in results if r.protocol == protocol and r.concurrency == concurrency]
    return {
        "requests_per_s": statistics.median(r.requests_per_s for r in runs),
        "p50_ms": statistics.median(r.p50_ms for r in runs),
        "p99_ms": statistics.median(r.p99_ms for r in runs),
        "cpu_us_per_request": round(statistics.median(r.cpu_us_per_request for r in runs), 1),
        "loop_cpu_us_per_request": round(statistics.median(r.loop_cpu_us_per_request for r in runs), 1),
        "mean_batch": statistics.median(r.mean_batch for r in runs),
        "failed": sum(r.failed for r in runs),
        "unconfirmed": sum(max(0, r.succeeded - r.served_ok) for r in runs),
        "runs": [r.requests_per_s for r in runs],
    }


def round_ratios(results: Sequence[RunResult], concurrency: int) -> list[float]:
    """gRPC's req/s over REST's in each round. The two ran back to back within a round, so the ratio cancels
    the machine's drift from one round to the next, which the two medians taken apart keep."""
    rest = [r.requests_per_s for r in results if r.protocol == REST and r.concurrency == concurrency]
    grpc_ = [r.requests_per_s for r in results if r.protocol == GRPC and r.concurrency == concurrency]
    return [round(g / r, 3) for r, g in zip(rest, grpc_, strict=True)]


def targets(summaries: dict[str, dict[int, dict[str, Any]]], ratios_c64: Sequence[float]) -> list[dict[str, Any]]:
    rest, grpc_ = summaries[REST], summaries[GRPC]
    found = []
    if ratios_c64:
        measured = statistics.median(ratios_c64)
        found.append({
            "target": "c=64 gRPC req/s / REST req/s >= 1 (median of the rounds)",
            "measured": measured, "bound": 1.0, "pass": measured >= 1.0,
        })  # fmt: skip
    if 1 in rest:
        measured, bound = grpc_[1]["p50_ms"], rest[1]["p50_ms"] + 0.5
        found.append(
            {
                "target": "c=1 gRPC p50 <= REST p50 + 0.5 ms",
                "measured": measured,
                "bound": bound,
                "pass": measured <= bound,
            }
        )
    return found


def markdown(data: dict[str, Any]) -> str:
    facts = data["facts"]
    lines = [
        "# gRPC vs V2 REST binary on one asyncserve server (batching MLP)",
        "",
        f"- date: {facts['date']}; commit: {facts['git_commit']}; command: `{facts['command']}`",
        f"- machine: nproc {facts['nproc']}, {facts['cpu_model']}; server pinned to CPU {facts['server_cpu']}, "
        f"h2load to CPU {facts['load_cpu']}; load average at start {facts['loadavg_start']}",
        f"- {data['method']}",
        "",
        "## Targets",
        "",
        report.markdown_table(
            ["target", "measured", "bound", "result"],
            [
                [t["target"], f"{t['measured']:,.3f}", f"{t['bound']:,.3f}", "PASS" if t["pass"] else "FAIL"]
                for t in data["targets"]
            ],
        ),
        "",
        f"c=64, gRPC ÷ REST round by round (the two back to back): {data['ratios_c64']}",
        "",
        "## Runs (medians)",
        "",
    ]
    rows = []
    for concurrency, by_protocol in sorted(data["by_concurrency"].items(), key=lambda item: -int(item[0])):
        for protocol, s in by_protocol.items():
            rows.append([
                str(concurrency), protocol, f"{s['requests_per_s']:,.0f}", f"{s['p50_ms']:.3f}", f"{s['p99_ms']:.3f}",
                f"{s['cpu_us_per_request']:.0f}", f"{s['loop_cpu_us_per_request']:.0f}", f"{s['mean_batch']}",
                f"{s['failed']} / {s['unconfirmed']}", " ".join(f"{r:,.0f}" for r in s["runs"]),
            ])  # fmt: skip
    headers = ["c", "protocol", "req/s", "p50 ms", "p99 ms", "server CPU µs/req", "loop µs/req", "mean batch",
               "failed / unconfirmed", "each run req/s"]  # fmt: skip
    lines += [report.markdown_table(headers, rows), "", data["notes"], ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=int, default=10)
    parser.add_argument("--warmup-s", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 round")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--name", default="grpc")
    args = parser.parse_args(argv)
    options = Options(
        3 if args.quick else args.duration_s, 1 if args.quick else args.warmup_s, 1 if args.quick else args.rounds,
        tuple(args.concurrency), args.server_cpu, args.load_cpu,
    )  # fmt: skip
    facts = report.machine_facts(options.server_cpu, options.load_cpu)
    with tempfile.TemporaryDirectory(prefix="asyncserve-grpc-bench-") as workdir:
        for name, value in THREAD_ENV.items():
            os.environ.setdefault(name, value)
        results = measure(options, Path(workdir))
    report.record_end(facts)
    by_concurrency = {
        c: {
            p: summary(results, p, c)
            for p in (REST, GRPC, FLOOR)
            if any(r.protocol == p and r.concurrency == c for r in results)
        }
        for c in options.concurrencies
    }
    ratios_c64 = round_ratios(results, 64) if 64 in options.concurrencies else []
    data = {
        "facts": facts,
        "method": (
            f"each row is the median of {options.rounds} h2load runs of {options.duration_s} s after a "
            f"{options.warmup_s} s warm-up, one request in flight per connection, REST and gRPC interleaved"
        ),
        "by_concurrency": by_concurrency,
        "ratios_c64": ratios_c64,
        "targets": targets(
            {p: {c: by_concurrency[c][p] for c in options.concurrencies} for p in (REST, GRPC)}, ratios_c64
        ),
        "notes": NOTES,
        "runs": [vars(r) for r in results],
    }
    json_path, md_path = report.write_results(args.name, data, markdown(data))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


NOTES = (
    "grpc is asyncserve's own HTTP/2 (src/asyncserve/grpc/http2.py). grpc-bare is a bare grpc.aio server on "
    "uvloop answering every ModelInfer with the same pre-serialized response without decoding the request "
    "(benchmarks/grpc_floor.py): the CPU a call costs grpc.aio alone, a floor under any server built on it (as "
    "asyncserve's gRPC was before it had its own HTTP/2). "
    "server CPU µs/req is the server's CPU time (all threads: the event loop, grpc's own threads, the executor "
    "running the model) over the requests h2load completed; loop µs/req is the event-loop thread's alone. failed "
    "counts h2load's failures; unconfirmed, the 2xx answers the server did not count as OK (a gRPC error is an "
    "HTTP 200 with a grpc-status trailer, which h2load does not read)."
)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
