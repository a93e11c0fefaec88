"""Real asyncserve processes for async end-to-end tests: started, awaited ready, and killed if left running.

Unlike ``tests.test_server.cli``, a process logs to a file rather than a pipe (a worker logs a line
per job, and nobody reads a pipe until the end), and ``kill()`` is SIGKILL, as ``kill -9`` sends.
Every wait is bounded and runs without blocking the test's event loop.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
FINAL = ("succeeded", "failed", "cancelled", "expired")
SERVICE = "tests.services:jobs"


@dataclass
class Running:
    """A started ``python -m asyncserve ...``; ``url`` is None for a worker (it serves no HTTP)."""

    process: asyncio.subprocess.Process
    log: Path
    url: str | None

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to hand anything back."""
        self.process.kill()

    async def log_text(self) -> str:
        return await asyncio.to_thread(self.log.read_text, errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


PYTHON_M_ASYNCSERVE = (sys.executable, "-m", "asyncserve")


@asynccontextmanager
async def launch(
    *args: str,
    env: dict[str, str],
    log_dir: Path,
    http: bool = True,
    program: Sequence[str] = PYTHON_M_ASYNCSERVE,
    cwd: Path = REPO,
    port: int | None = None,
) -> AsyncIterator[Running]:
    """Run ``python -m asyncserve ARGS`` (or ``program ARGS``; with ``--port`` when ``http``: ``port``, or
    a free one) in ``cwd`` and wait until it is ready.

    A server is ready when ``/v2/health/ready`` answers 200, a worker when it logs "worker ready".
    """
    port = (port or free_port()) if http else None
    command = [*program, *args, *(["--port", str(port)] if port else [])]
    log = log_dir / f"{args[0]}-{uuid.uuid4().hex[:8]}.log"
    output = await asyncio.to_thread(log.open, "wb")
    try:
        process = await asyncio.create_subprocess_exec(
            *command, cwd=cwd, env={**os.environ, **env}, stdout=output, stderr=asyncio.subprocess.STDOUT
        )
    finally:
        await asyncio.to_thread(output.close)
    running = Running(process, log, f"http://127.0.0.1:{port}" if port else None)
    try:
        await _wait_ready(running)
        yield running
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), 10)


async def _wait_ready(running: Running, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s), httpx.AsyncClient(timeout=1) as client:
        while running.process.returncode is None:
            if await _is_ready(running, client):
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{running.log.name} exited with {running.process.returncode}:\n{await running.log_text()}")


async def _is_ready(running: Running, client: httpx.AsyncClient) -> bool:
    if running.url is None:
        return "worker ready" in await running.log_text()
    try:
        return (await client.get(f"{running.url}/v2/health/ready")).status_code == 200
    except httpx.TransportError:
        return False


async def wait_final(client: httpx.AsyncClient, job_id: str, timeout_s: float = 20.0) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` until the job is final; return it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] in FINAL:
            return job
        await asyncio.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not finish within {timeout_s}s: {job}")


async def eventually(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 15.0) -> None:
    """Wait until the async ``condition()`` is true, checking every 20 ms."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
