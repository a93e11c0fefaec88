"""asyncserve's HTTP protocol over real sockets: inference served from the parser's callbacks with no
task, keep-alive, pipelining, HTTP/1.0, errors, a client that goes away, and the parse budget."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator

import orjson
import pytest

from asyncserve import Service, Settings
from asyncserve.http.protocol import PARSE_BUDGET_S, ParseBudget
from tests.conftest import RunningServer, serve_in_thread
from tests.models import Adder, Sleeper
from tests.test_shedding import connect, read_response, request


class PatientAdder(Adder):
    """Waits up to 50 ms between rows for company: a busy test machine may be slow to turn its loop."""

    name = "patient"
    max_wait_s = 0.05


class SharedSleeper(Sleeper):
    """Identical requests in flight share one computation."""

    name = "shared-sleeper"
    deterministic = True


SLEEPER = Sleeper()
SHARED = SharedSleeper()
SERVICE = Service(Adder(), PatientAdder(), SLEEPER, SHARED, name="direct")
SETTINGS = Settings(executor_workers=1, max_body_bytes=4096, loop_lag_interval_s=0.01, jobs="")

ROW = {"a": [1.0, 2.0, 3.0], "b": [1.0, 1.0, 1.0]}
V2_ROW = {"inputs": [{"name": n, "shape": [1, 3], "datatype": "FP32", "data": v} for n, v in ROW.items()]}


async def until_queued(running: RunningServer, model: str, rows: int) -> None:
    """Wait until the model's batcher holds ``rows`` rows, as ``/metrics`` reports them."""
    line = f'asyncserve_batch_queue_rows{{model="{model}"}} {float(rows)}'
    async with running.client() as client, asyncio.timeout(5):
        while line not in (await client.get("/metrics")).text:  # noqa: ASYNC110 (a metric has no event to await)
            await asyncio.sleep(0.005)


def v2_outputs(body: bytes) -> dict[str, list[float]]:
    return {output["name"]: output["data"] for output in orjson.loads(body)["outputs"]}


async def tasks_on(running: RunningServer) -> set[str]:
    """The names of the tasks alive on the server's event loop, read on that loop."""

    async def names() -> set[str]:
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        return {f"{task.get_name()}:{getattr(task.get_coro(), '__qualname__', '?')}" for task in tasks}

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(names(), running.loop))


async def test_a_request_waiting_for_the_model_holds_no_task(running: RunningServer) -> None:
    SLEEPER.started.clear()
    idle = await tasks_on(running)
    reader, writer = await connect(running)
    writer.write(request("/v1/models/sleeper/predict", orjson.dumps({"seconds": 0.3}), "X-Request-ID: direct-1"))
    await asyncio.to_thread(SLEEPER.started.wait, 5)
    new = await tasks_on(running) - idle
    assert all(name.endswith(":Batcher._execute") for name in new), new  # the batch's task; none for the request
    status, headers, body = await read_response(reader)
    assert (status, headers["x-request-id"]) == (200, "direct-1")
    assert orjson.loads(body)["pid"] > 0
    writer.close()


async def test_keep_alive_serves_many_requests_on_one_connection(running: RunningServer) -> None:
    reader, writer = await connect(running)
    for i in range(20):
        body = {**V2_ROW, "inputs": [{**V2_ROW["inputs"][0], "data": [i, i, i]}, V2_ROW["inputs"][1]]}
        writer.write(request("/v2/models/adder/infer", orjson.dumps(body)))
        status, headers, answer = await read_response(reader)
        assert status == 200, answer
        assert "connection" not in headers
        assert v2_outputs(answer)["sum"] == [i + 1.0] * 3
    writer.close()


