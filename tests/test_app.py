"""The HTTP API through a real server: every V2 route, the JSON API, errors, deadlines, metrics."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

import asyncserve
from asyncserve import Service, Settings
from tests.conftest import RunningServer, serving
from tests.models import DATATYPE_SAMPLES, Adder, AdderV1, AdderV2, AllTypes, Echo, Faulty, Sleeper, WrongRows

SLEEPER = Sleeper()
SERVICE = Service(AdderV1(), AdderV2(), Echo(), SLEEPER, Faulty(), WrongRows(), AllTypes(), name="test-service")
SETTINGS = Settings(executor_workers=1, max_body_bytes=64 * 1024, loop_lag_interval_s=0.01)


def v2_body(a: list[list[float]], b: list[list[float]], **extra: object) -> dict[str, object]:
    rows = len(a)
    return {
        "inputs": [
            {"name": "a", "shape": [rows, 3], "datatype": "FP32", "data": a},
            {"name": "b", "shape": [rows, 3], "datatype": "FP32", "data": b},
        ],
        **extra,
    }


async def test_health_and_server_metadata(client: httpx.AsyncClient) -> None:
    live = await client.get("/v2/health/live")
    ready = await client.get("/v2/health/ready")
    meta = await client.get("/v2")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert meta.json() == {
        "name": "test-service",
        "version": asyncserve.__version__,
        "extensions": ["binary_tensor_data", "model_repository"],
    }
    assert live.headers["x-request-id"]


async def test_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2/health/live", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


async def test_model_metadata_latest_and_pinned_version(client: httpx.AsyncClient) -> None:
    latest = (await client.get("/v2/models/adder")).json()
    pinned = (await client.get("/v2/models/adder/versions/1")).json()
    assert latest["name"] == "adder"
    assert "2" in latest["versions"]
    assert {"name": "a", "datatype": "FP32", "shape": [-1, 3]} in latest["inputs"]
    assert pinned["name"] == "adder"
    ready = await client.get("/v2/models/adder/versions/1/ready")
    assert (ready.status_code, ready.json()) == (200, {"name": "adder", "ready": True})


async def test_infer_json_with_id_and_versions(client: httpx.AsyncClient) -> None:
    body = v2_body([[1, 2, 3], [4, 5, 6]], [[1, 1, 1], [2, 2, 2]], id="req-7")
    latest = await client.post("/v2/models/adder/infer", json=body)
    v1 = await client.post("/v2/models/adder/versions/1/infer", json=body)
    assert latest.status_code == 200, latest.text
    result = latest.json()
    assert result["id"] == "req-7"
    assert result["model_name"] == "adder"
    assert result["model_version"] == "2"
    outputs = {o["name"]: o for o in result["outputs"]}
    assert outputs["sum"]["shape"] == [2, 3]
    assert outputs["sum"]["data"] == [3, 4, 5, 7, 8, 9]
    v1_outputs = {o["name"]: o for o in v1.json()["outputs"]}
    assert v1_outputs["sum"]["data"] == [2, 3, 4, 6, 7, 8]
    assert v1_outputs["total"]["data"] == [9, 21]


async def test_infer_flat_data_and_outputs_filter(client: httpx.AsyncClient) -> None:
    body = v2_body([[1, 2, 3]], [[1, 1, 1]], outputs=[{"name": "total"}])
    body["inputs"][0]["data"] = [1, 2, 3]  # type: ignore[index]
    response = await client.post("/v2/models/adder/versions/1/infer", json=body)
    assert [o["name"] for o in response.json()["outputs"]] == ["total"]
    assert response.json()["outputs"][0]["data"] == [9.0]


async def test_every_datatype_round_trips(client: httpx.AsyncClient) -> None:
    inputs = [
        {"name": f"in_{d.lower()}", "shape": [2], "datatype": d, "data": values}
        for d, values in DATATYPE_SAMPLES.items()
    ]
    response = await client.post("/v2/models/all_types/infer", json={"inputs": inputs})
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    for datatype, values in DATATYPE_SAMPLES.items():
        output = outputs[f"out_{datatype.lower()}"]
        assert output["datatype"] == datatype
        assert output["data"] == values, datatype


async def test_async_model_runs_on_the_loop(client: httpx.AsyncClient) -> None:
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["hi", "there"]}]}
    response = await client.post("/v2/models/shout/infer", json=body)
    assert response.json()["outputs"][0]["data"] == ["HI", "THERE"]
    assert SERVICE.specs[2].is_async


async def test_json_api_single_row_and_list(client: httpx.AsyncClient) -> None:
    one = await client.post("/v1/models/adder/predict", json={"a": [1, 2, 3], "b": [1, 1, 1]})
    many = await client.post("/v1/models/adder/predict", json=[{"a": [1, 2, 3], "b": [0, 0, 0]}] * 3)
    assert one.status_code == 200, one.text
    assert one.json() == {"sum": [3.0, 4.0, 5.0], "total": 12.0}
    assert len(many.json()) == 3
    assert many.json()[0]["total"] == 9.0  # version 2 adds one to each element


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/models/nope", 404, "model_not_found"),
        ("GET", "/v2/models/adder/versions/9", 404, "model_not_found"),
        ("POST", "/v2/models/nope/infer", 404, "model_not_found"),
        ("GET", "/nowhere", 404, "not_found"),
        ("GET", "/v2/models/adder/infer", 405, "method_not_allowed"),
    ],
)
async def test_routing_errors(client: httpx.AsyncClient, method: str, path: str, status: int, code: str) -> None:
    response = await client.request(method, path)
    assert response.status_code == status
    assert response.json()["code"] == code
    assert response.json()["error"]


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v2/models/adder/infer", content=b'{"inputs": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]


async def test_shape_mismatch_names_the_input(client: httpx.AsyncClient) -> None:
    body = v2_body([[1, 2, 3]], [[1, 1, 1]])
    body["inputs"][1]["shape"] = [1, 4]  # type: ignore[index]
    response = await client.post("/v2/models/adder/infer", json=body)
    assert response.status_code == 400
    assert "'b'" in response.json()["error"] or '"b"' in response.json()["error"]


async def test_schema_violation_is_422_with_path(client: httpx.AsyncClient) -> None:
    v2 = await client.post("/v2/models/adder/infer", json={"inputs": [{"name": "a", "shape": [1, 3]}]})
    plain = await client.post("/v1/models/adder/predict", json={"a": [1, 2, "x"], "b": [1, 1, 1]})
    assert v2.status_code == 422
    assert "inputs[0]" in v2.json()["error"]
    assert plain.status_code == 422
    assert "a[2]" in plain.json()["error"]


async def test_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/models/adder/predict", content=b"[" + b"1," * 40_000 + b"1]")
    assert response.status_code == 413
    assert "65536" in response.json()["error"]


async def test_streamed_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> object:
        for _ in range(100):
            yield b" " * 1024

    response = await client.post("/v1/models/adder/predict", content=chunks())  # type: ignore[arg-type]
    assert response.status_code == 413


async def test_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/models/adder/predict", content=b"a=1", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]


async def test_model_exception_is_500_without_internals(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/models/faulty/predict", json={"fail": True})
    assert response.status_code == 500
    assert response.json()["code"] == "model_error"
    assert "secret" not in response.text
    assert "passwd" not in response.text
    assert response.headers["x-request-id"]
    ok = await client.post("/v1/models/faulty/predict", json={"fail": False})
    assert ok.json() == {"ok": True}


async def test_output_contract_violation_gives_both_numbers(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/models/wrong_rows/predict", json=[{"x": 1}, {"x": 2}])
    assert response.status_code == 500
    assert "1 rows" in response.json()["error"]
    assert "2 rows" in response.json()["error"]


async def test_bad_timeout_header_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/models/sleeper/predict", json={"seconds": 0}, headers={"X-Request-Timeout": "-1"})
    assert response.status_code == 400
    assert "X-Request-Timeout" in response.json()["error"]


async def test_deadline_gives_504_and_queued_work_never_runs() -> None:
    # One executor thread: the first request occupies it, the second waits in the queue past its deadline.
    # A fresh server: with the sleeper's cost learned from earlier calls, the batcher would refuse the
    # second request at admission (503, deadline_unreachable: tests/test_batching.py) instead of queueing it.
    sleeper = Sleeper()
    async with serving(Service(sleeper), SETTINGS) as running, running.client() as client:
        blocker = asyncio.create_task(client.post("/v1/models/sleeper/predict", json={"seconds": 0.5}))
        await asyncio.to_thread(sleeper.started.wait, 5)
        started = time.perf_counter()
        late = await client.post(
            "/v1/models/sleeper/predict", json={"seconds": 0}, headers={"X-Request-Timeout": "0.1"}
        )
        elapsed = time.perf_counter() - started
        assert late.status_code == 504
        assert late.json()["code"] == "deadline_exceeded"
        assert elapsed < 0.45
        assert (await blocker).status_code == 200
        await asyncio.sleep(0.05)
    assert sleeper.calls == 1  # the expired request never reached the model


async def test_client_disconnect_cancels_queued_work(running: RunningServer, client: httpx.AsyncClient) -> None:
    SLEEPER.started.clear()
    before = SLEEPER.calls
    blocker = asyncio.create_task(client.post("/v1/models/sleeper/predict", json={"seconds": 0.5}))
    await asyncio.to_thread(SLEEPER.started.wait, 5)
    async with running.client() as impatient:
        with pytest.raises(httpx.ReadTimeout):
            await impatient.post("/v1/models/sleeper/predict", json={"seconds": 0}, timeout=0.1)
    assert (await blocker).status_code == 200
    # Answered after any batch that could still have held the withdrawn row.
    assert (await client.post("/v1/models/sleeper/predict", json={"seconds": 0})).status_code == 200
    assert SLEEPER.calls == before + 2  # the blocker and the last request: the withdrawn row never ran
    metrics = (await client.get("/metrics")).text
    assert 'asyncserve_client_disconnects_total{model="sleeper",route="v1_predict"}' in metrics


async def test_metrics_exposition(client: httpx.AsyncClient) -> None:
    await client.post("/v1/models/adder/predict", json={"a": [1, 2, 3], "b": [1, 1, 1]})
    await client.get("/v2/models/nope")
    response = await client.get("/metrics")
    text = response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert 'asyncserve_requests_total{model="adder",route="v1_predict",status="200"}' in text
    assert 'asyncserve_request_errors_total{code="model_not_found",model="",route="model_metadata"}' in text
    assert "nope" not in text  # made-up names never become label values
    assert 'asyncserve_request_duration_seconds_bucket{le="0.005",model="adder",route="v1_predict"}' in text
    assert "asyncserve_requests_in_flight" in text
    assert "asyncserve_event_loop_lag_seconds_count" in text
    assert 'asyncserve_model_ready{model="adder",version="2"} 1.0' in text
    assert 'asyncserve_inference_rows_total{model="adder:2"}' in text
    assert f'asyncserve_build_info{{version="{asyncserve.__version__}"}} 1.0' in text


async def test_repository_index_unload_and_load(client: httpx.AsyncClient) -> None:
    index = (await client.post("/v2/repository/index")).json()
    assert {"name": "adder", "version": "1", "state": "READY", "reason": ""} in index
    assert (await client.post("/v2/repository/models/shout/unload")).status_code == 200
    unloaded = await client.post("/v1/models/shout/predict", json={"text": "x"})
    assert unloaded.status_code == 503
    assert unloaded.headers["retry-after"]
    ready_only = (await client.post("/v2/repository/index", json={"ready": True})).json()
    assert "shout" not in {row["name"] for row in ready_only}
    assert (await client.post("/v2/repository/models/shout/load")).status_code == 200
    assert (await client.post("/v1/models/shout/predict", json={"text": "x"})).json() == {"text": "X"}


async def test_openapi_and_docs(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    assert "/v1/models/adder/predict" in document["paths"]
    docs = await client.get("/docs")
    assert docs.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in docs.text


def test_adder_is_a_model() -> None:
    assert issubclass(AdderV1, Adder)


async def test_a_large_body_is_decoded_off_the_loop_with_the_same_answer() -> None:
    rows = [{"a": [float(i), 0.0, 1.0], "b": [1.0, 1.0, 1.0]} for i in range(64)]
    padding = b" " * 100_000  # over a 64 kB threshold: decoded in a thread
    body = padding + orjson.dumps(rows)
    v2_bytes = padding + orjson.dumps(v2_body_of(rows))
    answers = []
    for threshold in (64 * 1024, 64 * 1024 * 1024):
        settings = Settings(executor_workers=1, jobs="", decode_off_loop_bytes=threshold, max_body_bytes=1 << 26)
        async with serving(Service(Adder(), name="large"), settings) as running, running.client() as client:
            predicted = await client.post("/v1/models/adder/predict", content=body)
            inferred = await client.post("/v2/models/adder/infer", content=v2_bytes)
            bad = await client.post("/v1/models/adder/predict", content=body + b"x")
        assert (predicted.status_code, inferred.status_code) == (200, 200)
        assert (bad.status_code, bad.json()["code"]) == (400, "invalid_request")  # errors come back the same way
        answers.append((predicted.json(), inferred.json()["outputs"]))
    assert answers[0] == answers[1]
    assert answers[0][0][-1]["sum"] == [64.0, 1.0, 2.0]


def v2_body_of(rows: list[dict[str, list[float]]]) -> dict[str, object]:
    return v2_body([row["a"] for row in rows], [row["b"] for row in rows])
