"""The echo endpoints on Starlette, decoding and encoding with orjson as the bare app does.

Needs ``pip install -r benchmarks/requirements.txt``. Run it with
``uvicorn benchmarks.starlette_app:app``.
"""

# These frameworks are not dependencies of asyncserve: without them installed (as in CI's
# `make check`) mypy sees their names as Any, so it must not call that an error here.
# mypy: disable-error-code="import-not-found, misc"

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from benchmarks import echo


class _JSONBytes(Response):
    media_type = "application/json"


async def ready(request: Request) -> Response:
    return _JSONBytes(echo.READY_RESPONSE)


async def infer(request: Request) -> Response:
    return _JSONBytes(echo.infer_v2(await request.body()))


async def predict(request: Request) -> Response:
    return _JSONBytes(echo.predict_v1(await request.body()))


app = Starlette(
    routes=[
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/echo/infer", infer, methods=["POST"]),
        Route("/v1/models/echo/predict", predict, methods=["POST"]),
    ]
)