async def test_pipelined_requests_are_answered_in_order(running: RunningServer) -> None:
    reader, writer = await connect(running)
    slow = request("/v1/models/sleeper/predict", orjson.dumps({"seconds": 0.2}))
    fast = request("/v1/models/adder/predict", orjson.dumps(ROW))
    writer.write(slow + fast + fast)  # the second and third wait behind the first
    answers = [await read_response(reader) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert "pid" in orjson.loads(answers[0][2])
    assert orjson.loads(answers[1][2])["sum"] == orjson.loads(answers[2][2])["sum"] == [2.0, 3.0, 4.0]
    writer.close()


async def test_http_1_0_gets_its_answer_and_the_connection_closes(running: RunningServer) -> None:
    reader, writer = await connect(running)
    writer.write(request("/v1/models/adder/predict", orjson.dumps(ROW), version="1.0"))
    status, headers, body = await read_response(reader)
    assert (status, headers["connection"]) == (200, "close")
    assert orjson.loads(body)["sum"] == [2.0, 3.0, 4.0]
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    writer.close()


async def test_a_body_that_comes_in_pieces_is_gathered(running: RunningServer) -> None:
    reader, writer = await connect(running)
    whole = request("/v2/models/adder/infer", orjson.dumps(V2_ROW))
    for start in range(0, len(whole), 40):
        writer.write(whole[start : start + 40])
        await writer.drain()
        await asyncio.sleep(0.002)  # pieces that arrive apart (nothing waits on this)
    status, _, body = await read_response(reader)
    assert status == 200, body
    assert v2_outputs(body)["sum"] == [2.0, 3.0, 4.0]
    writer.close()


async def test_a_chunked_body_gets_the_same_answer(running: RunningServer) -> None:
    reader, writer = await connect(running)
    body = orjson.dumps(ROW)
    head = "POST /v1/models/adder/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    chunked = f"{head}Transfer-Encoding: chunked\r\n\r\n{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    writer.write(chunked)
    status, _, answer = await read_response(reader)
    assert status == 200, answer
    assert orjson.loads(answer)["sum"] == [2.0, 3.0, 4.0]
    writer.close()


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v2/models/adder/infer", b"{not json", 400, "invalid_request"),
        ("/v2/models/adder/infer", orjson.dumps({"inputs": [{"name": "a"}]}), 422, "schema_violation"),
        ("/v1/models/adder/predict", orjson.dumps({"a": [1.0, 2.0]}), 422, "schema_violation"),
        ("/v2/models/nope/infer", orjson.dumps(V2_ROW), 404, "model_not_found"),
        ("/v1/models/adder/predict", b"x" * 5000, 413, "payload_too_large"),
    ],
)
async def test_errors_are_answered_as_json_and_the_connection_lives_on(
    running: RunningServer, path: str, body: bytes, status: int, code: str
) -> None:
    reader, writer = await connect(running)
    writer.write(request(path, body, "X-Request-ID: bad-1"))
    got, headers, answer = await read_response(reader)
    assert (got, headers["x-request-id"], headers["content-type"]) == (status, "bad-1", "application/json")
    assert orjson.loads(answer)["code"] == code
    writer.write(request("/v1/models/adder/predict", orjson.dumps(ROW)))
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_a_client_that_goes_away_withdraws_its_rows(running: RunningServer) -> None:
    SLEEPER.started.clear()
    before = SLEEPER.calls
    blocker_reader, blocker = await connect(running)
    blocker.write(request("/v1/models/sleeper/predict", orjson.dumps({"seconds": 0.5})))
    await asyncio.to_thread(SLEEPER.started.wait, 5)
    _, impatient = await connect(running)
    impatient.write(request("/v1/models/sleeper/predict", orjson.dumps({"seconds": 0.0})))
    await impatient.drain()
    await until_queued(running, "sleeper", 1)  # queued behind the blocker
    impatient.close()
    assert (await read_response(blocker_reader))[0] == 200
    # A request sent now is answered after any batch that could still hold the withdrawn row.
    blocker.write(request("/v1/models/sleeper/predict", orjson.dumps({"seconds": 0.0})))
    assert (await read_response(blocker_reader))[0] == 200
    assert SLEEPER.calls == before + 2  # the blocker and the last one: the withdrawn row never reached the model
    blocker.close()


async def test_identical_requests_share_one_row_without_a_task_and_the_last_to_leave_withdraws_it(
    running: RunningServer,
) -> None:
    body = orjson.dumps({"seconds": 0.0})
    for leave in (True, False):
        SHARED.started.clear()
        before = SHARED.calls
        idle = await tasks_on(running)
        blocker_reader, blocker = await connect(running)  # the model's one batch slot is busy meanwhile
        blocker.write(request("/v1/models/shared-sleeper/predict", orjson.dumps({"seconds": 0.3})))
        await asyncio.to_thread(SHARED.started.wait, 5)
        clients = [await connect(running) for _ in range(3)]
        for _, writer in clients:
            writer.write(request("/v1/models/shared-sleeper/predict", body))
            await writer.drain()
        await until_queued(running, "shared-sleeper", 1)  # three identical requests: one row
        new = await tasks_on(running) - idle
        assert all(name.endswith(":Batcher._execute") for name in new), new  # joined at the parser: no task
        if leave:
            for _, writer in clients:
                writer.close()
        assert (await read_response(blocker_reader))[0] == 200
        if not leave:
            answers = [await read_response(reader) for reader, _ in clients]
            assert [status for status, _, _ in answers] == [200, 200, 200]
            for _, writer in clients:
                writer.close()
        blocker.write(request("/v1/models/shared-sleeper/predict", orjson.dumps({"seconds": 0.01})))
        assert (await read_response(blocker_reader))[0] == 200  # after any batch that could hold the shared row
        assert SHARED.calls == before + (2 if leave else 3)  # the shared row withdrawn, or run once
        blocker.close()


async def test_bytes_past_the_parse_budget_wait_their_turn_and_every_request_is_answered(
    running: RunningServer,
) -> None:
    reader, writer = await connect(running)  # a connection makes the server's budget
    writer.write(request("/v1/models/adder/predict", orjson.dumps(ROW)))
    assert (await read_response(reader))[0] == 200
    writer.close()
    budget = running.server.budget
    before, budget.budget_s = budget.deferred, 0.0  # every connection but the first of a turn waits

    async def client(n: int) -> list[list[float]]:
        reader, writer = await connect(running)
        sums = []
        for i in range(3):
            writer.write(request("/v1/models/adder/predict", orjson.dumps({"a": [n, i, 0], "b": [1, 1, 1]})))
            status, _, body = await read_response(reader)
            assert status == 200, body
            sums.append(orjson.loads(body)["sum"])
        writer.close()
        return sums

    try:
        answers = await asyncio.gather(*(client(n) for n in range(50)))
    finally:
        budget.budget_s = PARSE_BUDGET_S
    assert answers == [[[n + 1.0, i + 1.0, 1.0] for i in range(3)] for n in range(50)]
    assert budget.deferred > before


@contextlib.contextmanager
def parse_budget_of(running: RunningServer, budget_s: float) -> Iterator[ParseBudget]:
    budget = running.server.budget
    budget.budget_s = budget_s
    try:
        yield budget
    finally:
        budget.budget_s = PARSE_BUDGET_S


async def test_with_no_parse_budget_pipelined_requests_and_big_bodies_still_come_through_in_order(
    running: RunningServer,
) -> None:
    reader, writer = await connect(running)  # (the budget exists once a connection made it)
    with parse_budget_of(running, 0.0):
        big = b'{"a": [1.0, 2.0, 3.0],' + b" " * 3000 + b'"b": [1.0, 1.0, 1.0]}'  # under the 4096-byte limit
        slow = request("/v1/models/sleeper/predict", orjson.dumps({"seconds": 0.05}))
        writer.write(
            slow + request("/v1/models/adder/predict", big) + request("/v2/models/adder/infer", orjson.dumps(V2_ROW))
        )
        answers = [await read_response(reader) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 200], answers
    assert "pid" in orjson.loads(answers[0][2])
    assert orjson.loads(answers[1][2])["sum"] == [2.0, 3.0, 4.0]
    assert v2_outputs(answers[2][2])["sum"] == [2.0, 3.0, 4.0]
    writer.close()


async def test_a_connection_that_closes_while_its_bytes_wait_for_a_turn_harms_no_other(
    running: RunningServer,
) -> None:
    reader, writer = await connect(running)
    with parse_budget_of(running, 0.0):
        leaving = [await connect(running) for _ in range(20)]
        for _, w in leaving:
            w.write(request("/v1/models/adder/predict", orjson.dumps(ROW)))
            w.close()  # gone before, or while, its request waits for a turn
        writer.write(request("/v1/models/adder/predict", orjson.dumps(ROW)))
        status, _, body = await read_response(reader)
    assert (status, orjson.loads(body)["sum"]) == (200, [2.0, 3.0, 4.0])
    writer.close()


def stall(stalled: threading.Event, seconds: float) -> None:
    """Hold the server's event loop (spinning: a blocking call there is refused by the test suite)."""
    stalled.set()
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


def batches_run(metrics: bytes, model: str) -> float:
    prefix = f'asyncserve_batch_rows_count{{model="{model}"}}'.encode()
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix))


