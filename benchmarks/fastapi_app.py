"""The echo endpoints on FastAPI, the normal way: pydantic body and response models.

Needs ``pip install -r benchmarks/requirements.txt``. Run it with
``uvicorn benchmarks.fastapi_app:app``.
"""

# These frameworks are not dependencies of asyncserve: without them installed (as in CI's
# `make check`) mypy sees their names as Any, so it must not call that an error here.
# mypy: disable-error-code="import-not-found, misc, untyped-decorator"

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI
from pydantic import BaseModel

from benchmarks import echo


class InputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["FP32"]
    data: list[float]


class InferRequest(BaseModel):
    inputs: list[InputTensor]


class OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferResponse(BaseModel):
    model_name: str
    outputs: list[OutputTensor]


class PredictRequest(BaseModel):
    x: list[float]


class PredictResponse(BaseModel):
    y: list[float]


class Ready(BaseModel):
    ready: bool


app = FastAPI()


@app.get("/v2/health/ready")
async def ready() -> Ready:
    return Ready(ready=True)


@app.post("/v2/models/echo/infer")
async def infer(request: InferRequest) -> InferResponse:
    tensor = request.inputs[0]
    output = OutputTensor(name="y", shape=tensor.shape, datatype="FP32", data=echo.double(tensor.data, tensor.shape))
    return InferResponse(model_name="echo", outputs=[output])


@app.post("/v1/models/echo/predict")
async def predict(request: PredictRequest) -> PredictResponse:
    return PredictResponse(y=echo.double(request.x, [len(request.x)]))
