"""The baseline: a bare ASGI app with no framework, doing only the echo work of ``echo.py``.

Run it with ``uvicorn benchmarks.bare_asgi:app``. It answers:

- ``GET /v2/health/ready``: a tiny JSON (also the readiness probe of the harness);
- ``POST /v2/models/echo/infer``: an Open Inference Protocol V2 request;
- ``POST /v1/models/echo/predict``: a plain JSON request ``{"x": [...]}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from benchmarks import echo

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_POST_ROUTES: dict[str, Callable[[bytes], bytes]] = {
    "/v2/models/echo/infer": echo.infer_v2,
    "/v1/models/echo/predict": echo.predict_v1,
}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI entry point: lifespan, then one route table lookup per request."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["method"] == "GET" and scope["path"] == "/v2/health/ready":
        await _respond(send, 200, echo.READY_RESPONSE)
        return
    handler = _POST_ROUTES.get(scope["path"]) if scope["method"] == "POST" else None
    if handler is None:
        await _respond(send, 404, b'{"error":"not found"}')
        return
    await _respond(send, 200, handler(await _read_body(receive)))


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
