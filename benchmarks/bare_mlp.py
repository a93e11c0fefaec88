"""H, the HTTP ceiling of the batching benchmark: a bare ASGI app that does all of a request but the model.

It reads ``POST /v2/models/mlp/infer``, decodes the V2 body with orjson and NumPy into a (1, 256)
FP32 array, and answers a V2 response of the same size as the model's (16 FP32 values, the first
16 inputs) without running the MLP. Its throughput, H, is what one core does on HTTP and JSON
alone. Run it with ``uvicorn benchmarks.bare_mlp:app``; ``GET /v2/health/ready`` answers too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
import orjson

from benchmarks.mlp import OUTPUT_SIZE

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

INFER_PATH = "/v2/models/mlp/infer"


def infer(body: bytes) -> bytes:
    """Decode a V2 request as asyncserve does (orjson, then a NumPy FP32 array) and answer 16 values."""
    tensor = orjson.loads(body)["inputs"][0]
    x = np.array(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    y = np.ascontiguousarray(x[:, :OUTPUT_SIZE])
    output = {"name": "y", "datatype": "FP32", "shape": list(y.shape), "data": y.reshape(-1)}
    return orjson.dumps({"model_name": "mlp", "outputs": [output]}, option=orjson.OPT_SERIALIZE_NUMPY)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI entry point: lifespan, readiness, and the one inference route."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["method"] == "POST" and scope["path"] == INFER_PATH:
        await _respond(send, 200, infer(await _read_body(receive)))
    elif scope["method"] == "GET" and scope["path"] == "/v2/health/ready":
        await _respond(send, 200, b'{"ready":true}')
    else:
        await _respond(send, 404, b'{"error":"not found"}')


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
