"""What asyncserve's HTTP server guarantees a client (``asyncserve.http.protocol``'s docstring), over real
sockets against a real server: request smuggling refused, slow heads timed out, thousands of idle
connections, a bug answered 500 and logged, the limits, ``Expect: 100-continue``, keep-alive and
pipelining, TLS, the access log and a graceful drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import orjson
import pytest

from asyncserve import ConfigurationError, Model, Service, Settings, Tensor
from asyncserve.http import jsonapi
from tests.conftest import RunningServer, serving
from tests.models import Adder, Sleeper
from tests.test_shedding import connect, read_response, request

SERVICE = Service(Adder(), Sleeper(), name="server-behaviour")
SETTINGS = Settings(
    executor_workers=2,
    loop_lag_interval_s=0.01,
    jobs="memory://",
    max_body_bytes=4096,
    max_url_bytes=1024,
    max_header_count=20,
    max_header_bytes=2048,
    keep_alive_s=30.0,
    head_timeout_s=0.3,
    body_timeout_s=0.4,
)

ROW = {"a": [1.0, 2.0, 3.0], "b": [1.0, 1.0, 1.0]}
PREDICT = "/v1/models/adder/predict"
HEAD = f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"

Answer = tuple[int, dict[str, str], bytes]


def split_responses(data: bytes) -> list[Answer]:
    """Every response in ``data`` (what a connection received), each framed by its content-length."""
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in header_lines)
        length = int(headers.get("content-length", "0"))
        answers.append((int(status_line.split()[1]), headers, rest[:length]))
        data = rest[length:]
    return answers


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a hang fails the test)."""
    return await asyncio.wait_for(reader.read(), 5)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@contextlib.asynccontextmanager
async def connection(running: RunningServer) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await connect(running)
    try:
        yield reader, writer
    finally:
        await close(writer)


async def refused_and_closed(running: RunningServer, raw: bytes) -> tuple[list[Answer], float]:
    """Send ``raw`` on a new connection; the answers it got before the server closed it, and how long that took."""
    async with connection(running) as (reader, writer):
        started = time.monotonic()
        writer.write(raw)
        answers = split_responses(await read_to_eof(reader))
        return answers, time.monotonic() - started


def assert_error(answer: Answer, status: int, code: str) -> dict[str, Any]:
    got, headers, body = answer
    assert got == status, body
    assert headers["content-type"] == "application/json"
    error: dict[str, Any] = orjson.loads(body)
    assert error["code"] == code
    assert isinstance(error["error"], str)
    assert error["error"]
    return error


async def assert_serves(running: RunningServer) -> None:
    """A normal request on a new connection answers 200."""
    async with connection(running) as (reader, writer):
        writer.write(request(PREDICT, orjson.dumps(ROW)))
        status, _, body = await read_response(reader)
    assert status == 200, body
    assert orjson.loads(body)["sum"] == [2.0, 3.0, 4.0]


# 1. Request smuggling


SMUGGLED = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param(f"Content-Length: {5 + len(SMUGGLED)}\r\nTransfer-Encoding: chunked\r\n", id="length-and-chunked"),
        pytest.param(f"Transfer-Encoding: chunked\r\nContent-Length: {5 + len(SMUGGLED)}\r\n", id="chunked-and-length"),
        pytest.param(f"Content-Length: 5\r\nContent-Length: {5 + len(SMUGGLED)}\r\n", id="two-lengths"),
        pytest.param("Transfer-Encoding: gzip\r\n", id="gzip"),
        pytest.param("Transfer-Encoding: gzip, chunked\r\n", id="gzip-then-chunked"),
    ],
)
async def test_ambiguous_framing_is_refused_400_the_connection_closed_and_a_smuggled_request_never_answered(
    running: RunningServer, framing: str
) -> None:
    # Read by Content-Length, the body holds a second request; read as chunked, it follows the first.
    raw = f"{HEAD}{framing}\r\n".encode() + b"0\r\n\r\n" + SMUGGLED
    answers, _ = await refused_and_closed(running, raw)
    assert len(answers) == 1, f"only the refusal, never an answer to the smuggled request: {answers}"
    assert_error(answers[0], 400, "invalid_request")
    assert answers[0][1]["connection"] == "close"
    await assert_serves(running)


