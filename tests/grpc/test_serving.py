"""The gRPC server as a process: one request path with REST (shared batches, metrics), the asyncio
client, API keys, TLS, --workers, graceful drain on SIGTERM, and start-up without grpcio."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from asyncserve.http.auth import new_key
from tests.grpc.conftest import Served, aio_client, serve_grpc
from tests.http.test_server_behaviour import self_signed_certificate
from tests.processes import REPO, eventually

pytestmark = pytest.mark.e2e


def batched_input(value: float) -> list[triton_aio.InferInput]:
    tensor = triton_aio.InferInput("x", [1], "FP32")
    tensor.set_data_from_numpy(np.array([value], dtype=np.float32))
    return [tensor]


async def rest_batch(http: httpx.AsyncClient, value: float) -> int:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [value]}]}
    response = await http.post("/v2/models/batched/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {output["name"]: output["data"] for output in response.json()["outputs"]}
    assert outputs["y"] == [value * 2]
    return int(outputs["batch"][0])


async def grpc_batch(client: triton_aio.InferenceServerClient, value: float) -> int:
    result = await client.infer("batched", batched_input(value))
    assert result.as_numpy("y").tolist() == [value * 2]
    return int(result.as_numpy("batch")[0])


async def test_rest_and_grpc_requests_share_batches(served: Served) -> None:
    client = await aio_client(served.grpc_url)
    async with client, httpx.AsyncClient(base_url=served.http_url) as http:
        await rest_batch(http, 0.0)  # connections open and warm before the burst
        await grpc_batch(client, 0.0)
        rest = [rest_batch(http, float(i)) for i in range(24)]
        grpc_calls = [grpc_batch(client, float(i)) for i in range(24)]
        batches = await asyncio.gather(*rest, *grpc_calls)
    by_rest, by_grpc = set(batches[:24]), set(batches[24:])
    predict_calls = len(by_rest | by_grpc)
    assert predict_calls < len(batches) / 4, batches  # 48 requests, a handful of predict calls
    assert by_rest & by_grpc, batches  # some batch held requests of both protocols


async def test_the_asyncio_client_infers_and_streams(served: Served) -> None:
    client = await aio_client(served.grpc_url)
    async with client:
        result = await client.infer("batched", batched_input(1.5), request_id="aio-1")
        assert result.as_numpy("y").tolist() == [3.0]
        assert result.get_response().id == "aio-1"

        async def requests() -> Any:
            count = triton_aio.InferInput("n", [1], "INT64")
            count.set_data_from_numpy(np.array([2]))
            yield {"model_name": "counting", "inputs": [count], "request_id": "c"}
            yield {"model_name": "batched", "inputs": batched_input(2.0), "request_id": "b"}

        answers = [answer async for answer in client.stream_infer(requests())]
    assert [error for _, error in answers] == [None, None, None]
    assert [result.as_numpy("i").tolist() for result, _ in answers[:2]] == [[0], [1]]
    assert answers[2][0].as_numpy("y").tolist() == [4.0]


async def test_grpc_calls_are_counted_by_method_model_and_code(served: Served) -> None:
    client = await aio_client(served.grpc_url)
    async with client:
        await client.infer("batched", batched_input(1.0))
        with pytest.raises(InferenceServerException):
            await client.infer("nope", batched_input(1.0))
    async with httpx.AsyncClient(base_url=served.http_url) as http:
        text = (await http.get("/metrics")).text
    assert 'asyncserve_grpc_requests_total{code="OK",method="ModelInfer",model="batched"}' in text
    assert 'asyncserve_grpc_requests_total{code="NOT_FOUND",method="ModelInfer",model=""}' in text
    assert 'asyncserve_request_errors_total{code="model_not_found",model="",route="grpc_ModelInfer"}' in text
    assert 'asyncserve_inference_rows_total{model="batched"}' in text  # the pipeline's own metrics


async def test_api_keys_and_scopes(tmp_path: Path) -> None:
    infer_key, infer_line = new_key("reader", ["infer"])
    admin_key, admin_line = new_key("ops", ["admin"])
    env = {"ASYNCSERVE_API_KEYS": f"{infer_line.line()};{admin_line.line()}"}
    async with serve_grpc(tmp_path, env=env) as served:
        client = await aio_client(served.grpc_url)
        async with client:
            assert await client.is_server_live()  # health is open
            with pytest.raises(InferenceServerException) as missing:
                await client.infer("batched", batched_input(1.0))
            assert missing.value.status() == "StatusCode.UNAUTHENTICATED"
            assert missing.value.message() == "this route needs an API key: send it as 'Authorization: Bearer <key>'"
            with pytest.raises(InferenceServerException) as wrong:
                await client.infer("batched", batched_input(1.0), headers={"x-api-key": "not-a-key"})
            assert wrong.value.status() == "StatusCode.UNAUTHENTICATED"
            bearer = {"authorization": f"Bearer {infer_key}"}
            assert (await client.infer("batched", batched_input(1.0), headers=bearer)).as_numpy("y").tolist() == [2.0]
            assert (await client.get_model_metadata("batched", headers={"x-api-key": infer_key})).name == "batched"
            with pytest.raises(InferenceServerException) as forbidden:
                await client.unload_model("batched", headers=bearer)
            assert forbidden.value.status() == "StatusCode.PERMISSION_DENIED"
            assert "the key 'reader' lacks the 'admin' scope" in forbidden.value.message()
            await client.unload_model("sleeper", headers={"authorization": f"Bearer {admin_key}"})
            assert not await client.is_model_ready("sleeper")


async def test_tls_with_the_https_certificate(tmp_path: Path) -> None:
    certfile, keyfile = await self_signed_certificate(tmp_path)
    args = ("--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile))
    async with serve_grpc(tmp_path, *args, certfile=certfile) as served:
        client = await aio_client(served.grpc_url, certfile)
        async with client:
            assert (await client.infer("batched", batched_input(3.0))).as_numpy("y").tolist() == [6.0]
        plain = await aio_client(served.grpc_url)
        async with plain:
            with pytest.raises(InferenceServerException):
                await plain.is_server_live()


async def test_workers_share_the_grpc_port(tmp_path: Path) -> None:
    async with serve_grpc(tmp_path, "--workers", "2") as served:
        for _ in range(4):  # a new connection each time: the kernel spreads them over the workers
            client = await aio_client(served.grpc_url)
            async with client:
                assert (await client.infer("batched", batched_input(1.0))).as_numpy("y").tolist() == [2.0]


async def test_sigterm_drains_calls_in_flight(tmp_path: Path) -> None:
    async with serve_grpc(tmp_path, env={"ASYNCSERVE_GRACE_PERIOD_S": "10"}) as served:
        client = await aio_client(served.grpc_url)
        async with client:
            seconds = triton_aio.InferInput("seconds", [1], "FP64")
            seconds.set_data_from_numpy(np.array([1.0]))
            in_flight = asyncio.ensure_future(client.infer("sleeper", [seconds]))
            async with httpx.AsyncClient(base_url=served.http_url) as http:

                async def in_flight_on_the_server() -> bool:
                    return (
                        'asyncserve_requests_in_flight{route="grpc_ModelInfer"} 1.0'
                        in (await http.get("/metrics")).text
                    )

                await eventually(in_flight_on_the_server, "the call in flight")
            served.terminate()
            result = await in_flight
            assert result.as_numpy("pid") is not None
        assert await asyncio.wait_for(served.process.wait(), 15) == 0


async def test_without_the_grpc_extra_the_port_fails_at_start_in_one_line() -> None:
    code = (
        "import sys; sys.modules['hpack'] = None; from asyncserve.cli import main; "
        "sys.exit(main(['serve', 'tests.grpc.services:service', '--port', '0', '--grpc-port', '0']))"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert stderr.decode().splitlines() == [
        "asyncserve: error: --grpc-port needs gRPC support, which is not installed: pip install 'asyncserve[grpc]'"
    ]
