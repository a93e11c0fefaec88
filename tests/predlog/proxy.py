"""A TCP proxy in the test's event loop, to make a real server hang (freeze) or vanish (stop) on demand."""

from __future__ import annotations

import asyncio
import contextlib
import socket


class _Link(asyncio.Protocol):
    """One client connection and its connection to the upstream server."""

    def __init__(self, proxy: FreezableProxy) -> None:
        self.proxy = proxy
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.pending = bytearray()
        self.connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.client = transport
        self.proxy.links.add(self)
        if self.proxy.frozen:
            transport.pause_reading()
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        await self.proxy.thawed.wait()  # a frozen proxy accepts connections and leaves them hanging
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(lambda: _Upstream(self), *self.proxy.upstream)
        except OSError:
            self.close()
            return
        self.upstream = upstream
        if self.pending:
            upstream.write(bytes(self.pending))
            self.pending.clear()
        if self.proxy.frozen:
            upstream.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending += data
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def pause(self) -> None:
        for transport in (self.client, self.upstream):
            if transport is not None and not transport.is_closing():
                transport.pause_reading()

    def resume(self) -> None:
        for transport in (self.client, self.upstream):
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

    def close(self) -> None:
        # close() sends what is buffered first: bytes read before a freeze still reach the other side.
        for transport in (self.client, self.upstream):
            if transport is not None:
                transport.close()
        if self.connecting is not None and not self.connecting.done():
            self.connecting.cancel()
        self.proxy.links.discard(self)


class _Upstream(asyncio.Protocol):
    def __init__(self, link: _Link) -> None:
        self.link = link

    def data_received(self, data: bytes) -> None:
        if self.link.client is not None:
            self.link.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.close()


class FreezableProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream`` until frozen, stopped, or closed.

    ``freeze()`` stops every byte in both directions, as a server that hangs would: connections
    are still accepted (by the kernel, as a stopped process's would be) but nothing is read from
    or sent to them, and new ones are not forwarded. ``thaw()`` resumes everything, including
    whatever was sent while frozen (so a request a client gave up on may still reach the server).
    ``stop()`` closes the port and every connection (the server is down: connections are refused);
    ``start(port)`` opens it again.

    Example::

        proxy = FreezableProxy(("127.0.0.1", 5432))
        await proxy.start()
        dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/test"
        proxy.freeze()
        ...
        proxy.thaw()
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.links: set[_Link] = set()
        self.thawed = asyncio.Event()
        self.thawed.set()
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def frozen(self) -> bool:
        return not self.thawed.is_set()

    async def start(self, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Link(self), "127.0.0.1", port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self.thawed.clear()
        for link in list(self.links):
            link.pause()

    def thaw(self) -> None:
        self.thawed.set()
        for link in list(self.links):
            link.resume()

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self.links):
            link.close()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await server.wait_closed()

    async def __aenter__(self) -> FreezableProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.thaw()
        await self.stop()


def free_port() -> int:
    """A port nothing listens on (for a server that is down), found off the event loop by the caller."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
