"""The tutorial baseline of the batching benchmark: FastAPI running the MLP per request in its thread pool.

A plain ``def`` endpoint, which FastAPI runs in its thread pool (40 threads by default), takes the
V2 body through its pydantic model, runs the MLP on that one row and answers a V2 output: what
most model-serving tutorials write. Needs ``pip install -r benchmarks/requirements.txt``; run it
with ``uvicorn benchmarks.fastapi_mlp:app``.
"""

# As in fastapi_app.py: without the frameworks installed, mypy must not call their names errors.
# mypy: disable-error-code="import-not-found, misc, untyped-decorator"

from __future__ import annotations

import numpy as np
from fastapi import FastAPI

from benchmarks.fastapi_app import InferRequest, InferResponse, OutputTensor, Ready
from benchmarks.mlp import example_rows, forward, make_layers

LAYERS = make_layers()
forward(LAYERS, example_rows(1))  # warm up, as asyncserve does before it reports ready

app = FastAPI()


@app.get("/v2/health/ready")
async def ready() -> Ready:
    return Ready(ready=True)


@app.post("/v2/models/mlp/infer")
def infer(request: InferRequest) -> InferResponse:
    tensor = request.inputs[0]
    x = np.asarray(tensor.data, dtype=np.float32).reshape(tensor.shape)
    y = forward(LAYERS, x)
    output = OutputTensor(name="y", shape=list(y.shape), datatype="FP32", data=y.ravel().tolist())
    return InferResponse(model_name="mlp", outputs=[output])
