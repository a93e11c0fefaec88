"""The baseline: a bare ASGI app with no framework, doing only the echo work of ``echo.py``.

Run it with ``uvicorn benchmarks.bare_asgi:app``. It answers:

- ``GET /v2/health/ready``: a tiny JSON (also the readiness probe of the harness);
- ``POST /v2/models/echo/infer``: an Open Inference Protocol V2 request;
- ``POST /v1/models/echo/predict``: a plain JSON request ``{"x": [...]}``.
"""

from __future__ import annotations

from collections.abc import Callable

from benchmarks import bare, echo
from benchmarks.bare import Receive, Scope, Send

_POST_ROUTES: dict[str, Callable[[bytes], bytes]] = {
    "/v2/models/echo/infer": echo.infer_v2,
    "/v1/models/echo/predict": echo.predict_v1,
}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI entry point: lifespan, then one route table lookup per request."""
    if scope["type"] == "lifespan":
        await bare.lifespan(receive, send)
        return
    if scope["method"] == "GET" and scope["path"] == "/v2/health/ready":
        await bare.respond(send, 200, echo.READY_RESPONSE)
        return
    handler = _POST_ROUTES.get(scope["path"]) if scope["method"] == "POST" else None
    if handler is None:
        await bare.respond(send, 404, b'{"error":"not found"}')
        return
    await bare.respond(send, 200, handler(await bare.read_body(receive)))
