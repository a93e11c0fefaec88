"""The event loop's cost per request, counted in instructions: repeatable on a busy machine, unlike timing.

Runs ``asyncserve serve benchmarks.mlp:service --executor-workers 1`` (the batching benchmark's MLP)
under ``valgrind --tool=callgrind --separate-threads=yes``, warms it up, zeroes the counters, sends a
fixed number of V2 inference requests (the batching benchmark's body: one row of 256 FP32) with a
fixed number in flight from a small asyncio client, dumps the counters, and prints the instructions
per request of each thread of the server. The event loop runs on the main thread (thread 1); the
executor's thread runs the model. The number of batches the run made (from ``/metrics``, read
outside the counted window) is printed beside it: the loop's per-batch work is shared by the rows
of a batch, so the batch sizes move the figure a little.

With ``--checkout LABEL=PATH ...`` each checkout's asyncserve is measured in turn (as
``benchmarks.checkouts`` runs them), round after round (``--repeats``). ``--annotate N`` prints
``callgrind_annotate``'s N costliest C functions of the loop thread (self and inclusive cost).

``--opcodes`` needs no valgrind: the server runs with a Python tracer on its event loop's thread,
switched on for the counted window only, and the script prints the Python functions by bytecodes
executed per request (self) and calls per request: a deterministic profile at Python's level,
which callgrind's C functions do not show.

Usage::

    apt-get install -y valgrind
    git worktree add /tmp/base HEAD~1   # or: mkdir /tmp/base && git archive HEAD~1 | tar -x -C /tmp/base
    .venv/bin/python -m benchmarks.instructions --checkout new=. base=/tmp/base --repeats 2
    .venv/bin/python -m benchmarks.instructions --annotate 40        # this checkout, with the loop's hot C functions
    .venv/bin/python -m benchmarks.instructions --opcodes --top 60   # the loop's Python functions, deterministic

Each run under valgrind takes a few minutes (start-up alone is about a minute). The figures are
counts, not times: other work on the machine does not move them, while a change of code does.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from benchmarks import batching, harness, scrape
from benchmarks import grpc as grpc_benchmark
from benchmarks.checkouts import Checkout
from benchmarks.harness import HOST, BenchmarkError

TARGET = "benchmarks.mlp:service"
PATH = batching.INFER_PATH
BATCHES = "asyncserve_batches_total"
THREAD_ENV = {
    **batching.THREAD_ENV, "PYTHONHASHSEED": "0", "ASYNCSERVE_LOOP_LAG_INTERVAL_S": "3600",
    "ASYNCSERVE_JOB_WORKERS": "0", "ASYNCSERVE_KEEP_ALIVE_S": "3600", "ASYNCSERVE_HEAD_TIMEOUT_S": "3600",
}  # fmt: skip
"""One BLAS thread; and no work that comes with wall-clock time rather than with requests. Under
valgrind a run takes minutes, as many as the machine's load makes it, and what wakes on a timer
would be counted as often: the loop-lag probe (every 50 ms; the lag it would read also sends every
request through the overload check, while a server at c=64 mostly reads a lag near 0 outside
valgrind) and the job worker's polls of its broker (every 50 ms; the jobs API stays on). A long
keep-alive keeps the connections open through the idle window that follows the load, whose
instructions per second (the server's once-a-second tick) are taken out of the requests'. A long head
timeout keeps a gRPC connection whose preface the slowed loop reads late (its timer runs first) from
being closed as a silent client."""


PROTOCOLS = ("json", "binary", "grpc")
"""What the counted requests are: the batching benchmark's V2 JSON row, benchmarks.grpc's V2 binary row over
HTTP/1.1, or the same row as a gRPC ModelInfer."""


@dataclass(frozen=True)
class Target:
    """Where a server under test listens, and which protocol the load speaks."""

    port: int
    grpc_port: int
    protocol: str

    @classmethod
    def new(cls, protocol: str) -> Target:
        return cls(harness.free_port(), harness.free_port(), protocol)


@dataclass(frozen=True)
class Run:
    label: str
    requests: int
    batches: dict[str, float]
    """Batches the counted requests made, by why they closed (full, idle, wait, deadline)."""
    per_thread: dict[int, int]
    """Instructions of each thread of the server (1: the event loop) in the counted window."""
    loop_file: Path | None
    seconds: float
    """The counted window's wall-clock time: the server's once-a-second tick (every connection's
    timeouts) is the one cost left that grows with it, not with the requests."""
    idle_per_s: float
    """The loop's instructions per second with the connections open and idle, measured after the load:
    the tick's cost, which ``loop_less_idle`` takes out."""

    @property
    def loop_per_request(self) -> float:
        return self.per_thread.get(1, 0) / self.requests

    @property
    def loop_less_idle(self) -> float:
        """Loop instructions per request less what the idle loop spends in as long: the requests' own."""
        return (self.per_thread.get(1, 0) - self.idle_per_s * self.seconds) / self.requests


# The load: a fixed number of requests, a fixed number in flight


class Http1Client:
    """One keep-alive HTTP/1.1 connection sending the same request, one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        self.reader, self.writer, self.request = reader, writer, request

    async def call(self) -> bool:
        """Send the request and read its answer: True if it was a 200."""
        self.writer.write(self.request)
        status_line_and_headers = await self.reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?im)^content-length: *(\d+)", status_line_and_headers).group(1))  # type: ignore[union-attr]
        await self.reader.readexactly(length)
        return status_line_and_headers.startswith(b"HTTP/1.1 200 ")


class GrpcClient:
    """One HTTP/2 connection making the same ModelInfer call, one at a time (as h2load -m 1 in benchmarks.grpc).
    The client is h2's state machine, in the load's process: only the server's instructions are counted."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        import h2.connection

        self.reader, self.writer = reader, writer
        self.message = grpc_benchmark.grpc_frame(grpc_benchmark.grpc_message())
        self.headers = [
            (":method", "POST"), (":scheme", "http"), (":path", grpc_benchmark.GRPC_PATH),
            (":authority", f"{HOST}:{port}"), ("content-type", "application/grpc"), ("te", "trailers"),
        ]  # fmt: skip
        self.h2 = h2.connection.H2Connection()
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(2**30)
        writer.write(self.h2.data_to_send())

    async def call(self) -> bool:
        """Make the call and read its answer: True if it ended with grpc-status 0."""
        import h2.events

        stream = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream, self.headers)
        self.h2.send_data(stream, self.message, end_stream=True)
        self.writer.write(self.h2.data_to_send())
        ok = False
        while True:
            data = await self.reader.read(65536)
            if not data:
                raise BenchmarkError("the gRPC server closed a connection")
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    ok = (b"grpc-status", b"0") in event.headers
                elif isinstance(event, h2.events.StreamEnded):
                    self.writer.write(self.h2.data_to_send())
                    return ok
            self.writer.write(self.h2.data_to_send())


