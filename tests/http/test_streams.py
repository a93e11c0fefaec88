"""Streaming models through a real server: SSE, JSON Lines, the V2 generate extension, a slow reader, a client
that goes away, an error and the deadline in the middle of a stream, and a sync generator off the loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import orjson
import pytest

from asyncserve import ConfigurationError, Model, Service, Settings, Tensor
from asyncserve.app import App
from tests.conftest import RunningServer
from tests.models import Adder

Ints = npt.NDArray[np.int64]


class Counter(Model):
    """Yields i = 0 .. n-1, one part each, waiting ``pause`` between parts; fails at ``fail_at`` if set."""

    name = "counter"
    inputs = {"n": Tensor("INT64"), "pause": Tensor("FP64"), "fail_at": Tensor("INT64"), "pad": Tensor("INT64")}
    outputs = {"i": Tensor("INT64"), "padding": Tensor("BYTES")}

    def __init__(self) -> None:
        self.produced = 0
        self.closed = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def predict(self, n: Ints, pause: npt.NDArray[np.float64], fail_at: Ints, pad: Ints) -> Iterator[dict[str, Any]]:
        try:
            for i in range(int(n[0])):
                if i == int(fail_at[0]):
                    raise RuntimeError("the counter broke")
                self.gate.wait(5)
                time.sleep(float(pause[0]))  # a model computing (NumPy and the like let the GIL go meanwhile)
                self.produced += 1
                yield {"i": [i], "padding": ["x" * int(pad[0])]}
        finally:
            self.closed.set()


class Words(Model):
    """An async generator: the words of a text, one part each."""

    name = "words"
    inputs = {"text": Tensor("BYTES")}
    outputs = {"word": Tensor("BYTES")}
    max_batch_size = 1  # the words of one text

    async def predict(self, text: npt.NDArray[np.object_]) -> AsyncIterator[dict[str, Any]]:
        for word in str(text[0]).split():
            await asyncio.sleep(0)
            yield {"word": [word]}


COUNTER = Counter()
SERVICE = Service(COUNTER, Words(), Adder(), name="streams")
SETTINGS = Settings(executor_workers=2, jobs="", loop_lag_interval_s=0.01)


def counting(n: int, *, pause: float = 0.0, fail_at: int = -1, pad: int = 0) -> dict[str, Any]:
    return {"n": n, "pause": pause, "fail_at": fail_at, "pad": pad}


def events(text: str) -> list[tuple[str, str]]:
    """(event name, data) of each Server-Sent Event."""
    found = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        found.append((lines.get("event", "message"), lines["data"]))
    return found


async def test_parts_come_as_server_sent_events_json_lines_or_one_array(running: RunningServer) -> None:
    async with running.client() as client:
        sse = await client.post("/v1/models/counter/predict", json=counting(3), headers={"Accept": "text/event-stream"})
        lines = await client.post(
            "/v1/models/counter/predict", json=counting(3), headers={"Accept": "application/x-ndjson"}
        )
        whole = await client.post("/v1/models/counter/predict", json=counting(3))
    assert sse.headers["content-type"] == "text/event-stream"
    assert [(name, orjson.loads(data).get("i")) for name, data in events(sse.text)] == [
        ("message", 0), ("message", 1), ("message", 2), ("end", None),
    ]  # fmt: skip
    assert [orjson.loads(line)["i"] for line in lines.text.splitlines()] == [0, 1, 2]
    assert [part["i"] for part in whole.json()] == [0, 1, 2]


async def test_each_part_is_sent_as_soon_as_it_is_made(running: RunningServer) -> None:
    COUNTER.gate.clear()  # the model waits before each part
    async with running.client() as client:
        headers = {"Accept": "application/x-ndjson"}
        async with client.stream("POST", "/v1/models/counter/predict", json=counting(2), headers=headers) as answer:
            lines = answer.aiter_lines()
            COUNTER.gate.set()
            first = await anext(lines)
            assert orjson.loads(first)["i"] == 0
            assert orjson.loads(await anext(lines))["i"] == 1


async def test_an_async_generator_streams_on_the_loop(running: RunningServer) -> None:
    async with running.client() as client:
        answer = await client.post(
            "/v1/models/words/predict", json={"text": "every part in turn"}, headers={"Accept": "text/event-stream"}
        )
    words = [orjson.loads(data)["word"] for name, data in events(answer.text) if name == "message"]
    assert words == ["every", "part", "in", "turn"]


async def test_a_slow_reader_pauses_the_model(running: RunningServer) -> None:
    before = COUNTER.produced
    parts, pad = 4000, 16_000  # 64 MB if nothing held the model back
    async with running.client() as client:
        body = counting(parts, pad=pad)
        async with client.stream(
            "POST", "/v1/models/counter/predict", json=body, headers={"Accept": "application/x-ndjson"}
        ) as answer:
            lines = answer.aiter_lines()
            await anext(lines)
            await asyncio.sleep(0.5)  # not reading: the socket's buffers fill, then the model must wait
            produced_while_paused = COUNTER.produced - before
            count = 1 + sum([1 async for _ in lines])
    assert produced_while_paused < parts // 4, f"{produced_while_paused} parts were made for a reader that read one"
    assert count == parts


async def test_a_client_that_goes_away_stops_the_generator(running: RunningServer) -> None:
    COUNTER.closed.clear()
    async with running.client() as client:
        headers = {"Accept": "text/event-stream"}
        body = counting(1000, pause=0.01)
        async with client.stream("POST", "/v1/models/counter/predict", json=body, headers=headers) as answer:
            await anext(answer.aiter_lines())
        # Leaving the block closed the connection mid-stream.
        assert await asyncio.to_thread(COUNTER.closed.wait, 5), "the generator was not closed"
        gone = 'asyncserve_streams_total{end="client_gone",model="counter"}'
        async with asyncio.timeout(5):
            while gone not in (await client.get("/metrics")).text:  # noqa: ASYNC110 (a metric has no event)
                await asyncio.sleep(0.01)


async def test_an_error_in_the_middle_ends_the_stream_with_an_error_event(running: RunningServer) -> None:
    async with running.client() as client:
        sse = await client.post(
            "/v1/models/counter/predict", json=counting(5, fail_at=2), headers={"Accept": "text/event-stream"}
        )
        lines = await client.post(
            "/v1/models/counter/predict", json=counting(5, fail_at=2), headers={"Accept": "application/x-ndjson"}
        )
        whole = await client.post("/v1/models/counter/predict", json=counting(5, fail_at=2))
    got = events(sse.text)
    assert [name for name, _ in got] == ["message", "message", "error"]
    assert orjson.loads(got[-1][1])["code"] == "model_error"
    assert "the counter broke" not in got[-1][1]  # the traceback goes to the log, not the client
    assert orjson.loads(lines.text.splitlines()[-1])["code"] == "model_error"
    assert (whole.status_code, whole.json()["code"]) == (500, "model_error")


async def test_the_deadline_covers_the_whole_stream(running: RunningServer) -> None:
    headers = {"Accept": "text/event-stream", "X-Request-Timeout": "0.3"}
    async with running.client() as client:
        answer = await client.post("/v1/models/counter/predict", json=counting(100, pause=0.02), headers=headers)
    got = events(answer.text)
    assert got[-1][0] == "error"
    assert orjson.loads(got[-1][1])["code"] == "deadline_exceeded"
    assert 3 < len(got) < 100


async def test_a_sync_generator_leaves_the_loop_free(running: RunningServer) -> None:
    async with running.client() as client:
        body = counting(20, pause=0.05)  # a second of model work, in the executor
        streaming = asyncio.create_task(
            client.post("/v1/models/counter/predict", json=body, headers={"Accept": "text/event-stream"})
        )
        worst = 0.0
        async with httpx.AsyncClient(base_url=running.url) as prober:
            while not streaming.done():
                started = time.perf_counter()
                assert (await prober.get("/v2/health/live")).status_code == 200
                worst = max(worst, time.perf_counter() - started)
                await asyncio.sleep(0.01)
        assert len(events((await streaming).text)) == 21
    assert worst < 0.05, f"liveness took {worst * 1000:.0f} ms while a sync generator streamed"


async def test_the_v2_generate_extension(running: RunningServer) -> None:
    async with running.client() as client:
        last = await client.post("/v2/models/words/generate", json={"text": "one two three", "parameters": {}})
        stream = await client.post("/v2/models/words/generate_stream", json={"text": "one two three"})
        plain = await client.post("/v2/models/adder/generate", json={"a": [1, 2, 3], "b": [1, 1, 1]})
        plain_stream = await client.post("/v2/models/adder/generate_stream", json={"a": [1, 2, 3], "b": [1, 1, 1]})
        bad = await client.post("/v2/models/words/generate", json={"wrong": 1})
    assert last.json() == {"model_name": "words", "model_version": "", "word": "three"}
    assert [orjson.loads(data)["word"] for _, data in events(stream.text)] == ["one", "two", "three"]
    assert plain.json()["sum"] == [2.0, 3.0, 4.0]
    assert [orjson.loads(data)["sum"] for _, data in events(plain_stream.text)] == [[2.0, 3.0, 4.0]]
    assert bad.status_code in (400, 422)


def test_a_plain_generator_cannot_stream_from_worker_processes() -> None:
    with pytest.raises(ConfigurationError, match="use --executor thread, or make its predict an async generator"):
        App(Service(Counter(), name="procs"), Settings(executor="process", executor_workers=1, jobs=""))


async def test_routes_that_cannot_stream_say_where_to_go(running: RunningServer) -> None:
    v2 = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a b"]}]}
    async with running.client() as client:
        infer = await client.post("/v2/models/words/infer", json=v2)
        headers = [(b"X-Priority", "\u00b2".encode("latin-1"))]
        priority = await client.post("/v1/models/adder/predict", json={"a": [1, 2, 3], "b": [1, 1, 1]}, headers=headers)
    assert (infer.status_code, infer.json()["code"]) == (400, "invalid_request")
    assert "generate_stream" in infer.json()["error"]
    assert priority.status_code == 422  # a superscript two is no priority (it was a 500)


async def test_a_stream_of_one_row_per_call_refuses_several_rows(running: RunningServer) -> None:
    async with running.client() as client:
        response = await client.post("/v1/models/words/predict", json=[{"text": "a b"}, {"text": "c"}])
    assert response.status_code == 400
    assert response.json()["error"] == (
        "the request has 2 rows but model 'words' streams the answer to at most 1 per call; send one request per row"
    )