async def test_a_smuggling_attempt_pipelined_behind_a_request_is_refused_after_that_request_is_answered(
    running: RunningServer,
) -> None:
    valid = request(PREDICT, orjson.dumps(ROW), "X-Request-ID: before")
    smuggling = f"{HEAD}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode() + SMUGGLED
    answers, _ = await refused_and_closed(running, valid + smuggling)
    assert [status for status, _, _ in answers] == [200, 400], answers
    assert answers[0][1]["x-request-id"] == "before"
    assert orjson.loads(answers[0][2])["sum"] == [2.0, 3.0, 4.0]
    assert_error(answers[1], 400, "invalid_request")


async def test_a_protocol_upgrade_is_not_made_the_request_is_answered_and_the_connection_closes(
    running: RunningServer,
) -> None:
    # With an upgrade (h2c, websocket) the bytes that follow are not HTTP/1.1 any more: the server
    # answers the request over HTTP/1.1 and closes, so that nothing after it is read as a request.
    upgrade = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    async with connection(running) as (reader, writer):
        writer.write(upgrade)
        status, headers, _ = await read_response(reader)
        assert status == 200
        assert headers.get("connection") == "close"
        assert await read_to_eof(reader) == b""


# 2. Slow head


async def test_a_head_that_never_ends_gets_408_and_the_connection_closes_while_others_are_served(
    running: RunningServer,
) -> None:
    async with connection(running) as (slow_reader, slow_writer):
        started = time.monotonic()
        slow_writer.write(b"POST /v1/models/adder/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await slow_writer.drain()
        await assert_serves(running)  # meanwhile, on another connection
        answers = split_responses(await read_to_eof(slow_reader))
        took = time.monotonic() - started
    assert len(answers) == 1, answers
    error = assert_error(answers[0], 408, "request_timeout")
    assert "0.3 s" in error["error"]
    assert answers[0][1]["connection"] == "close"
    assert SETTINGS.head_timeout_s <= took < 2.0


async def test_a_head_that_arrives_in_time_in_pieces_is_served(running: RunningServer) -> None:
    async with connection(running) as (reader, writer):
        whole = request(PREDICT, orjson.dumps(ROW))
        writer.write(whole[:20])
        await writer.drain()
        writer.write(whole[20:])
        status, _, body = await read_response(reader)
    assert status == 200, body


async def test_a_body_that_never_ends_gets_408_and_the_connection_closes(running: RunningServer) -> None:
    async with connection(running) as (slow_reader, slow_writer):
        started = time.monotonic()
        slow_writer.write(request(PREDICT, orjson.dumps(ROW))[:-5])  # the head, and all but 5 bytes of the body
        await slow_writer.drain()
        await assert_serves(running)  # meanwhile, on another connection
        answers = split_responses(await read_to_eof(slow_reader))
        took = time.monotonic() - started
    assert len(answers) == 1, answers
    error = assert_error(answers[0], 408, "request_timeout")
    assert "request body did not arrive within 0.4 s" in error["error"]
    assert SETTINGS.body_timeout_s <= took < 2.0


async def test_a_connection_over_the_limit_is_answered_503_and_closed() -> None:
    settings = Settings(executor_workers=1, jobs="", max_connections=3, keep_alive_s=30.0)
    async with serving(Service(Adder(), name="few"), settings) as running:
        async with connection(running) as first, connection(running) as second, connection(running) as third:
            for reader, writer in (first, second, third):
                writer.write(request(PREDICT, orjson.dumps(ROW)))
                assert (await read_response(reader))[0] == 200  # accepted, kept alive
            async with connection(running) as (reader, _):
                answers = split_responses(await read_to_eof(reader))
            assert len(answers) == 1
            error = assert_error(answers[0], 503, "unavailable")
            assert "limit of 3 connections" in error["error"]
            assert answers[0][1]["retry-after"] == "1"
        await assert_serves(running)  # the three closed: room again


@pytest.mark.parametrize("header", ["X-Request-Timeout: 5", "Inference-Header-Content-Length: 10"])
async def test_a_header_that_counts_once_given_twice_is_refused(running: RunningServer, header: str) -> None:
    async with connection(running) as (reader, writer):
        writer.write(request(PREDICT, orjson.dumps(ROW), header, header.replace("5", "9").replace("10", "20")))
        status, _, body = await read_response(reader)
    assert (status, orjson.loads(body)["code"]) == (400, "invalid_request")
    assert "given more than once" in orjson.loads(body)["error"]


# 3. Many idle connections


IDLE_CONNECTIONS = 2000


@pytest.fixture
def enough_file_descriptors() -> Iterator[None]:
    """Both ends of every connection live in this process: raise the soft limit while the test runs if it is
    too low, or skip if the hard limit does not allow enough."""
    needed = 2 * IDLE_CONNECTIONS + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"{IDLE_CONNECTIONS} connections need {needed} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def wait_until(condition: Any, what: str, timeout_s: float = 5.0) -> None:
    """Wait for a state of the server (polled, as the server runs in another thread)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_two_thousand_idle_connections_do_not_slow_a_new_request(
    running: RunningServer, enough_file_descriptors: None
) -> None:
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def accepted() -> int:
        ours = {"{}:{}".format(*writer.get_extra_info("sockname")[:2]) for _, writer in idle}
        return sum(connection.client in ours for connection in list(running.server.connections))

    try:
        for _ in range(IDLE_CONNECTIONS // 200):
            idle.extend(await asyncio.gather(*(connect(running) for _ in range(200))))
        await wait_until(lambda: accepted() == IDLE_CONNECTIONS, "the server to accept them all")
        started = time.monotonic()
        await assert_serves(running)
        assert time.monotonic() - started < 1.0
        assert not any(reader.at_eof() for reader, _ in idle), "no idle connection was closed (keep_alive_s is 30)"
    finally:
        await asyncio.gather(*(close(writer) for _, writer in idle))
    await wait_until(lambda: accepted() == 0, "the server to see them all closed")


# 4. A bug in the HTTP layer


async def test_a_bug_answers_500_logs_its_traceback_and_the_connection_serves_the_next(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("injected")

    async with connection(running) as (reader, writer):
        monkeypatch.setattr(jsonapi, "encode_rows", broken)
        with caplog.at_level(logging.ERROR, logger="asyncserve.http.app"):
            writer.write(request(PREDICT, orjson.dumps(ROW), "X-Request-ID: bug-1"))
            status, headers, body = await read_response(reader)
        monkeypatch.undo()
        error = assert_error((status, headers, body), 500, "internal")
        assert "bug-1" in error["error"]
        assert "injected" not in body.decode(), "the bug's details stay in the server log"
        assert "connection" not in headers
        logged = [r for r in caplog.records if r.name == "asyncserve.http.app" and r.levelno == logging.ERROR]
        assert len(logged) == 1, logged
        assert "bug-1" in logged[0].getMessage()
        assert logged[0].exc_info is not None
        assert isinstance(logged[0].exc_info[1], RuntimeError)
        assert str(logged[0].exc_info[1]) == "injected"
        assert logged[0].exc_info[2] is not None  # the traceback
        writer.write(request(PREDICT, orjson.dumps(ROW)))
        status, _, body = await read_response(reader)
    assert status == 200, body
    assert orjson.loads(body)["sum"] == [2.0, 3.0, 4.0]


# 5. Limits


def with_headers(count: int, value: str = "v") -> bytes:
    lines = "".join(f"X-Extra-{i}: {value}\r\n" for i in range(count))
    body = orjson.dumps(ROW)
    return f"{HEAD}{lines}Content-Length: {len(body)}\r\n\r\n".encode() + body


@pytest.mark.parametrize(
    ("raw", "status", "code", "says"),
    [
        pytest.param(
            request("/v1/models/adder/predict?" + "q" * 2000, orjson.dumps(ROW)),
            414,
            "uri_too_long",
            "1024 bytes",
            id="url",
        ),
        pytest.param(with_headers(30), 431, "headers_too_large", "20 headers", id="header-count"),
        pytest.param(with_headers(1, "v" * 3000), 431, "headers_too_large", "2048 bytes", id="header-bytes"),
        pytest.param(
            f"{HEAD}Transfer-Encoding: chunked\r\n\r\n".encode()
            + b"".join(b"3e8\r\n" + b"x" * 1000 + b"\r\n" for _ in range(6)),  # 6000 bytes, and no end
            413,
            "payload_too_large",
            "4096",
            id="chunked-body",
        ),
    ],
)
async def test_a_request_over_a_limit_gets_its_error_body_then_the_connection_closes(
    running: RunningServer, raw: bytes, status: int, code: str, says: str
) -> None:
    answers, took = await refused_and_closed(running, raw)
    assert len(answers) == 1, answers
    error = assert_error(answers[0], status, code)
    assert says in error["error"]
    assert answers[0][1]["connection"] == "close"
    assert took < 1.0, "answered at once, without waiting for a body that never comes"
    await assert_serves(running)


async def test_a_content_length_over_the_limit_is_answered_413_before_the_body_is_sent(running: RunningServer) -> None:
    body = b"x" * 5000
    async with connection(running) as (reader, writer):
        writer.write(f"{HEAD}Content-Length: {len(body)}\r\n\r\n".encode())  # and not the body, yet
        status, headers, answer = await read_response(reader)
        error = assert_error((status, headers, answer), 413, "payload_too_large")
        assert "4096" in error["error"]
        writer.write(body)  # sent anyway: read and dropped, or the connection closes; never a reset
        if headers.get("connection") == "close":
            assert await read_to_eof(reader) == b""
        else:
            writer.write(request(PREDICT, orjson.dumps(ROW)))
            status, _, answer = await read_response(reader)
            assert (status, orjson.loads(answer)["sum"]) == (200, [2.0, 3.0, 4.0])


async def test_a_body_under_the_limit_is_served(running: RunningServer) -> None:
    body = b'{"a": [1.0, 2.0, 3.0],' + b" " * 3500 + b'"b": [1.0, 1.0, 1.0]}'
    async with connection(running) as (reader, writer):
        writer.write(request(PREDICT, body))
        status, _, answer = await read_response(reader)
    assert status == 200, answer


# 6. Expect: 100-continue


async def test_expect_100_continue_is_answered_before_the_body_is_sent(running: RunningServer) -> None:
    body = orjson.dumps(ROW)
    async with connection(running) as (reader, writer):
        writer.write(f"{HEAD}Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        status, headers, answer = await read_response(reader)
        assert status == 200, answer
        assert orjson.loads(answer)["sum"] == [2.0, 3.0, 4.0]
        assert "connection" not in headers
        writer.write(request(PREDICT, body))  # the connection lives on
        assert (await read_response(reader))[0] == 200


@pytest.mark.parametrize(
    ("expect", "length", "status", "code"),
    [
        pytest.param("100-continue", 1_000_000, 413, "payload_too_large", id="too-large"),
        pytest.param("something-else", 10, 417, "expectation_failed", id="unknown-expectation"),
    ],
)
async def test_a_refused_expectation_gets_its_answer_without_100_continue(
    running: RunningServer, expect: str, length: int, status: int, code: str
) -> None:
    raw = f"{HEAD}Expect: {expect}\r\nContent-Length: {length}\r\n\r\n".encode()
    answers, took = await refused_and_closed(running, raw)  # the body is never sent
    assert len(answers) == 1, f"no 100 Continue before the refusal: {answers}"
    assert_error(answers[0], status, code)
    assert took < 1.0


# 7. Connections: HTTP/1.0, keep-alive, pipelining, chunked bodies


async def test_http_1_0_gets_its_answer_and_the_connection_closes(running: RunningServer) -> None:
    async with connection(running) as (reader, writer):
        writer.write(request(PREDICT, orjson.dumps(ROW), version="1.0"))
        answers = split_responses(await read_to_eof(reader))
    assert len(answers) == 1, answers
    status, headers, body = answers[0]
    assert (status, headers["connection"]) == (200, "close")
    assert orjson.loads(body)["sum"] == [2.0, 3.0, 4.0]


async def test_keep_alive_serves_several_requests_on_one_connection(running: RunningServer) -> None:
    async with connection(running) as (reader, writer):
        for i in range(5):
            writer.write(request(PREDICT, orjson.dumps({"a": [i, 0, 0], "b": [1, 1, 1]})))
            status, headers, body = await read_response(reader)
            assert status == 200, body
            assert "connection" not in headers
            assert orjson.loads(body)["sum"] == [i + 1.0, 1.0, 1.0]
        writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await read_response(reader))[0] == 200


async def test_pipelined_requests_are_answered_in_order(running: RunningServer) -> None:
    slow = request("/v1/models/sleeper/predict", orjson.dumps({"seconds": 0.2}), "X-Request-ID: p-0")
    fast = [request(PREDICT, orjson.dumps({"a": [i, 0, 0], "b": [1, 1, 1]}), f"X-Request-ID: p-{i}") for i in (1, 2)]
    async with connection(running) as (reader, writer):
        writer.write(slow + fast[0] + fast[1])  # at once: the fast ones wait behind the slow one
        answers = [await read_response(reader) for _ in range(3)]
    assert [(status, headers["x-request-id"]) for status, headers, _ in answers] == [
        (200, "p-0"),
        (200, "p-1"),
        (200, "p-2"),
    ]
    assert "pid" in orjson.loads(answers[0][2])
    assert [orjson.loads(body)["sum"] for _, _, body in answers[1:]] == [[2.0, 1.0, 1.0], [3.0, 1.0, 1.0]]


async def test_a_chunked_body_is_answered_like_the_same_body_with_a_content_length(running: RunningServer) -> None:
    body = orjson.dumps(ROW)
    pieces = [body[:7], body[7:20], body[20:]]
    chunked = f"{HEAD}Transfer-Encoding: chunked\r\n\r\n".encode()
    chunked += b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
    async with connection(running) as (reader, writer):
        writer.write(request(PREDICT, body))
        plain = await read_response(reader)
        writer.write(chunked[:60])  # the head and its chunks arrive in several writes
        await writer.drain()
        writer.write(chunked[60:])
        gathered = await read_response(reader)
    assert plain[0] == gathered[0] == 200, (plain, gathered)
    assert orjson.loads(plain[2]) == orjson.loads(gathered[2]) == {"sum": [2.0, 3.0, 4.0], "total": 9.0}


# 8. TLS


async def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    certfile, keyfile = directory / "c.pem", directory / "k.pem"
    openssl = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(keyfile), "-out", str(certfile),
        "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await openssl.communicate()
    assert openssl.returncode == 0, stderr.decode()
    return certfile, keyfile


async def test_https_with_a_certificate_and_key(tmp_path: Path) -> None:
    certfile, keyfile = await self_signed_certificate(tmp_path)
    settings = Settings(executor_workers=1, jobs="memory://", ssl_certfile=str(certfile), ssl_keyfile=str(keyfile))
    trusting = await asyncio.to_thread(ssl.create_default_context, cafile=str(certfile))
    async with serving(Service(Adder(), name="tls"), settings) as running:
        [url] = running.server.urls
        assert url.startswith("https://127.0.0.1:")
        async with httpx.AsyncClient(base_url=url, verify=trusting, timeout=10) as client:
            answers = [await client.post(PREDICT, json=ROW) for _ in range(2)]  # the second on the same connection
        async with connection(running) as (reader, writer):  # plain HTTP on the TLS port is not served
            writer.write(request(PREDICT, orjson.dumps(ROW)))
            with contextlib.suppress(ConnectionError):
                assert b"HTTP/1.1 200" not in await read_to_eof(reader)
    assert [answer.status_code for answer in answers] == [200, 200], answers[0].text
    assert [answer.json()["sum"] for answer in answers] == [[2.0, 3.0, 4.0]] * 2


async def test_a_certificate_that_does_not_exist_stops_the_server_from_starting(tmp_path: Path) -> None:
    missing = tmp_path / "missing-cert.pem"
    settings = Settings(jobs="memory://", ssl_certfile=str(missing), ssl_keyfile=str(tmp_path / "missing-key.pem"))
    with pytest.raises(ConfigurationError) as raised:
        async with serving(Service(Adder(), name="no-cert"), settings):
            pass
    assert str(missing) in str(raised.value)


# 9. Access log


@pytest.fixture
async def access_logged(caplog: pytest.LogCaptureFixture) -> AsyncIterator[RunningServer]:
    settings = Settings(
        executor_workers=1, jobs="memory://", access_log=True, max_body_bytes=4096, max_url_bytes=1024, grace_period_s=1
    )
    async with serving(Service(Adder(), name="access"), settings) as running:
        with caplog.at_level(logging.INFO, logger="asyncserve.access"):
            yield running


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "asyncserve.access"]


async def test_the_access_log_has_one_record_per_request(
    access_logged: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with connection(access_logged) as (reader, writer):
        writer.write(request(PREDICT, orjson.dumps(ROW)))
        assert (await read_response(reader))[0] == 200
        writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        writer.write(request("/v1/models/nope/predict", orjson.dumps(ROW)))
        assert (await read_response(reader))[0] == 404
        writer.write(f"{HEAD}Content-Length: 5000\r\n\r\n".encode())  # refused from its head
        assert (await read_response(reader))[0] == 413
    # A record is written just after its response: the last may come a moment after the client has its answer.
    await wait_until(lambda: len(access_lines(caplog)) >= 4, "the access log's fourth record")
    lines = access_lines(caplog)
    assert len(lines) == 4, lines
    assert '"POST /v1/models/adder/predict" 200 ' in lines[0]
    assert '"GET /v2/health/live" 200 ' in lines[1]
    assert '"POST /v1/models/nope/predict" 404 ' in lines[2]
    assert '"POST /v1/models/adder/predict" 413 ' in lines[3]
    assert all(line.startswith("127.0.0.1:") for line in lines)


async def test_a_request_the_parser_refuses_is_logged_once_as_itself_and_its_connection_closes(
    access_logged: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The first request of a connection: the URL is over the limit.
    answers, _ = await refused_and_closed(access_logged, request("/v1/models/" + "x" * 2000, b"{}"))
    assert [status for status, _, _ in answers] == [414]
    # After a request served on the same connection: two Content-Lengths.
    async with connection(access_logged) as (reader, writer):
        writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        writer.write(f"{HEAD}Content-Length: 1\r\nContent-Length: 2\r\n\r\n".encode())
        assert [status for status, _, _ in split_responses(await read_to_eof(reader))] == [400]
    await wait_until(lambda: len(access_lines(caplog)) >= 3, "the access log's third record")
    lines = access_lines(caplog)
    assert len(lines) == 3, lines
    assert '" 414 ' in lines[0]
    assert '"GET /v2/health/live" 200 ' in lines[1]
    assert '" 400 ' in lines[2]
    assert "/v2/health/live" not in lines[2], f"the refused request is logged as the one before it: {lines[2]}"


# 10. Graceful drain


async def test_stopping_finishes_the_request_in_flight_and_closes_an_idle_connection() -> None:
    sleeper = Sleeper()
    settings = Settings(executor_workers=2, jobs="memory://", keep_alive_s=30.0)
    async with (
        serving(Service(Adder(), sleeper, name="drain"), settings) as running,
        connection(running) as (idle_reader, idle_writer),
        connection(running) as (busy_reader, busy_writer),
    ):
        idle_writer.write(request(PREDICT, orjson.dumps(ROW)))
        assert (await read_response(idle_reader))[0] == 200  # now idle, kept alive
        busy_writer.write(request("/v1/models/sleeper/predict", orjson.dumps({"seconds": 0.5})))
        await asyncio.to_thread(sleeper.started.wait, 5)
        running.loop.call_soon_threadsafe(running.stop.set)
        idle_closed = asyncio.ensure_future(read_to_eof(idle_reader))
        in_flight = asyncio.ensure_future(read_response(busy_reader))
        done, _ = await asyncio.wait([idle_closed, in_flight], return_when=asyncio.FIRST_COMPLETED)
        idle_first = idle_closed in done
        idle_left, (status, headers, body) = await asyncio.gather(idle_closed, in_flight)
        assert idle_first, "the idle connection is closed at once, not after the request in flight"
        assert idle_left == b""
        assert status == 200, body
        assert "pid" in orjson.loads(body)
        assert headers["connection"] == "close"
        assert await read_to_eof(busy_reader) == b""


class Waiter(Model):
    """Holds its request (and so its body) until released, without taking an executor worker."""

    name = "waiter"
    inputs = {"n": Tensor("INT64")}
    outputs = {"n": Tensor("INT64")}
    max_batch_size = 1

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = 0

    async def predict(self, n: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        self.arrived += 1
        await self.release.wait()
        return n


async def test_bodies_past_the_held_limit_wait_unread_until_room_comes_back() -> None:
    waiter = Waiter()
    settings = Settings(executor_workers=1, jobs="", max_body_bytes=400_000, max_held_body_bytes=1_000_000)
    padded = b" " * 300_000 + orjson.dumps({"n": 1})  # 300 kB each: three fit, the fourth waits
    async with serving(Service(waiter, Adder(), name="held"), settings) as running:
        conns = [await connect(running) for _ in range(4)]
        try:
            for n, (_, writer) in enumerate(conns):
                writer.write(request("/v1/models/waiter/predict", padded.replace(b'"n":1', b'"n":%d' % n)))
            async with asyncio.timeout(5):
                while waiter.arrived < 3:  # noqa: ASYNC110 (the model counts arrivals; there is no event)
                    await asyncio.sleep(0.01)
            await assert_serves(running)  # a small body is not held back by the waiting one
            assert waiter.arrived == 3  # the fourth body waits, unread
            running.loop.call_soon_threadsafe(waiter.release.set)
            answers = [await read_response(reader) for reader, _ in conns]
        finally:
            for _, writer in conns:
                writer.close()
    assert [orjson.loads(body)["n"] for _, _, body in answers] == [0, 1, 2, 3]