Client = Http1Client | GrpcClient


async def drive(target: Target, total: int, in_flight: int, then: Callable[[], None] | None = None) -> int:
    """Send ``total`` requests on ``in_flight`` keep-alive connections; returns how many succeeded.

    ``then`` runs (in a thread) once every answer is in, while the connections are still open.
    """
    connections = min(in_flight, total)
    left = [total]
    ok = [0]
    finished = [0]
    all_finished, release = asyncio.Event(), asyncio.Event()

    async def connect() -> tuple[Client, asyncio.StreamWriter]:
        if target.protocol == "grpc":
            reader, writer = await asyncio.open_connection(HOST, target.grpc_port)
            return GrpcClient(reader, writer, target.grpc_port), writer
        reader, writer = await asyncio.open_connection(HOST, target.port)
        return Http1Client(reader, writer, http_request(target.port, target.protocol)), writer

    async def connection() -> None:
        client, writer = await connect()
        try:
            while left[0] > 0:
                left[0] -= 1
                succeeded = await client.call()  # (not `ok[0] += await ...`: that reads ok[0] before awaiting)
                ok[0] += succeeded
        finally:
            finished[0] += 1
            if finished[0] == connections:
                all_finished.set()
        try:
            await release.wait()
        finally:
            writer.close()

    running = asyncio.gather(*(connection() for _ in range(connections)))
    finished_or_failed = asyncio.ensure_future(all_finished.wait())
    either: list[asyncio.Future[Any]] = [running, finished_or_failed]
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finished_or_failed.cancel()
    if then is not None and not running.done():
        await asyncio.to_thread(then)
    release.set()
    await running
    return ok[0]


def http_request(port: int, protocol: str) -> bytes:
    """The HTTP/1.1 request of ``protocol``: the batching benchmark's JSON body, or benchmarks.grpc's V2 binary one."""
    if protocol == "json":
        body, extra = batching.request_body(), "Content-Type: application/json\r\n"
    else:
        body, header_length = grpc_benchmark.rest_body()
        extra = f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {header_length}\r\n"
    head = f"POST {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def load(target: Target, total: int, in_flight: int, then: Callable[[], None] | None = None) -> None:
    answered = asyncio.run(drive(target, total, in_flight, then))
    if answered != total:
        raise BenchmarkError(f"{total - answered} of {total} requests were not answered 200")


# The server


