"""Shared fixtures: a real uvicorn server on an ephemeral port, in its own thread and event loop."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.machinery
import importlib.util
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from blockbuster import BlockBuster, blockbuster_ctx

from asyncserve.app import AsyncServeApp
from asyncserve.config import Settings
from asyncserve.server import Server, bind_socket, make_server
from asyncserve.service import Service

# Fixtures for the real PostgreSQL and Redis servers live in tests/backends.py.
pytest_plugins = ["tests.backends"]


EXPECT_COMPILED = os.environ.get("ASYNCSERVE_EXPECT_COMPILED") == "1"
"""Whether this run tests the compiled build (`make test`'s second run), in this process and the servers it starts."""


def served_build_is_expected(metrics_text: str) -> bool:
    """Whether a server's ``/metrics`` says it runs the build this run tests."""
    return f'asyncserve_build_info{{compiled="{"true" if EXPECT_COMPILED else "false"}"' in metrics_text


def compiled_request_path() -> bool:
    """Whether the asyncserve imported here is the compiled build: its batcher is a C extension."""
    spec = importlib.util.find_spec("asyncserve.batching")
    origin = spec.origin if spec is not None else None
    return origin is not None and origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def pytest_configure(config: pytest.Config) -> None:
    # `make test` runs the suite on the .py files, then the request-path tests on build/compiled:
    # make sure each run gets the build it means to test.
    if EXPECT_COMPILED and not compiled_request_path():
        raise pytest.UsageError(
            "ASYNCSERVE_EXPECT_COMPILED=1 but the asyncserve imported is not compiled: run `make compiled` and put "
            "build/compiled first on PYTHONPATH with pytest --import-mode=append"
        )
    if not EXPECT_COMPILED and compiled_request_path():
        raise pytest.UsageError(
            "compiled modules shadow asyncserve's .py files (a compiled build left them in the source tree): remove "
            "them (rm -f asyncserve/*.so *__mypyc.*.so), or set ASYNCSERVE_EXPECT_COMPILED=1 to test them on purpose"
        )


@dataclass
class RunningServer:
    app: AsyncServeApp
    server: Server
    url: str

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30.0, **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def serve_in_thread(
    service: Service, settings: Settings | None = None, *, wait_ready: bool = True
) -> Iterator[RunningServer]:
    """Run the real server (uvicorn, uvloop, httptools) on 127.0.0.1:0 until the block ends."""
    settings = settings or Settings(executor_workers=2, loop_lag_interval_s=0.01, jobs="memory://")
    sock = bind_socket("127.0.0.1", 0)
    app = AsyncServeApp(service, settings)
    server = make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started, "the server to start")
        if wait_ready:
            _wait(lambda: app._loading is not None and app._loading.done(), "the models to load")
        host, port = sock.getsockname()[:2]
        yield RunningServer(app, server, f"http://{host}:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextlib.asynccontextmanager
async def serving(
    service: Service, settings: Settings | None = None, *, wait_ready: bool = True
) -> AsyncIterator[RunningServer]:
    """``serve_in_thread`` for async tests: starting and stopping run off the test's event loop."""
    manager = serve_in_thread(service, settings, wait_ready=wait_ready)
    running = await asyncio.to_thread(manager.__enter__)
    try:
        yield running
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)


@contextlib.asynccontextmanager
async def serving_asgi(app: object) -> AsyncIterator[str]:
    """Any ASGI app (a fake feature service, say) on uvicorn at 127.0.0.1:0, in its own thread; yields its URL."""
    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="off", log_level="warning")  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        await asyncio.to_thread(_wait, lambda: server.started, "the ASGI server to start")
        host, port = sock.getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 30)
        sock.close()


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    event = threading.Event()
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        event.wait(0.01)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def running(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    """A server for the test module's ``SERVICE`` (and optional ``SETTINGS``)."""
    service: Service = request.module.SERVICE
    settings: Settings | None = getattr(request.module, "SETTINGS", None)
    with serve_in_thread(service, settings) as server:
        yield server


@pytest.fixture
async def client(running: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with running.client() as client:
        yield client


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any test in which a blocking call (file, socket, sleep, lock) runs on an event loop thread."""
    with blockbuster_ctx() as detector:
        # Client libraries read a file or two while opening a connection, once per connection:
        # asyncpg its ~/.pgpass and ~/.postgresql, redis its own package version. Tolerated there, nowhere else.
        for function in detector.functions.values():
            function.can_block_in(
                "asyncpg/connect_utils.py",
                {"_read_password_file", "_dot_postgresql_path", "_parse_connect_dsn_and_args"},
            )
            function.can_block_in("redis/utils.py", "get_lib_version")
        yield detector
