"""ASGI, as an adapter: mount a service in a Starlette or FastAPI app, or run it under any ASGI server.

asyncserve's own server (``asyncserve serve``) needs none of this; here each request costs what ASGI
costs (a task, receive and send coroutines, a watcher for the client's disconnect), and the
requests take the same way as through asyncserve's protocol: ``HttpApp.handle``.

Example::

    from asyncserve.asgi import app
    application = app(service)            # uvicorn mymodule:application

Mounted in another app, which does not pass the ASGI lifespan down, start it in that app's lifespan::

    served = app(service)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with served:
            yield

    outer = FastAPI(lifespan=lifespan)
    outer.mount("/ml", served)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from asyncserve._utils import is_count
from asyncserve.app import App
from asyncserve.config import Settings
from asyncserve.exceptions import PayloadTooLarge
from asyncserve.http.routing import Request, Response, StreamingResponse, new_request_id
from asyncserve.service import Service

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def app(service: Service, settings: Settings | None = None) -> AsgiApp:
    """An ASGI application serving ``service``; it starts and stops with the ASGI lifespan.

    The ASGI server decides where it listens, so the Host check (``allowed_hosts``) is off unless set.
    """
    settings = settings or Settings()
    if not settings.allowed_hosts:
        settings = dataclasses.replace(settings, allowed_hosts="*")
    return AsgiApp(App(service, settings))


class AsgiApp:
    """The ASGI face of an :class:`App` (see :func:`app`)."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __aenter__(self) -> AsgiApp:
        await self.app.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.app.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        # Websocket scopes are not served; returning closes them.

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            await self.app.__aenter__()
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.app.aclose()
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        request_id = headers.get("x-request-id") or new_request_id()
        arrived = time.monotonic()
        method, path = scope["method"], _route_path(scope)
        early = self.app.http.early_response(method, path, headers)
        if early is not None:
            await _send(send, early, request_id)
            return
        try:
            body = await _read_body(receive, headers, self.app.settings.max_body_bytes)
        except PayloadTooLarge as exc:
            await _send(send, Response.json(exc.to_dict(), exc.status_code), request_id)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        request = Request(method, path, query, headers, body, request_id, arrived)
        response = await self._answer(request, receive)
        if response is not None:
            await _send(send, response, request_id)

    async def _answer(self, request: Request, receive: Receive) -> Response | None:
        """The request's response, or None if its client went away first (its work is then cancelled)."""
        answered: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        work = self.app.http.handle(request, lambda response, _: answered.set_result(response))
        if answered.done():
            return answered.result()
        gone = asyncio.get_running_loop().create_task(_disconnected(receive))
        try:
            await asyncio.wait([answered, gone], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        finally:
            gone.cancel()
        if answered.done():
            return answered.result()
        if work is not None:
            work.cancel()  # the client went away: its rows leave the batcher's queue
        return None


def _route_path(scope: Scope) -> str:
    """The path below where the app is mounted, as the client sent it (percent-encoded, ``raw_path``, which the
    router wants), or decoded where the server gives no raw path; servers and frameworks give the full path
    and the mount point (``root_path``)."""
    raw: bytes | None = scope.get("raw_path")
    path: str = raw.decode("latin-1") if raw else scope["path"]
    root: str = scope.get("root_path", "")
    root = urllib.parse.quote(root) if raw else root
    return path[len(root) :] if root and path.startswith(root) else path


async def _disconnected(receive: Receive) -> None:
    # The body has been read: the only message left to receive is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    declared = headers.get("content-length")
    if declared is not None and is_count(declared) and int(declared) > limit:
        raise PayloadTooLarge(_too_large(int(declared), limit))
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(_too_large(size, limit))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(size: int, limit: int) -> str:
    return f"the request body has {size} bytes or more, over the server's limit of {limit}; send smaller batches"


async def _send(send: Send, response: Response, request_id: str) -> None:
    headers = response.header_lines(request_id)
    if not isinstance(response, StreamingResponse):
        headers.append((b"content-length", b"%d" % len(response.body)))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
        return
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    async with contextlib.aclosing(response.chunks) as chunks:  # type: ignore[type-var]
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