def server_command(checkout: Checkout | None, target: Target, prefix: Sequence[str]) -> list[str]:
    launcher = checkout.launcher if checkout is not None else (sys.executable, "-m", "asyncserve")
    # `env PYTHONPATH=... python -m asyncserve` from the checkout's launcher, with the prefix (valgrind) before python
    if launcher[0] == "env":
        env_part = [a for a in launcher if "=" in a and not a.startswith("-")]
        python_part = list(launcher[len(env_part) + 1 :])
        command = ["env", *env_part, *prefix, *python_part]
    else:
        command = [*prefix, *launcher]
    options = ["--executor-workers", "1", "--host", HOST, "--port", str(target.port), "--workers", "1"]
    if target.protocol == "grpc":
        options += ["--grpc-port", str(target.grpc_port)]
    return [*command, "serve", TARGET, *options, "--log-level", "warning"]


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"the server exited with {process.returncode} before it was ready")
        try:
            if harness.request(port, "GET", harness.READY_PATH, None, timeout_s=10.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise BenchmarkError(f"the server was not ready within {timeout_s:g} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def batches(port: int) -> dict[str, float]:
    return scrape.by_label(scrape.scrape(port), BATCHES, "reason")


def callgrind(label: str, checkout: Checkout | None, args: argparse.Namespace, out_dir: Path) -> Run:
    target = Target.new(args.protocol)
    port = target.port
    prefix = [
        "valgrind", "--tool=callgrind", "--separate-threads=yes", "--dump-instr=no",
        f"--callgrind-out-file={out_dir}/callgrind.out.%p",
    ]  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **THREAD_ENV}
    log = (out_dir / f"{label}.log").open("wb")
    process = subprocess.Popen(server_command(checkout, target, prefix), env=env, stdout=log, stderr=log)
    try:
        wait_ready(port, process, args.ready_timeout_s)
        load(target, args.warmup, args.in_flight)
        before = batches(port)
        control = ["callgrind_control", str(process.pid)]
        subprocess.run([*control, "--zero"], check=True, capture_output=True)
        started = time.monotonic()
        windows: list[float] = []

        def count_then_idle() -> None:
            subprocess.run([*control, "--dump=counted"], check=True, capture_output=True)
            windows.append(time.monotonic() - started)
            idle_started = time.monotonic()
            time.sleep(args.idle_s)  # the connections stay open, idle (ASYNCSERVE_KEEP_ALIVE_S)
            subprocess.run([*control, "--dump=idle"], check=True, capture_output=True)
            windows.append(time.monotonic() - idle_started)

        load(target, args.requests, args.in_flight, count_then_idle)
        after = batches(port)
        made = {reason: count - before.get(reason, 0.0) for reason, count in after.items()}
    finally:
        stop(process)
        log.close()
    counted, loop_file = _read_dump(out_dir, process.pid, 1)
    idle, _ = _read_dump(out_dir, process.pid, 2)
    return Run(label, args.requests, made, counted, loop_file, windows[0], idle.get(1, 0) / windows[1])


_TOTALS = re.compile(r"^(?:summary|totals): (\d+)", re.MULTILINE)


def _read_dump(out_dir: Path, pid: int, part: int) -> tuple[dict[int, int], Path | None]:
    """Each thread's instructions in dump ``part`` (``callgrind.out.PID.PART-NN``), and the loop's file."""
    per_thread: dict[int, int] = {}
    loop_file = None
    for path in sorted(out_dir.glob(f"callgrind.out.{pid}.{part}-*")):
        thread = int(path.name.rpartition("-")[2])
        found = _TOTALS.search(path.read_text(errors="replace"))
        per_thread[thread] = int(found.group(1)) if found else 0
        if thread == 1:
            loop_file = path
    if not per_thread:
        raise BenchmarkError(
            f"no callgrind dump of pid {pid} in {out_dir}: {sorted(p.name for p in out_dir.iterdir())}"
        )
    return per_thread, loop_file


_ROW = re.compile(r"^\s*[\d,]+ \(\s*([\d.]+)%\)")


def annotate(path: Path, top: int) -> str:
    lines: list[str] = []
    for inclusive in ("no", "yes"):
        command = ["callgrind_annotate", f"--inclusive={inclusive}", "--threshold=100", str(path)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        # Zeroing the counters mid-run leaves the frames then on the stack (the loop's own) at 100% or more:
        # they say nothing, and are left out.
        rows = [line for line in output.splitlines() if (found := _ROW.match(line)) and float(found[1]) < 99.0]
        lines.append(f"--- {'inclusive' if inclusive == 'yes' else 'self'} ---")
        lines.extend(rows[:top])
    return "\n".join(lines)


# --opcodes: the server side (run as `python -m benchmarks.instructions --serve-traced ...`)


def serve_traced(argv: Sequence[str]) -> None:
    """Run asyncserve's CLI with a bytecode counter on this (the loop's) thread, on between SIGUSR1 and SIGUSR2."""
    counts: collections.Counter[CodeType] = collections.Counter()
    calls: collections.Counter[CodeType] = collections.Counter()
    out = Path(os.environ["ASYNCSERVE_OPCODES_OUT"])

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            counts[frame.f_code] += 1
        return local

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        calls[frame.f_code] += 1
        return local

    def start(*_: Any) -> None:
        counts.clear()
        calls.clear()
        sys.settrace(trace)

    def finish(*_: Any) -> None:
        sys.settrace(None)
        rows = [
            f"{counts[code]}\t{calls[code]}\t{code.co_qualname}\t{code.co_filename}:{code.co_firstlineno}"
            for code in set(counts) | set(calls)
        ]
        out.write_text("\n".join(rows))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, finish)
    from asyncserve.cli import main

    sys.exit(main(list(argv)))


def opcodes(label: str, checkout: Checkout | None, args: argparse.Namespace, out_dir: Path) -> str:
    target = Target.new(args.protocol)
    port = target.port
    out = out_dir / f"{label}.opcodes"
    command = server_command(checkout, target, [])
    # python -m asyncserve ... -> python -m benchmarks.instructions --serve-traced ...
    at = command.index("asyncserve", command.index("-m"))
    command[at : at + 1] = ["benchmarks.instructions", "--serve-traced"]
    env = {**os.environ, **THREAD_ENV, "ASYNCSERVE_OPCODES_OUT": str(out)}
    if checkout is None:
        env["PYTHONPATH"] = str(harness.REPO)
    process = subprocess.Popen(command, env=env)
    try:
        wait_ready(port, process, args.ready_timeout_s)
        load(target, args.warmup, args.in_flight)
        process.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        load(target, args.requests, args.in_flight)
        process.send_signal(signal.SIGUSR2)
        for _ in range(100):
            if out.exists():
                break
            time.sleep(0.1)
    finally:
        stop(process)
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    rows.sort(key=lambda row: -int(row[0]))
    total = sum(int(row[0]) for row in rows)
    n = args.requests
    lines = [f"{label}: {total / n:.0f} bytecodes per request on the loop thread"]
    lines += [f"{int(r[0]) / n:9.1f} {int(r[1]) / n:7.2f}  {r[2]}  {_short(r[3])}" for r in rows[: args.top]]
    return "\n".join(lines)


def _short(where: str) -> str:
    return re.sub(r".*/(asyncserve|site-packages|lib/python3\.\d+)/", r"\1/", where)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve-traced"]:
        serve_traced(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__.split("\n")[0])
    parser.add_argument("--checkout", type=Checkout.parse, nargs="+", default=[], metavar="LABEL=PATH")
    parser.add_argument("--requests", type=int, default=3000, help="requests counted (default 3000)")
    parser.add_argument("--warmup", type=int, default=500, help="requests before counting (default 500)")
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, default="json", help="the counted requests' protocol (default json)"
    )
    parser.add_argument("--in-flight", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the checkouts (default 1)")
    parser.add_argument("--annotate", type=int, default=0, metavar="N", help="print the loop's N costliest C functions")
    parser.add_argument("--opcodes", action="store_true", help="count Python bytecodes instead (no valgrind)")
    parser.add_argument("--top", type=int, default=50, help="functions listed by --opcodes (default 50)")
    parser.add_argument("--idle-s", type=float, default=20.0, help="idle window after the load (default 20)")
    parser.add_argument("--ready-timeout-s", type=float, default=600.0)
    parser.add_argument("--keep", type=Path, help="keep the callgrind files in this directory")
    args = parser.parse_args(argv)
    targets: list[tuple[str, Checkout | None]] = [(c.label, c) for c in args.checkout] or [("installed", None)]
    if not args.opcodes and shutil.which("valgrind") is None:
        raise BenchmarkError("valgrind is not installed: apt-get install -y valgrind")
    out_dir = args.keep or Path(tempfile.mkdtemp(prefix="instructions-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    for round_ in range(args.repeats):
        for label, checkout in targets:
            if args.opcodes:
                print(opcodes(f"{label}-{round_}", checkout, args, out_dir), flush=True)
                continue
            run = callgrind(f"{label}-{round_}", checkout, args, out_dir / f"{label}-{round_}")
            runs.append(run)
            threads = "  ".join(f"t{t}: {n / run.requests:,.0f}" for t, n in sorted(run.per_thread.items()))
            made = sum(run.batches.values())
            reasons = ", ".join(f"{reason} {count:.0f}" for reason, count in run.batches.items() if count)
            print(
                f"{label} round {round_ + 1}: loop {run.loop_per_request:,.0f} instructions/request, "
                f"{run.loop_less_idle:,.0f} less the idle loop's {run.idle_per_s:,.0f}/s "
                f"({made:.0f} batches of {run.requests / made:.1f} rows: {reasons}; {run.seconds:.0f} s; "
                f"per thread {threads})",
                flush=True,
            )
            if args.annotate and run.loop_file is not None:
                print(annotate(run.loop_file, args.annotate), flush=True)
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
