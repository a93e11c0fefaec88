"""What a web page in a browser could send is refused: other Host names (DNS rebinding) and form posts."""

from __future__ import annotations

import orjson
import pytest

from asyncserve import Service, Settings
from tests.conftest import RunningServer, serving
from tests.models import Adder
from tests.test_shedding import connect, read_response

SERVICE = Service(Adder(), name="origin")
SETTINGS = Settings(executor_workers=1, jobs="memory://", loop_lag_interval_s=0.01)
ROW = orjson.dumps({"a": [1.0, 2.0, 3.0], "b": [1.0, 1.0, 1.0]})


async def raw(running: RunningServer, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await connect(running)
    try:
        writer.write(head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return await read_response(reader)
    finally:
        writer.close()


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST"])
async def test_a_server_on_loopback_answers_to_loopback_names(running: RunningServer, host: str) -> None:
    status, _, _ = await raw(running, f"POST /v1/models/adder/predict HTTP/1.1\r\nHost: {host}\r\n", ROW)
    assert status == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example"])
async def test_another_host_name_is_refused(running: RunningServer, host: str) -> None:
    status, _, body = await raw(running, f"POST /v1/models/adder/predict HTTP/1.1\r\nHost: {host}\r\n", ROW)
    assert (status, orjson.loads(body)["code"]) == (400, "host_not_allowed")
    assert "--allowed-hosts" in orjson.loads(body)["error"]


async def test_an_http_1_0_request_without_host_is_answered(running: RunningServer) -> None:
    status, _, _ = await raw(running, "POST /v1/models/adder/predict HTTP/1.0\r\n", ROW)
    assert status == 200


async def test_allowed_hosts_are_answered_and_others_not() -> None:
    settings = Settings(executor_workers=1, jobs="", allowed_hosts="api.example.com")
    async with serving(Service(Adder(), name="named"), settings) as running:
        ok, _, _ = await raw(running, "POST /v1/models/adder/predict HTTP/1.1\r\nHost: api.example.com\r\n", ROW)
        other, _, _ = await raw(running, "POST /v1/models/adder/predict HTTP/1.1\r\nHost: evil.example\r\n", ROW)
    assert (ok, other) == (200, 400)


@pytest.mark.parametrize("media_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
async def test_posts_in_the_types_a_page_may_send_anywhere_are_refused(running: RunningServer, media_type: str) -> None:
    for path in ("/v1/jobs", "/v1/models/adder/predict", "/v2/repository/models/adder/unload"):
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {media_type}; charset=utf-8\r\n"
        status, _, body = await raw(running, head, b'{"model": "adder", "inputs": {}}')
        assert (status, orjson.loads(body)["code"]) == (415, "unsupported_media_type"), path
    ready, _, _ = await raw(running, "GET /v2/models/adder/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert ready == 200  # the form post did not unload it


async def test_a_pipelined_request_is_checked_too(running: RunningServer) -> None:
    # Behind another request, a head is not screened as it arrives: the check happens when it is served.
    def post(host: str, content_type: str = "application/json") -> bytes:
        head = f"POST /v1/models/adder/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        return head.encode() + b"Content-Length: %d\r\n\r\n" % len(ROW) + ROW

    reader, writer = await connect(running)
    try:
        writer.write(post("127.0.0.1") + post("evil.example") + post("127.0.0.1", "text/plain"))
        answers = [await read_response(reader) for _ in range(3)]
    finally:
        writer.close()
    assert [status for status, _, _ in answers] == [200, 400, 415]
    assert orjson.loads(answers[1][2])["code"] == "host_not_allowed"
