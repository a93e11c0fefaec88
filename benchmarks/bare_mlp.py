"""H, the HTTP ceiling of the batching benchmark: a bare ASGI app that does all of a request but the model.

It reads ``POST /v2/models/mlp/infer``, decodes the V2 body with orjson and NumPy into a (1, 256)
FP32 array, and answers a V2 response of the same size as the model's (16 FP32 values, the first
16 inputs) without running the MLP. Its throughput, H, is what one core does on HTTP and JSON
alone. Run it with ``uvicorn benchmarks.bare_mlp:app``; ``GET /v2/health/ready`` answers too.
"""

from __future__ import annotations

import numpy as np
import orjson

from benchmarks import bare
from benchmarks.bare import Receive, Scope, Send
from benchmarks.mlp import OUTPUT_SIZE

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
        await bare.lifespan(receive, send)
    elif scope["method"] == "POST" and scope["path"] == INFER_PATH:
        await bare.respond(send, 200, infer(await bare.read_body(receive)))
    elif scope["method"] == "GET" and scope["path"] == "/v2/health/ready":
        await bare.respond(send, 200, b'{"ready":true}')
    else:
        await bare.respond(send, 404, b'{"error":"not found"}')
