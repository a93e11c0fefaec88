"""The HTTP server: listening sockets, TLS, every connection's timeouts, and a graceful drain.

Example::

    server = HttpServer(app, Limits(max_body_bytes=1 << 20))
    await server.start([sock])
    ...
    server.close()                      # stop accepting; idle connections close now
    cancelled = await server.drain(30)  # busy ones close after their response, or are cut at 30 s
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import logging
import socket
import ssl

from asyncserve.exceptions import StartupError
from asyncserve.http.protocol import Dispatcher, HttpProtocol, Limits, ParseBudget

logger = logging.getLogger(__name__)

SMALL_BODY_BYTES = 64 * 1024
"""A body this small that fits under max_held_body_bytes does not queue behind larger ones."""

TICK_S = 1.0
"""How often the server renews its ``date`` header and checks every connection's timeouts, at most."""


class HttpServer:
    """Serves ``app`` over HTTP/1.1 on sockets the caller bound (one server per event loop).

    One ticker, not a timer per connection, enforces the keep-alive and slow-head timeouts: with
    thousands of connections, a timer armed and cancelled per request would cost more than the
    ticker's pass over them every second.
    """

    def __init__(self, app: Dispatcher, limits: Limits, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.limits = limits
        self.ssl_context = ssl_context
        self.connections: set[HttpProtocol] = set()
        self.closing = False
        """Set by :meth:`close`: connections close after the response under way."""
        self.date_line = _date_line()
        self._servers: list[asyncio.Server] = []
        self._ticker: asyncio.TimerHandle | None = None
        self._budget: ParseBudget | None = None
        self._drained = asyncio.Event()
        """Set once closing and no connection is busy."""
        self.held_body_bytes = 0
        """Bytes of request bodies received (or reserved) whose requests are not answered yet."""
        self._waiting_for_room: collections.deque[tuple[HttpProtocol, int]] = collections.deque()

    @property
    def budget(self) -> ParseBudget:
        if self._budget is None:
            raise RuntimeError("the HTTP server has not started; call start() first")
        return self._budget

    def input_pending(self) -> bool:
        """Whether requests already received wait for the event loop to parse them (``ParseBudget``)."""
        return self._budget is not None and self._budget.holding()

    async def start(self, sockets: list[socket.socket]) -> None:
        if self._servers:
            raise RuntimeError("this HTTP server has started already; make another to serve again")
        loop = asyncio.get_running_loop()
        self._budget = ParseBudget(loop)
        for sock in sockets:
            server = await loop.create_server(
                lambda: HttpProtocol(self.app, self.limits, self), sock=sock, ssl=self.ssl_context, backlog=2048
            )
            self._servers.append(server)
        self._tick()

    @property
    def urls(self) -> list[str]:
        scheme = "https" if self.ssl_context is not None else "http"
        urls = []
        for server in self._servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                urls.append(f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}")
        return urls

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        self.date_line = _date_line()
        now = loop.time()
        for connection in list(self.connections):
            connection.check_timeouts(now)
        limits = self.limits
        interval = min(TICK_S, limits.keep_alive_s / 4, limits.head_timeout_s / 4, limits.body_timeout_s / 4)
        self._ticker = loop.call_later(interval, self._tick)

    def close(self) -> None:
        """Stop accepting connections; idle connections close now, busy ones after their response."""
        self.closing = True
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.shutdown()
        self.connection_idle()

    async def drain(self, grace_s: float) -> int:
        """Wait up to ``grace_s`` for the busy connections to finish; cut those left. Returns how many were cut."""
        if self._busy_connections():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._drained.wait()
        left = self._busy_connections()
        for connection in list(self.connections):
            connection.abort()
        if self._ticker is not None:
            self._ticker.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if left:
            logger.warning("%d connection(s) were still busy after the %g s grace period: cut", len(left), grace_s)
        return len(left)

    # The bodies held at once: a connection about to read a body that would take the server over
    # max_held_body_bytes waits, unread, until answered requests give room back (first come, first served).

    def reserve(self, protocol: HttpProtocol, size: int) -> bool:
        fits = self.held_body_bytes + size <= self.limits.max_held_body_bytes
        # A small body that fits goes ahead of the large ones waiting: most requests are small.
        if fits and (not self._waiting_for_room or size <= SMALL_BODY_BYTES):
            self.held_body_bytes += size
            return True
        self._waiting_for_room.append((protocol, size))
        return False

    def hold(self, size: int) -> None:
        self.held_body_bytes += size

    def release(self, size: int) -> None:
        self.held_body_bytes -= size
        waiting = self._waiting_for_room
        while waiting:
            protocol, wanted = waiting[0]
            if protocol.transport.is_closing():
                waiting.popleft()
                continue
            if self.held_body_bytes and self.held_body_bytes + wanted > self.limits.max_held_body_bytes:
                return
            waiting.popleft()
            self.held_body_bytes += wanted
            protocol.room_granted()

    def _busy_connections(self) -> list[HttpProtocol]:
        return [connection for connection in self.connections if connection.busy]

    def connection_idle(self) -> None:
        if self.closing and not self._busy_connections():
            self._drained.set()


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server TLS context from a PEM certificate chain and its key; a clear error if they do not load."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile or None)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(
            "TLS", f"cannot load the certificate {certfile!r} with key {keyfile!r}: {exc}",
            "give PEM files (--ssl-certfile, --ssl-keyfile)",
        ) from exc  # fmt: skip
    return context


def _date_line() -> bytes:
    return b"date: %s\r\n" % email.utils.formatdate(usegmt=True).encode()
