"""Start a server pinned to one core, check it answers, drive it with wrk pinned to another, stop it.

Everything stays on the loopback interface, and every wait is bounded: readiness (60 s by
default), each wrk run (its duration plus a margin) and shutdown after SIGTERM.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
READY_PATH = "/v2/health/ready"
# uvicorn shuts down gracefully on SIGTERM and then re-raises the signal, so the clean exit of a
# uvicorn process is -SIGTERM; a server that exits by itself after its shutdown returns 0.
CLEAN_EXIT_CODES = (0, -signal.SIGTERM)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUIET_BUSY_SHARE = 0.15
"""The busy share of all CPUs under which the machine counts as quiet enough to start a run."""


class BenchmarkError(Exception):
    """A benchmark could not run or measured something invalid; the message says why."""


@dataclass(frozen=True)
class Endpoint:
    """One request that wrk repeats: its label, method, path and body, and how to check an answer."""

    label: str
    method: str
    path: str
    body: bytes | None
    check: Callable[[bytes], bool]


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server: a label and the command, with ``{port}`` standing for the port."""

    label: str
    command: tuple[str, ...]


@dataclass
class Server:
    """A started server; ``exit_code`` is set once it has stopped."""

    spec: ServerSpec
    port: int
    pid: int
    log_path: Path
    exit_code: int | None = field(default=None)


def free_port() -> int:
    """An ephemeral loopback port that was free a moment ago (the server binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def uvicorn_command(app: str) -> tuple[str, ...]:
    """uvicorn as the brief fixes it: uvloop, httptools, no access log, one worker."""
    return (
        sys.executable, "-m", "uvicorn", app, "--host", HOST, "--port", "{port}",
        "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--workers", "1", "--log-level", "warning",
    )  # fmt: skip


def installed_asyncserve() -> tuple[str, ...]:
    """The command that starts the asyncserve installed beside this interpreter (``pip install asyncserve``)."""
    script = Path(sys.executable).parent / "asyncserve"
    return (str(script),) if script.exists() else (sys.executable, "-m", "asyncserve")


def asyncserve_command(target: str, *options: str, launcher: Sequence[str] = ()) -> tuple[str, ...]:
    """``asyncserve serve TARGET`` on loopback, one worker, as uvicorn runs the baselines (no request log).

    ``launcher`` starts asyncserve (default: the installed one; ``checkouts.Checkout.launcher`` runs
    another checkout's), and ``options`` go after the target, for example ``--executor-workers 1``.
    """
    return (
        *(launcher or installed_asyncserve()), "serve", target, *options, "--host", HOST, "--port", "{port}",
        "--workers", "1", "--log-level", "warning",
    )  # fmt: skip


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchmarkError(f"{name} is not installed; install it with: apt-get update && apt-get install -y {name}")
    return path


def check_cpus(*cpus: int) -> None:
    available = os.sched_getaffinity(0)
    missing = sorted(set(cpus) - available)
    if missing:
        raise BenchmarkError(f"CPU(s) {missing} are not available to this process (it may use {sorted(available)})")


@contextlib.contextmanager
def running_server(spec: ServerSpec, cpu: int | str, log_dir: Path, ready_timeout_s: float = 60.0) -> Iterator[Server]:
    """Start ``spec`` pinned to ``cpu`` (or a list such as ``"0,1"``), yield it once ready, then SIGTERM it and
    check it exits cleanly."""
    port = free_port()
    log_path = log_dir / f"{spec.label}.log"
    command = ["taskset", "-c", str(cpu), *(part.format(port=port) for part in spec.command)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_server_env())
        server = Server(spec=spec, port=port, pid=process.pid, log_path=log_path)
        try:
            _wait_ready(process, server, ready_timeout_s)
            yield server
        except BaseException:
            with contextlib.suppress(BenchmarkError):  # the error that brought us here is the one to report
                _stop(process, server, timeout_s=10.0)
            raise
        _stop(process, server, timeout_s=30.0)
        if server.exit_code not in CLEAN_EXIT_CODES:
            raise BenchmarkError(f"{spec.label} exited with {server.exit_code} after SIGTERM{_log_tail(log_path)}")


def _server_env() -> dict[str, str]:
    # A console script puts its own directory first on sys.path, not the current one: make
    # `benchmarks.trivial` importable whatever the server's import logic does.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _wait_ready(process: subprocess.Popen[bytes], server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(
                f"{server.spec.label} exited with {process.returncode} before it was ready{_log_tail(server.log_path)}"
            )
        with contextlib.suppress(OSError, http.client.HTTPException):
            if request(server.port, "GET", READY_PATH, None, timeout_s=1.0)[0] == 200:
                return
        time.sleep(0.1)
    raise BenchmarkError(f"{server.spec.label} did not answer GET {READY_PATH} with 200 within {timeout_s:.0f} s")


def _stop(process: subprocess.Popen[bytes], server: Server, timeout_s: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        server.exit_code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10.0)
        raise BenchmarkError(f"{server.spec.label} did not exit within {timeout_s:.0f} s of SIGTERM") from None


def _log_tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "; its log ends:\n" + "\n".join(text) if text else " (its log is empty)"


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by the process and its live descendants.

    The descendants count so that a server with a process pool (``--executor process``) is
    charged for its predictions too.
    """
    return sum(_own_cpu_s(member) for member in _process_tree(pid))


def _process_tree(pid: int) -> list[int]:
    tree, index = [pid], 0
    while index < len(tree):
        for task in Path(f"/proc/{tree[index]}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                tree += [int(child) for child in task.read_text().split()]
        index += 1
    return tree


def _own_cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0  # it exited meanwhile
    # The fields after the command name, which is in parentheses and may hold spaces: utime and
    # stime are fields 14 and 15 of the line, so 12 and 13 of what follows ")".
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def cpu_busy_share(interval_s: float = 0.5) -> float:
    """The busy share of all CPUs over ``interval_s`` (0 idle, 1 every core busy), from ``/proc/stat``."""
    busy_0, total_0 = _cpu_times()
    time.sleep(interval_s)
    busy_1, total_1 = _cpu_times()
    return round((busy_1 - busy_0) / (total_1 - total_0), 3) if total_1 > total_0 else 0.0


def _cpu_times() -> tuple[int, int]:
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_for_quiet(max_wait_s: float, busy_threshold: float = QUIET_BUSY_SHARE) -> float:
    """Wait, at most ``max_wait_s``, until other processes leave the CPUs nearly idle; returns the last busy share.

    The servers under test idle between runs, so what keeps the CPUs busy then is a neighbour
    (a test suite, another benchmark), whose work would land on the next run.
    """
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy_share()
    while busy > busy_threshold and time.monotonic() < deadline:
        busy = cpu_busy_share()
    return busy


def request(port: int, method: str, path: str, body: bytes | None, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """One HTTP request on loopback; returns the status and the body."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def check_endpoint(server: Server, endpoint: Endpoint) -> None:
    """Refuse to measure an endpoint that does not answer correctly (a fast 404 is no result)."""
    status, body = request(server.port, endpoint.method, endpoint.path, endpoint.body)
    if status != 200 or not endpoint.check(body):
        raise BenchmarkError(
            f"{server.spec.label} answered {endpoint.method} {endpoint.path} with {status} {body[:300]!r}, "
            "not the expected result"
        )


def check_all(servers: Sequence[Server], endpoints: Sequence[Endpoint]) -> None:
    for server in servers:
        for endpoint in endpoints:
            check_endpoint(server, endpoint)
