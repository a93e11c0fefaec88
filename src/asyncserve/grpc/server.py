"""The gRPC server: asyncserve's own HTTP/2 connections on the HTTP server's event loop, its own port.

Example::

    server = GrpcServer(app.http, settings)
    await server.start()          # listening on settings.host:settings.grpc_port
    ...
    await server.stop(grace_s=30)  # refuse new calls; calls under way have grace_s to finish
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from asyncserve.config import Settings
from asyncserve.exceptions import ConfigurationError
from asyncserve.grpc import health_pb2 as health_pb
from asyncserve.grpc import inference_pb2 as pb
from asyncserve.grpc.calls import Methods
from asyncserve.grpc.health import HealthServicer
from asyncserve.grpc.http2 import Connection, Http2Limits
from asyncserve.grpc.service import InferenceServicer
from asyncserve.http.app import HttpApp
from asyncserve.http.protocol import ParseBudget
from asyncserve.http.server import tls_context

logger = logging.getLogger(__name__)


class GrpcServer:
    """Serves ``inference.GRPCInferenceService`` and ``grpc.health.v1.Health`` for ``http``'s components on
    ``settings.grpc_port``.

    With ``--workers N`` every worker listens on the same port (SO_REUSEPORT) and the kernel
    spreads the connections; alone, a server takes the port for itself, so that a port in use is
    an error rather than shared.
    """

    def __init__(self, http: HttpApp, settings: Settings) -> None:
        self.http = http
        self.settings = settings
        self.port: int | None = None
        """The port listened on, once started."""
        services = [
            (pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], InferenceServicer(http), pb),
            (health_pb.DESCRIPTOR.services_by_name["Health"], HealthServicer(http), health_pb),
        ]
        self.methods = Methods(services, max_message_bytes=settings.max_body_bytes)
        self.limits = Http2Limits(
            max_header_list_size=settings.max_header_bytes, preface_timeout_s=settings.head_timeout_s
        )
        self.connections: set[Connection] = set()
        self._server: asyncio.Server | None = None
        self._budget: ParseBudget | None = None
        self._stopping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self.settings
        ssl_context = None
        if settings.ssl_certfile:
            ssl_context = await asyncio.to_thread(tls_context, settings.ssl_certfile, settings.ssl_keyfile)
            ssl_context.set_alpn_protocols(["h2"])  # gRPC clients insist on HTTP/2 by ALPN
        sock = self._bind()
        self._budget = ParseBudget(asyncio.get_running_loop())
        self._server = await asyncio.get_running_loop().create_server(
            self._connection, sock=sock, ssl=ssl_context, backlog=2048
        )
        self.port = sock.getsockname()[1]
        scheme = "grpcs" if ssl_context else "grpc"
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        logger.info("asyncserve serving gRPC (inference.GRPCInferenceService) on %s://%s:%d", scheme, host, self.port)

    def _bind(self) -> socket.socket:
        settings = self.settings
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if settings.workers > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((settings.host, settings.grpc_port))
        except OSError as exc:
            sock.close()
            where = f"{settings.host}:{settings.grpc_port}"
            raise ConfigurationError(
                f"cannot listen for gRPC on {where} ({exc.strerror}); pick another --grpc-port"
            ) from None
        sock.setblocking(False)
        return sock

    def input_pending(self) -> bool:
        """Whether frames received wait for the event loop to read them (``ParseBudget``): the batcher waits too."""
        return self._budget is not None and self._budget.holding()

    def _connection(self) -> Connection:
        connection = Connection(self.methods.open_stream, self.limits, self.connections.discard, self._budget)
        self.connections.add(connection)
        return connection

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls at once; those under way get ``grace_s`` seconds, then are cancelled. Idempotent."""
        if self._server is None:
            return
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(self._server, grace_s))
        await asyncio.shield(self._stopping)

    async def _stop(self, server: asyncio.Server, grace_s: float) -> None:
        server.close()
        for connection in list(self.connections):
            connection.goaway()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await self.methods.idle.wait()
        left = len(self.methods.calls)
        if left:
            logger.warning("%d gRPC call(s) were still running after the %g s grace period: cancelled", left, grace_s)
        for connection in list(self.connections):
            connection.abort()  # its calls are cancelled: the rows they queued are withdrawn
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.methods.idle.wait()
        with contextlib.suppress(Exception):
            await server.wait_closed()
