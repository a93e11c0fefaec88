"""A real asyncserve process serving gRPC beside HTTP, for the gRPC tests.

The server runs in a process of its own: its generated ``inference`` messages and tritonclient's
cannot share one process's protobuf descriptor pool (both define ``inference.ModelInferRequest``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from tests.processes import PYTHON_M_ASYNCSERVE, REPO, free_port

SERVICE = "tests.grpc.services:service"


@dataclass
class Served:
    """A running server: its HTTP base URL and its gRPC address (``host:port``)."""

    process: asyncio.subprocess.Process
    log: Path
    http_url: str
    grpc_url: str

    async def log_text(self) -> str:
        return await asyncio.to_thread(self.log.read_text, errors="replace")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)


@asynccontextmanager
async def serve_grpc(
    log_dir: Path, *args: str, env: dict[str, str] | None = None, certfile: Path | None = None, service: str = SERVICE
) -> AsyncIterator[Served]:
    """``python -m asyncserve serve SERVICE --port P --grpc-port G ARGS``, once its gRPC ServerReady says true."""
    http_port, grpc_port = free_port(), free_port()
    command = [*PYTHON_M_ASYNCSERVE, "serve", service, "--port", str(http_port), "--grpc-port", str(grpc_port), *args]
    log = log_dir / f"grpc-{uuid.uuid4().hex[:8]}.log"
    output = await asyncio.to_thread(log.open, "wb")
    try:
        process = await asyncio.create_subprocess_exec(
            *command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=output, stderr=asyncio.subprocess.STDOUT
        )
    finally:
        await asyncio.to_thread(output.close)
    scheme = "https" if certfile else "http"
    served = Served(process, log, f"{scheme}://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    try:
        await wait_ready(served, certfile)
        yield served
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), 10)


_ENGINE_KEEPER: list[grpc.aio.Channel] = []


async def aio_client(url: str, certfile: Path | None = None) -> triton_aio.InferenceServerClient:
    """tritonclient's asyncio client; with ``certfile``, over TLS trusting that certificate.

    When a process's last asyncio channel closes, grpc shuts its asyncio engine down and joins a thread
    on the event loop: one idle channel stays open for the session, so that happens at exit, not in a test.
    """
    if not _ENGINE_KEEPER:
        _ENGINE_KEEPER.append(grpc.aio.insecure_channel("127.0.0.1:9"))
    if certfile is None:
        return triton_aio.InferenceServerClient(url)
    trusted = grpc.ssl_channel_credentials(root_certificates=await asyncio.to_thread(certfile.read_bytes))
    return triton_aio.InferenceServerClient(url, creds=trusted)


async def wait_ready(served: Served, certfile: Path | None, timeout_s: float = 30.0) -> None:
    client = await aio_client(served.grpc_url, certfile)
    try:
        async with asyncio.timeout(timeout_s):
            while served.process.returncode is None:
                try:
                    if await client.is_server_ready():
                        return
                except InferenceServerException:
                    pass
                await asyncio.sleep(0.05)
    finally:
        await client.close()
    raise AssertionError(f"the server exited with {served.process.returncode}:\n{await served.log_text()}")


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    async with serve_grpc(tmp_path_factory.mktemp("grpc")) as running:
        yield running
