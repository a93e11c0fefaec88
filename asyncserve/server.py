"""Running the app: uvicorn (uvloop + httptools) on a pre-bound socket, one or several processes.

Shutdown on SIGTERM or SIGINT, in order:
1. readiness turns false and new predictions get 503 (the app's ``begin_shutdown``);
2. uvicorn stops accepting connections and waits up to ``grace_period_s`` for in-flight requests,
   then cancels what is left;
3. the lifespan shutdown releases the executor (running predictions finish, queued ones are
   dropped) and background tasks;
4. the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Generator
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

import uvicorn
import uvloop

from asyncserve._utils import import_string
from asyncserve.app import AsyncServeApp
from asyncserve.config import Settings
from asyncserve.exceptions import ConfigurationError
from asyncserve.peers import WorkerGroup
from asyncserve.protocol import SheddingHttpToolsProtocol
from asyncserve.service import Service

logger = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

GC_THRESHOLDS = (1000, 20, 20)
"""Cyclic GC thresholds of a server process (Python's are 700, 10, 10).

A server keeps hundreds of requests' objects alive at any moment, so young collections promote them
and the older generations are traversed again and again. With these thresholds, and the start-up
heap frozen once the models are loaded, the I/O benchmark's batched service at c=256 spent 1.4 s of
12 s in the collector instead of 2.5 s, with shorter full collections.
"""


class Server(uvicorn.Server):
    """uvicorn's server that tells the app when shutdown starts and exits cleanly after draining.

    uvicorn re-raises the signal after its graceful shutdown, which makes the process die *by*
    SIGTERM (status 143); a drained server has done its job and exits 0 instead.
    """

    def __init__(self, config: uvicorn.Config, app: AsyncServeApp, *, tune_gc: bool = False) -> None:
        super().__init__(config)
        self.asyncserve_app = app
        self.tune_gc = tune_gc
        self._freezing: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.tune_gc:
            gc.set_threshold(*GC_THRESHOLDS)
        await super().startup(sockets)
        if self.tune_gc:
            self._freezing = asyncio.get_running_loop().create_task(_freeze_when_loaded(self.asyncserve_app))

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.asyncserve_app.begin_shutdown()
        super().handle_exit(sig, frame)


async def _freeze_when_loaded(app: AsyncServeApp) -> None:
    """Exclude what start-up built (modules, models, pools) from every later collection: it lives as
    long as the process, and a full collection would otherwise traverse all of it each time."""
    await app.wait_ready()
    gc.freeze()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from None
    sock.set_inheritable(True)
    return sock


def make_server(app: AsyncServeApp, *, tune_gc: bool = False) -> Server:
    settings = app.settings
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http=SheddingHttpToolsProtocol,
        lifespan="on",
        access_log=False,
        # X-Forwarded-* rewriting costs time on every request; behind a proxy, turn it on with care.
        proxy_headers=settings.proxy_headers,
        server_header=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.grace_period_s),
        log_config=None,
    )
    return Server(config, app, tune_gc=tune_gc)


def serve(target: Service | str, settings: Settings | None = None, *, sock: socket.socket | None = None) -> None:
    """Serve a service (or its ``module:attribute`` import string) until SIGTERM or SIGINT.

    With ``settings.workers > 1`` the service must be given as an import string: each worker
    process imports it anew.
    """
    settings = settings or Settings.from_env()
    sock = sock or bind_socket(settings.host, settings.port)
    if settings.workers == 1:
        _serve_one(target, settings, sock)
        return
    if not isinstance(target, str):
        raise ConfigurationError("--workers > 1 needs the service as an import string, like 'mymodule:service'")
    Supervisor(target, settings, sock).run()


def _serve_one(
    target: Service | str, settings: Settings, sock: socket.socket, group: WorkerGroup | None = None
) -> None:
    service = load_service(target) if isinstance(target, str) else target
    server = make_server(AsyncServeApp(service, settings, worker_group=group), tune_gc=True)
    server.run(sockets=[sock])


def load_service(target: str) -> Service:
    service = import_string(target)
    if not isinstance(service, Service):
        raise ConfigurationError(f"{target!r} is a {type(service).__name__}, not an asyncserve.Service")
    return service


def _worker_main(target: str, settings: Settings, sock: socket.socket, group: WorkerGroup) -> None:
    _serve_one(target, settings, sock, group)


class Supervisor:
    """Runs ``workers`` server processes on one shared socket, restarts any that dies, stops them all on a signal.

    Worker i keeps its index when it is replaced; the workers find each other's metrics in a
    directory the supervisor makes, and removes, for the group (``asyncserve.peers``).
    """

    def __init__(self, target: str, settings: Settings, sock: socket.socket) -> None:
        self.target, self.settings, self.sock = target, settings, sock
        self._context = multiprocessing.get_context("spawn")
        self._children: list[BaseProcess] = []
        self._stop = threading.Event()
        self._directory: Path | None = None

    def run(self) -> None:
        load_service(self.target)  # fail here, once, rather than in every worker
        for sig in _STOP_SIGNALS:
            signal.signal(sig, lambda *_: self._stop.set())
        self._directory = Path(tempfile.mkdtemp(prefix="asyncserve-workers-"))
        try:
            self._children = [self._spawn(index) for index in range(self.settings.workers)]
            while not self._stop.wait(0.5):
                self._replace_dead()
            for child in self._children:
                if child.pid is not None and child.is_alive():
                    child.terminate()  # SIGTERM: each worker drains on its own
            for child in self._children:
                child.join()
        finally:
            shutil.rmtree(self._directory, ignore_errors=True)
        logger.info("all %d workers stopped", len(self._children))

    def _spawn(self, index: int) -> BaseProcess:
        assert self._directory is not None
        group = WorkerGroup(self._directory, index, self.settings.workers)
        process = self._context.Process(target=_worker_main, args=(self.target, self.settings, self.sock, group))
        process.start()
        return process

    def _replace_dead(self) -> None:
        for index, child in enumerate(self._children):
            if not child.is_alive() and not self._stop.is_set():
                logger.error("worker %s exited with %s; starting another", child.pid, child.exitcode)
                self._children[index] = self._spawn(index)


def run_worker(target: Service | str, settings: Settings) -> None:
    """Run job workers without an HTTP server (``asyncserve worker``) until SIGTERM or SIGINT.

    The models load as in a server; the workers claim jobs from ``settings.jobs`` and run them
    through the same pipeline and batchers. On a signal they stop claiming, finish or hand back
    what they hold, and the process exits 0.
    """
    service = load_service(target) if isinstance(target, str) else target
    if not settings.jobs or settings.job_workers < 1:
        raise ConfigurationError("a worker needs a broker (--broker URL) and at least one job worker")
    app = AsyncServeApp(service, settings)
    gc.set_threshold(*GC_THRESHOLDS)
    uvloop.run(_lifespan_until_signal(app))


async def _lifespan_until_signal(app: AsyncServeApp) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    started = asyncio.Event()

    async def receive() -> dict[str, str]:
        message = next(messages)
        if message["type"] == "lifespan.shutdown":
            await stop.wait()
            app.begin_shutdown()
        return message

    freezing: list[asyncio.Task[None]] = []

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()
            freezing.append(loop.create_task(_freeze_when_loaded(app)))
            logger.info("worker ready: %s, broker %s", app.service, app.settings.jobs)

    await app({"type": "lifespan"}, receive, send)
