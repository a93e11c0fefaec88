"""The gRPC server: ``grpc.aio`` on the HTTP server's event loop, its own port, the same TLS files.

Example::

    server = GrpcServer(app.http, settings)
    await server.start()          # listening on settings.host:settings.grpc_port
    ...
    await server.stop(grace_s=30)  # refuse new calls; calls under way have grace_s to finish
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc

from asyncserve.config import Settings
from asyncserve.exceptions import ConfigurationError
from asyncserve.grpc import inference_pb2_grpc as pb_grpc
from asyncserve.grpc.service import InferenceServicer
from asyncserve.http.app import HttpApp

logger = logging.getLogger(__name__)


class GrpcServer:
    """Serves ``inference.GRPCInferenceService`` for ``http``'s components on ``settings.grpc_port``.

    With ``--workers N`` every worker listens on the same port (SO_REUSEPORT, grpc's
    ``grpc.so_reuseport``) and the kernel spreads the connections; alone, a server takes the port
    for itself, so that a port in use is an error rather than shared.
    """

    def __init__(self, http: HttpApp, settings: Settings) -> None:
        self.http = http
        self.settings = settings
        self.port: int | None = None
        """The port listened on, once started."""
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self.settings
        options = [
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
        ]
        server = grpc.aio.server(options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.http), server)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        address = f"{host}:{settings.grpc_port}"
        try:
            if settings.ssl_certfile:
                credentials = await asyncio.to_thread(_credentials, settings.ssl_certfile, settings.ssl_keyfile)
                self.port = server.add_secure_port(address, credentials)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigurationError(f"cannot listen for gRPC on {address} ({exc}); pick another --grpc-port") from None
        await server.start()
        self._server = server
        scheme = "grpcs" if settings.ssl_certfile else "grpc"
        logger.info("asyncserve serving gRPC (inference.GRPCInferenceService) on %s://%s:%d", scheme, host, self.port)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls at once; those under way get ``grace_s`` seconds, then are cancelled. Idempotent."""
        if self._server is None:
            return
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._server.stop(grace_s))
        await asyncio.shield(self._stopping)


def _credentials(certfile: str, keyfile: str) -> grpc.ServerCredentials:
    """Server credentials from the HTTP server's PEM files (blocking: run off the loop)."""
    try:
        chain, key = Path(certfile).read_bytes(), Path(keyfile).read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the TLS files {certfile!r}, {keyfile!r} for gRPC: {exc}; give PEM files "
            "(--ssl-certfile, --ssl-keyfile)"
        ) from None
    return grpc.ssl_server_credentials([(key, chain)])