async def test_a_batch_waits_for_requests_already_received_that_the_loop_has_yet_to_parse(
    running: RunningServer,
) -> None:
    # With no parse budget the server parses one connection per turn: requests that are all in reach
    # the batcher turn after turn, and without waiting for them they would leave in small batches.
    clients = [await connect(running) for _ in range(16)]
    server_loop = running.loop
    try:
        async with running.client() as client:
            with parse_budget_of(running, 0.0):
                before = batches_run((await client.get("/metrics")).content, "patient")
                stalled = threading.Event()
                server_loop.call_soon_threadsafe(stall, stalled, 0.2)  # every request is in before one is read
                await asyncio.to_thread(stalled.wait, 5)
                for n, (_, writer) in enumerate(clients):
                    writer.write(request("/v1/models/patient/predict", orjson.dumps({"a": [n, 0, 0], "b": [1, 1, 1]})))
                answers = [await read_response(reader) for reader, _ in clients]
                after = batches_run((await client.get("/metrics")).content, "patient")
    finally:
        for _, writer in clients:
            writer.close()
    assert [orjson.loads(body)["sum"] for _, _, body in answers] == [[n + 1.0, 1.0, 1.0] for n in range(16)]
    assert after - before == 1, f"16 requests received together ran as {after - before:.0f} batches"


