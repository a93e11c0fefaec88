"""The router, through a real server: routes matched on the path as sent, parameters decoded, 405 with Allow."""

from __future__ import annotations

import httpx
import pytest

from asyncserve import Service, Settings
from asyncserve.exceptions import MethodNotAllowed, NotFound
from asyncserve.http.routing import Request, Response, Router
from tests.conftest import RunningServer
from tests.models import Adder

SERVICE = Service(Adder(), name="routing")
SETTINGS = Settings(executor_workers=1, jobs="", loop_lag_interval_s=0.01)


def ok(request: Request) -> Response:
    return Response.json(request.params)


def test_an_encoded_slash_never_splits_a_segment() -> None:
    router = Router()
    router.add("POST", "/v2/repository/models/{model}/unload", ok, "unload", scope="admin")
    router.add("GET", "/v2/models/{model}", ok, "metadata", scope="infer")
    with pytest.raises(NotFound):
        router.match("POST", "/v2/repository%2Fmodels%2Firis%2Funload")
    route, params = router.match("GET", "/v2/models/a%2Fb")
    assert (route.name, params) == ("metadata", {"model": "a/b"})


def test_a_wrong_method_names_the_allowed_ones() -> None:
    router = Router()
    router.add("GET", "/v1/jobs/{job}", ok, "get", scope="jobs")
    router.add("DELETE", "/v1/jobs/{job}", ok, "cancel", scope="jobs")
    with pytest.raises(MethodNotAllowed) as refused:
        router.match("PUT", "/v1/jobs/7")
    assert refused.value.headers() == {"allow": "DELETE, GET"}


def test_a_path_without_parameters_is_never_taken_for_a_parameter() -> None:
    router = Router()
    router.add("POST", "/v1/jobs/batch", ok, "batch", scope="jobs")
    router.add("GET", "/v1/jobs/{job}", ok, "get", scope="jobs")
    router.add("DELETE", "/v1/jobs/{job}", ok, "cancel", scope="jobs")
    assert router.match("POST", "/v1/jobs/batch")[0].name == "batch"
    for method in ("GET", "DELETE", "PUT"):
        with pytest.raises(MethodNotAllowed) as refused:
            router.match(method, "/v1/jobs/batch")  # not the job "batch"
        assert refused.value.headers() == {"allow": "POST"}
    route, params = router.match("GET", "/v1/jobs/batches")
    assert (route.name, params) == ("get", {"job": "batches"})


async def test_admin_routes_cannot_be_reached_through_encoded_slashes(running: RunningServer) -> None:
    async with running.client() as client:
        # httpx keeps %2F as sent; the server must not decode it before routing.
        sneaky = await client.post(httpx.URL("/v2/repository%2Fmodels%2Fadder%2Funload"))
        assert (sneaky.status_code, sneaky.json()["code"]) == (404, "not_found")
        assert (await client.get("/v2/models/adder/ready")).status_code == 200
        encoded = await client.get("/v2/models/ad%64er/ready")  # an encoded letter is still the letter
        assert encoded.status_code == 200


async def test_405_has_an_allow_header(running: RunningServer) -> None:
    async with running.client() as client:
        answer = await client.get("/v1/models/adder/predict")
    assert (answer.status_code, answer.headers["allow"], answer.json()["code"]) == (405, "POST", "method_not_allowed")
