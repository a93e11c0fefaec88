"""Running a service: asyncserve's HTTP server on a pre-bound socket, in one process or several.

Shutdown on SIGTERM or SIGINT, in order:
1. readiness turns false and new predictions get 503 (``App.begin_shutdown``);
2. the HTTP server stops accepting, closes idle connections, and waits up to ``grace_period_s``
   for in-flight requests (each connection closes after its response), then cancels what is left;
3. the app closes its components in reverse order of start-up (job workers hand back their
   jobs, batchers finish, the prediction log is flushed, pools close);
4. the process exits 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from multiprocessing.process import BaseProcess
from pathlib import Path

import uvloop

import asyncserve
from asyncserve._utils import import_string
from asyncserve.app import App
from asyncserve.config import Settings
from asyncserve.exceptions import ConfigurationError, StartupError
from asyncserve.grpc import require_grpc
from asyncserve.http.auth import is_loopback
from asyncserve.http.protocol import Limits
from asyncserve.http.server import HttpServer, tls_context
from asyncserve.logs import configure_logging
from asyncserve.runtime import lifeline
from asyncserve.runtime.peers import WorkerGroup
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


def limits_of(settings: Settings) -> Limits:
    """The HTTP limits among the settings (each of Limits' fields is a setting of the same name)."""
    return Limits(**{field.name: getattr(settings, field.name) for field in dataclasses.fields(Limits)})


def check_protected(settings: Settings) -> None:
    """Refuse to serve beyond loopback without API keys, unless told ``insecure`` (like Redis's protected mode)."""
    if is_loopback(settings.host) or settings.insecure or settings.api_keys_file or settings.api_keys:
        return
    raise ConfigurationError(
        f"--host {settings.host} would serve every route to anyone on the network without API keys: make keys "
        "(asyncserve keys new NAME --scopes infer --file keys.txt) and pass --api-keys-file keys.txt, or pass "
        "--insecure"
    )


def http_server_for(app: App) -> HttpServer:
    """The HTTP server of ``app``, with its settings' limits and TLS; the app learns what the server holds back."""
    settings = app.settings
    context = tls_context(settings.ssl_certfile, settings.ssl_keyfile) if settings.ssl_certfile else None
    server = HttpServer(app.http, limits_of(settings), ssl_context=context)
    app.input_pending = server.input_pending  # the batcher waits for the requests the server holds back
    return server


async def run_app(
    app: App,
    sockets: list[socket.socket],
    stop: asyncio.Event,
    *,
    tune_gc: bool = False,
    server: HttpServer | None = None,
) -> int:
    """Serve ``app`` on ``sockets`` until ``stop`` is set, then drain and close. Returns the connections cut."""
    server = server or http_server_for(app)
    async with app:
        await server.start(sockets)
        for url in server.urls:
            logger.info(
                "asyncserve %s serving %s on %s (pid %d)", asyncserve.__version__, app.service.name, url, os.getpid()
            )
        if tune_gc:
            freezing = asyncio.get_running_loop().create_task(_freeze_when_loaded(app))
        await stop.wait()
        app.begin_shutdown()
        server.close()
        grace_s = app.settings.grace_period_s
        cut, _ = await asyncio.gather(server.drain(grace_s), app.stop_grpc(grace_s))
        if tune_gc:
            freezing.cancel()
    return cut


async def _freeze_when_loaded(app: App) -> None:
    """Exclude what start-up built (modules, models, pools) from every later collection: it lives as
    long as the process, and a full collection would otherwise traverse all of it each time."""
    await app.wait_ready()
    gc.freeze()


async def _serve_until_signal(app: App, sockets: list[socket.socket]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    await run_app(app, sockets, stop, tune_gc=True)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(
            "HTTP server",
            f"cannot listen on {host}:{port}: {exc.strerror}",
            "pick another --port, or stop what uses it",
        ) from exc
    sock.set_inheritable(True)
    return sock


def serve(target: Service | str, settings: Settings | None = None, *, sock: socket.socket | None = None) -> None:
    """Serve a service (or its ``module:attribute`` import string) until SIGTERM or SIGINT.

    With ``settings.workers > 1`` the service must be given as an import string: each worker
    process imports it anew.

    Example::

        asyncserve.serve(service, asyncserve.Settings(port=8000))
    """
    settings = settings or Settings.from_env()
    check_protected(settings)
    if settings.grpc_port >= 0:
        require_grpc()  # one line at start-up, not one per worker
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
    app = App(service, settings, worker_group=group)
    gc.set_threshold(*GC_THRESHOLDS)
    uvloop.run(_serve_until_signal(app, [sock]))


def load_service(target: str) -> Service:
    service = import_string(target)
    if not isinstance(service, Service):
        raise ConfigurationError(f"{target!r} is a {type(service).__name__}, not an asyncserve.Service")
    return service


def _worker_main(target: str, settings: Settings, sock: socket.socket, group: WorkerGroup, supervisor: int) -> None:
    configure_logging(settings.log_level, settings.log_format)  # a spawned process starts with no handler
    # A supervisor killed with SIGKILL cannot stop its workers: each drains and exits on its own.
    lifeline.follow_parent(supervisor, lambda: os.kill(os.getpid(), signal.SIGTERM))
    try:
        _serve_one(target, settings, sock, group)
    except ConfigurationError as exc:
        logger.debug("worker %d could not start", group.index, exc_info=exc)
        # The supervisor prints it, once, however many workers fail alike.
        _startup_error_file(group.directory, group.index).write_text(exc.message)
        sys.exit(STARTUP_FAILED)
    finally:
        if os.getppid() != supervisor:  # orphaned: the supervisor, killed, cannot remove the group's directory
            shutil.rmtree(group.directory, ignore_errors=True)


def _startup_error_file(directory: Path, index: int) -> Path:
    return directory / f"worker-{index}.error"


STARTUP_FAILED = 3
"""A ``--workers`` process's exit status when it could not start: the supervisor stops rather than restart it."""


class Supervisor:
    """Runs ``workers`` server processes on one shared socket, restarts any that dies, stops them all on a signal.

    Worker i keeps its index when it is replaced; the workers find each other's metrics in a
    directory the supervisor makes, and removes, for the group (``asyncserve.runtime.peers``).
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
        if self.settings.ssl_certfile:
            tls_context(self.settings.ssl_certfile, self.settings.ssl_keyfile)  # likewise
        self._directory = Path(tempfile.mkdtemp(prefix="asyncserve-workers-"))
        failure: str | None = None
        try:
            self._children = [self._spawn(index) for index in range(self.settings.workers)]
            logger.info(
                "supervisor %d: %d workers (pids %s) serving %s on %s",
                os.getpid(), len(self._children), ", ".join(str(child.pid) for child in self._children),
                self.target, self.url,
            )  # fmt: skip
            failure = self._watch()
            for child in self._children:
                if child.pid is not None and child.is_alive():
                    child.terminate()  # SIGTERM: each worker drains on its own
            for child in self._children:
                child.join()
        finally:
            shutil.rmtree(self._directory, ignore_errors=True)
        logger.info("all %d workers stopped", len(self._children))
        if failure is not None:
            raise ConfigurationError(failure)

    def _watch(self) -> str | None:
        """Replace workers that die until a stop signal; a worker that could not start ends it, with its error."""
        assert self._directory is not None
        while not self._stop.wait(0.5):
            failed = self._replace_dead()
            if failed is not None:
                return _startup_error_file(self._directory, failed).read_text()
        return None

    @property
    def url(self) -> str:
        """Where the workers listen (the shared socket's address)."""
        host, port = self.sock.getsockname()[:2]
        scheme = "https" if self.settings.ssl_certfile else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    def _spawn(self, index: int) -> BaseProcess:
        assert self._directory is not None
        group = WorkerGroup(self._directory, index, self.settings.workers)
        args = (self.target, self.settings, self.sock, group, os.getpid())
        process = self._context.Process(target=_worker_main, args=args)
        process.start()
        return process

    def _replace_dead(self) -> int | None:
        """Start another worker for each that died; the index of one that could not start, if any."""
        for index, child in enumerate(self._children):
            if not child.is_alive() and child.exitcode == STARTUP_FAILED:
                return index
            if not child.is_alive() and not self._stop.is_set():
                logger.error("worker %s exited with %s; starting another", child.pid, child.exitcode)
                self._children[index] = self._spawn(index)
                logger.info("worker %d is now pid %s", index, self._children[index].pid)
        return None


def run_worker(target: Service | str, settings: Settings) -> None:
    """Run job workers without an HTTP server (``asyncserve worker``) until SIGTERM or SIGINT.

    The models load as in a server; the workers claim jobs from ``settings.jobs`` and run them
    through the same pipeline and batchers. On a signal they stop claiming, finish or hand back
    what they hold, and the process exits 0.
    """
    service = load_service(target) if isinstance(target, str) else target
    if not settings.jobs or settings.job_workers < 1:
        raise ConfigurationError("a worker needs a broker (--broker URL) and at least one job worker")
    app = App(service, settings)
    gc.set_threshold(*GC_THRESHOLDS)
    uvloop.run(_work_until_signal(app))


async def _work_until_signal(app: App) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    async with app:
        freezing = loop.create_task(_freeze_when_loaded(app))
        logger.info("worker ready: %s, broker %s", app.service, app.settings.jobs)
        await stop.wait()
        app.begin_shutdown()
        freezing.cancel()