@contextlib.contextmanager
def keep_alive_timeout(running: RunningServer, seconds: float) -> Iterator[None]:
    """Connections made inside the block close after ``seconds`` idle (a connection reads it when accepted)."""
    server = running.server
    before = server.limits
    server.limits = dataclasses.replace(before, keep_alive_s=seconds)
    try:
        yield
    finally:
        server.limits = before


async def test_an_idle_connection_closes_after_the_keep_alive_timeout_and_a_busy_one_stays(
    running: RunningServer,
) -> None:
    # Held for the whole test: the server reads the timeout when it accepts a connection, which may
    # come after the client's connect() returns.
    with keep_alive_timeout(running, 0.3):
        idle_reader, idle_writer = await connect(running)
        busy_reader, busy_writer = await connect(running)
        try:
            idle_writer.write(request("/v1/models/adder/predict", orjson.dumps(ROW)))
            assert (await read_response(idle_reader))[0] == 200
            started = time.monotonic()
            # A request every 0.1 s for 0.9 s: never idle for 0.3 s, so never closed.
            for _ in range(9):
                busy_writer.write(request("/v1/models/adder/predict", orjson.dumps(ROW)))
                assert (await read_response(busy_reader))[0] == 200
                await asyncio.sleep(0.1)
            # A prediction that outlasts the timeout: the connection is busy, not idle.
            busy_writer.write(request("/v1/models/sleeper/predict", orjson.dumps({"seconds": 0.5})))
            assert (await read_response(busy_reader))[0] == 200
            assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # closed by the server, long since
            assert time.monotonic() - started > 0.3
            idle_at = time.monotonic()
            assert await asyncio.wait_for(busy_reader.read(), 5) == b""  # idle at last: closed 0.3 s later
            assert 0.2 < time.monotonic() - idle_at < 2.0
        finally:
            idle_writer.close()
            busy_writer.close()


async def test_a_client_that_reads_slowly_pauses_the_server_and_gets_every_answer_in_order(
    running: RunningServer,
) -> None:
    # 2,000 pipelined requests for a document of about 20 kB (40 MB of answers, more than the sockets'
    # buffers hold), sent while the client reads slowly: the server stops reading while its answers
    # wait, and resumes as the client reads, so every answer comes, in order.
    reader, writer = await connect(running)
    get = b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: %d\r\n\r\n"

    async def send() -> None:
        for n in range(2000):
            writer.write(get % n)
            await writer.drain()

    sending = asyncio.create_task(send())
    answers = []
    for _ in range(2000):
        answers.append(await read_response(reader))
        if len(answers) % 100 == 0:
            await asyncio.sleep(0.005)  # a slow reader (nothing waits on this)
    await sending
    assert [(status, int(headers["x-request-id"])) for status, headers, _ in answers] == [(200, n) for n in range(2000)]
    assert len({body for _, _, body in answers}) == 1
    writer.close()


@pytest.fixture(scope="module")
def answering_half_closed() -> Iterator[RunningServer]:
    with serve_in_thread(SERVICE, dataclasses.replace(SETTINGS, answer_half_closed=True)) as server:
        yield server


async def test_with_answer_half_closed_a_client_that_half_closes_gets_every_answer_then_eof(
    answering_half_closed: RunningServer,
) -> None:
    reader, writer = await connect(answering_half_closed)
    slow = request("/v1/models/sleeper/predict", orjson.dumps({"seconds": 0.2}))
    fast = request("/v1/models/adder/predict", orjson.dumps(ROW))
    writer.write(slow + fast)
    writer.write_eof()  # shutdown(SHUT_WR): sent all it will, still reads
    answers = [await read_response(reader) for _ in range(2)]
    assert [status for status, _, _ in answers] == [200, 200]
    assert orjson.loads(answers[1][2])["sum"] == [2.0, 3.0, 4.0]
    assert await asyncio.wait_for(reader.read(), 5) == b""  # then the server closes
    writer.close()


async def test_with_answer_half_closed_a_request_cut_short_by_the_end_of_stream_is_closed(
    answering_half_closed: RunningServer,
) -> None:
    reader, writer = await connect(answering_half_closed)
    writer.write(request("/v1/models/adder/predict", orjson.dumps(ROW))[:-5])  # the body cut short
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_by_default_a_client_that_half_closes_is_taken_as_gone(running: RunningServer) -> None:
    reader, writer = await connect(running)
    writer.write(request("/v1/models/sleeper/predict", orjson.dumps({"seconds": 0.2})))
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, its work withdrawn
    writer.close()
