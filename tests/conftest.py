"""Shared fixtures: a real asyncserve server on an ephemeral port, in its own thread and event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
import uvloop
from blockbuster import BlockBuster, blockbuster_ctx

from asyncserve.app import App
from asyncserve.config import Settings
from asyncserve.http.server import HttpServer
from asyncserve.server import bind_socket, http_server_for, run_app
from asyncserve.service import Service

# Fixtures for the real PostgreSQL and Redis servers live in tests/backends.py.
pytest_plugins = ["tests.backends"]


@dataclass
class RunningServer:
    app: App
    server: HttpServer
    url: str
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event = field(repr=False)

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30.0, **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def serve_in_thread(
    service: Service, settings: Settings | None = None, *, wait_ready: bool = True
) -> Iterator[RunningServer]:
    """Run the real server (asyncserve's protocol on uvloop) on 127.0.0.1:0 until the block ends."""
    settings = settings or Settings(executor_workers=2, loop_lag_interval_s=0.01, jobs="memory://")
    app = App(service, settings)  # first: a service App refuses leaves no socket open
    sock = bind_socket("127.0.0.1", 0)
    started: list[RunningServer] = []
    failed: list[BaseException] = []
    ready = threading.Event()

    async def main() -> None:
        stop = asyncio.Event()
        server = http_server_for(app)
        host, port = sock.getsockname()[:2]
        started.append(RunningServer(app, server, f"http://{host}:{port}", asyncio.get_running_loop(), stop))
        ready.set()
        await run_app(app, [sock], stop, server=server)

    def run() -> None:
        try:
            uvloop.run(main())
        except BaseException as exc:
            failed.append(exc)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        ready.wait(30)
        if failed:
            raise failed[0]
        running = started[0]
        _wait(lambda: bool(running.server.urls) or bool(failed), "the server to start")
        if wait_ready:
            _wait(lambda: app.loaded or bool(failed), "the models to load")
        if failed:
            raise failed[0]
        yield running
    finally:
        if started:
            # The test may have stopped the server already, and its loop may be closed by now.
            with contextlib.suppress(RuntimeError):
                started[0].loop.call_soon_threadsafe(started[0].stop.set)
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
async def serving_asgi(app: object, *, lifespan: bool = False) -> AsyncIterator[str]:
    """Any ASGI app (a fake feature service, say) on uvicorn at 127.0.0.1:0, in its own thread; yields its URL."""
    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        loop="uvloop", http="httptools", lifespan="on" if lifespan else "off", log_level="warning",
    )  # fmt: skip
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
