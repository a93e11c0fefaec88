"""The Python client through a real server: every method against the endpoint it wraps, with the AsyncClient and
the Client alike; retries on 503 (and none on 400 or 500), deadlines, idempotent submissions, errors as classes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from aiohttp import ClientSession, web

import asyncserve
from asyncserve import (
    AsyncClient,
    AsyncServeError,
    Client,
    DeadlineExceeded,
    InvalidRequest,
    Model,
    ModelError,
    ModelNotFound,
    SchemaViolation,
    Service,
    Settings,
    Tensor,
)
from asyncserve.client.events import Event, EventParser
from asyncserve.exceptions import NotFound, Overloaded, ShuttingDown, Unauthorized, Unavailable
from asyncserve.http.auth import new_key, with_limits
from asyncserve.http.inference import InferenceRoutes
from asyncserve.http.routing import Request
from asyncserve.runtime.registry import ModelEntry
from tests.conftest import RunningServer, serving
from tests.models import DATATYPE_SAMPLES, AdderV1, AdderV2, AllTypes, Faulty

Array = npt.NDArray[Any]
REPO = Path(__file__).parent.parent


class Ticks(Model):
    """Streams i = 0 .. n-1, one part each; fails at ``fail_at``; counts its parts and says when it was closed."""

    name = "ticks"
    inputs = {"n": Tensor("INT64"), "fail_at": Tensor("INT64")}
    outputs = {"i": Tensor("INT64")}

    def __init__(self) -> None:
        self.produced = 0
        self.closed = threading.Event()

    def predict(self, n: Array, fail_at: Array) -> Iterator[dict[str, Any]]:
        try:
            for i in range(int(n[0])):
                if i == int(fail_at[0]):
                    raise RuntimeError("the ticks broke")
                self.produced += 1
                yield {"i": [i]}
        finally:
            self.closed.set()


class Gate(Model):
    """Answers its input once ``opened`` is set (at most 10 s): a model kept busy for as long as a test needs."""

    name = "gate"
    inputs = {"x": Tensor("INT64")}
    outputs = {"x": Tensor("INT64")}
    max_batch_size = 1

    def __init__(self) -> None:
        self.opened = threading.Event()

    def predict(self, x: Array) -> Array:
        self.opened.wait(10)
        return x


class Tally(Model):
    """Counts the rows it predicted: whether a lazy handle ran the model, and when."""

    name = "tally"
    inputs = {"x": Tensor("INT64")}
    outputs = {"double": Tensor("INT64")}

    def __init__(self) -> None:
        self.rows = 0

    def predict(self, x: Array) -> Array:
        self.rows += len(x)
        return x * 2


TICKS, GATE, TALLY = Ticks(), Gate(), Tally()
SERVICE = Service(AdderV1(), AdderV2(), AllTypes(), Faulty(), TICKS, GATE, TALLY, name="client")
SETTINGS = Settings(executor_workers=4, jobs="memory://", loop_lag_interval_s=0.01)

ROW = {"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0]}
ANSWER = {"sum": [6.0, 8.0, 10.0], "total": 24.0}
"""What the highest version of ``adder`` (2: a + b + 1) answers to ``ROW``."""


# --- one test, both clients ------------------------------------------------------------------------------


class Api:
    """The AsyncClient awaited, or the Client called from a thread: each test drives both the same way."""

    def __init__(self, client: AsyncClient | Client) -> None:
        self.client = client

    @property
    def kind(self) -> str:
        return type(self.client).__name__

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.client, AsyncClient):
            return await getattr(self.client, method)(*args, **kwargs)
        return await asyncio.to_thread(getattr(self.client, method), *args, **kwargs)

    async def items(
        self, method: str, *args: Any, first: int | None = None, into: list[Any] | None = None, **kwargs: Any
    ) -> list[Any]:
        """Every item of ``stream`` or ``events`` (only the ``first`` ones, then the stream is closed), each
        appended to ``into`` as it comes (what came before an error stays there)."""
        taken = [] if into is None else into
        if isinstance(self.client, AsyncClient):
            async with contextlib.aclosing(getattr(self.client, method)(*args, **kwargs)) as stream:
                async for item in stream:
                    taken.append(item)
                    if len(taken) == first:
                        break
            return taken
        return await asyncio.to_thread(_take, getattr(self.client, method)(*args, **kwargs), first, taken)

    async def lazy(self, model: str, rows: Any) -> tuple[Any, Callable[[], Any]]:
        """The handle, and how to read it (``await handle``, or ``handle.result()``)."""
        if isinstance(self.client, AsyncClient):
            handle = await self.client.lazy(model, rows)
            return handle, lambda: handle
        blocking = await asyncio.to_thread(self.client.lazy, model, rows)
        return blocking, lambda: asyncio.to_thread(blocking.result)

    async def aclose(self) -> None:
        if isinstance(self.client, AsyncClient):
            await self.client.aclose()
        else:
            await asyncio.to_thread(self.client.close)


def _take(stream: Generator[Any, None, None], first: int | None, taken: list[Any]) -> list[Any]:
    with contextlib.closing(stream):
        for item in stream:
            taken.append(item)
            if len(taken) == first:
                break
    return taken


@contextlib.asynccontextmanager
async def api_for(kind: str, url: str, **options: Any) -> AsyncIterator[Api]:
    made = AsyncClient(url, **options) if kind == "AsyncClient" else Client(url, **options)
    api = Api(made)
    try:
        yield api
    finally:
        await api.aclose()


KINDS = ["AsyncClient", "Client"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def api(kind: str, running: RunningServer) -> AsyncIterator[Api]:
    async with api_for(kind, running.url) as made:
        yield made


@pytest.fixture
def gate() -> Iterator[Gate]:
    """The gate model, closed for the test and opened after it (freeing its executor thread)."""
    GATE.opened.clear()
    yield GATE
    GATE.opened.set()


class Admissions:
    """Wraps the server's admission of inference requests: counts them, and refuses the first ``refuse`` (503)."""

    def __init__(self, inference: InferenceRoutes, refuse: int, error: Unavailable) -> None:
        self.admit = inference.admit
        self.refuse = refuse
        self.error = error
        self.calls = 0

    def __call__(self, request: Request) -> tuple[ModelEntry, float]:
        self.calls += 1
        if self.calls <= self.refuse:
            raise self.error
        return self.admit(request)


def admissions(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch, refuse: int = 0, error: Unavailable | None = None
) -> Admissions:
    inference = running.app.http.inference
    counted = Admissions(inference, refuse, error or ShuttingDown("the server is shutting down (a test says so)"))
    monkeypatch.setattr(inference, "admit", counted)
    return counted


def answered(running: RunningServer, route: str, model: str, status: int) -> float:
    """How many requests the server answered on ``route`` for ``model`` with ``status`` (its metrics)."""
    return running.app.metrics.requests.labels(route, model, str(status)).value


# --- importing -----------------------------------------------------------------------------------------


def test_importing_asyncserve_leaves_aiohttp_out_until_a_client_is_asked_for() -> None:
    code = (
        "import sys, asyncserve; before = 'aiohttp' in sys.modules; asyncserve.AsyncClient; "
        "print(before, 'aiohttp' in sys.modules, asyncserve.Client.__name__, 'AsyncClient' in asyncserve.__all__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.split() == ["False", "True", "Client", "True"]


def test_without_aiohttp_the_error_names_the_extra_to_install() -> None:
    code = "import sys; sys.modules['aiohttp'] = None; import asyncserve; asyncserve.Client"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=REPO)
    assert result.returncode == 1
    assert "ImportError: asyncserve's client needs aiohttp" in result.stderr
    assert "pip install 'asyncserve[client]'" in result.stderr


def test_other_names_are_still_missing_attributes() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Clients'"):
        asyncserve.Clients  # noqa: B018


# --- the JSON API --------------------------------------------------------------------------------------


async def test_predict_answers_a_row_with_an_object_and_rows_with_a_list(api: Api) -> None:
    assert await api("predict", "adder", ROW) == ANSWER
    assert await api("predict", "adder", [ROW, ROW]) == [ANSWER, ANSWER]


async def test_predict_sends_the_priority(api: Api) -> None:
    assert await api("predict", "adder", ROW, priority=9) == ANSWER
    with pytest.raises(SchemaViolation, match="X-Priority") as raised:
        await api("predict", "adder", ROW, priority=10)
    assert (raised.value.code, raised.value.status_code, raised.value.path) == ("schema_violation", 422, "X-Priority")


async def test_numpy_values_in_rows_are_sent_as_lists(api: Api) -> None:
    row = {"a": np.array([1.0, 2.0, 3.0], np.float32), "b": np.array([4.0, 5.0, 6.0])}
    assert await api("predict", "adder", row) == ANSWER


async def test_errors_come_back_as_their_classes_with_the_servers_message_and_code(api: Api) -> None:
    with pytest.raises(ModelNotFound, match="unknown model 'nope'") as not_found:
        await api("predict", "nope", ROW)
    with pytest.raises(InvalidRequest, match="no input 'c'") as invalid:
        await api("infer", "adder", {"c": np.ones((1, 3), np.float32)})
    with pytest.raises(ModelError, match="model 'faulty' failed") as failed:
        await api("predict", "faulty", {"fail": True})
    assert (not_found.value.code, not_found.value.status_code) == ("model_not_found", 404)
    assert isinstance(not_found.value, NotFound)
    assert (invalid.value.code, invalid.value.status_code) == ("invalid_request", 400)
    assert (failed.value.code, failed.value.status_code) == ("model_error", 500)
    assert "secret" not in failed.value.message


# --- the Open Inference Protocol -----------------------------------------------------------------------


def _every_datatype() -> dict[str, Array]:
    arrays: dict[str, Array] = {}
    for datatype, values in DATATYPE_SAMPLES.items():
        dtype = object if datatype == "BYTES" else Tensor(datatype).dtype.numpy_dtype
        arrays[f"in_{datatype.lower()}"] = np.array(values, dtype=dtype)
    return arrays


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
async def test_infer_round_trips_every_datatype(api: Api, binary: bool) -> None:
    sent = _every_datatype()
    outputs = await api("infer", "all_types", sent, binary=binary)
    assert set(outputs) == {name.replace("in_", "out_") for name in sent}
    for name, array in sent.items():
        back = outputs[name.replace("in_", "out_")]
        assert back.dtype == array.dtype, name
        assert back.tolist() == array.tolist(), name


async def test_binary_bytes_that_are_not_text_come_back_as_bytes(api: Api) -> None:
    sent = {**_every_datatype(), "in_bytes": np.array([b"\xff\x00", b"ok"], dtype=object)}
    with pytest.raises(InvalidRequest, match="not valid UTF-8"):  # the model takes text: refused, as bytes
        await api("infer", "all_types", sent)
    with pytest.raises(ValueError, match="send it with binary=True"):
        await api("infer", "all_types", sent, binary=False)


async def test_infer_takes_a_version_asks_for_outputs_and_keeps_shapes(api: Api) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.ones((2, 3), dtype=np.float32)
    first = await api("infer", "adder", {"a": a, "b": b}, version="1")
    latest = await api("infer", "adder", {"a": a, "b": b}, outputs=["total"], binary=False)
    np.testing.assert_array_equal(first["sum"], a + b)
    assert (first["sum"].dtype, first["total"].dtype) == (np.float32, np.float64)
    assert list(latest) == ["total"]
    np.testing.assert_array_equal(latest["total"], (a + b + 1).sum(axis=1))


async def test_an_array_without_a_v2_datatype_is_refused_before_sending(api: Api) -> None:
    with pytest.raises(TypeError, match=r"input 'a'.*astype"):
        await api("infer", "adder", {"a": np.ones((1, 3), np.complex64), "b": np.ones((1, 3), np.float32)})


# --- deadlines and retries -----------------------------------------------------------------------------


async def test_the_deadline_travels_as_x_request_timeout_and_a_504_is_deadline_exceeded(
    api: Api, gate: Gate, running: RunningServer
) -> None:
    before = answered(running, "v1_predict", "gate", 504)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as raised:
        await api("predict", "gate", {"x": 1}, deadline_s=0.2)
    assert time.monotonic() - started < 5  # the server's 504 at 0.2 s, not the client's timeout
    assert (raised.value.code, raised.value.status_code) == ("deadline_exceeded", 504)
    assert answered(running, "v1_predict", "gate", 504) == before + 1


async def test_a_503_is_retried_after_its_retry_after(
    kind: str, running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = admissions(running, monkeypatch, refuse=1)
    refused = answered(running, "v1_predict", "adder", 503)
    async with api_for(kind, running.url, retries=2) as api:
        started = time.monotonic()
        assert await api("predict", "adder", ROW) == ANSWER
    assert time.monotonic() - started >= 1.0  # Retry-After: 1
    assert counted.calls == 2
    assert answered(running, "v1_predict", "adder", 503) == refused + 1


async def test_when_the_retries_run_out_the_503_is_raised_as_its_class(
    kind: str, running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = admissions(running, monkeypatch, refuse=10, error=Overloaded("the queue is full (a test says so)"))
    async with api_for(kind, running.url, retries=1) as api:
        with pytest.raises(Overloaded, match="the queue is full") as raised:
            await api("infer", "adder", {"a": np.ones((1, 3), np.float32), "b": np.ones((1, 3), np.float32)})
    assert counted.calls == 2
    assert (raised.value.code, raised.value.status_code, raised.value.retry_after_s) == ("overloaded", 503, 1.0)


async def test_no_retry_starts_after_the_deadline(
    kind: str, running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = admissions(running, monkeypatch, refuse=10)
    async with api_for(kind, running.url, retries=3) as api:
        with pytest.raises(ShuttingDown):
            await api("predict", "adder", ROW, deadline_s=0.5)  # Retry-After: 1 would end past it
    assert counted.calls == 1


async def test_a_400_or_a_500_is_never_retried(
    kind: str, running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = admissions(running, monkeypatch)
    async with api_for(kind, running.url, retries=3) as api:
        with pytest.raises(InvalidRequest):
            await api("predict", "adder", {"a": [1.0]})
        assert counted.calls == 1
        with pytest.raises(ModelError):
            await api("predict", "faulty", {"fail": True})
        assert counted.calls == 2


async def test_a_429_is_retried_after_its_retry_after(kind: str) -> None:
    key, known = new_key("slow", ["infer"])
    settings = Settings(
        executor_workers=1, jobs="", api_keys=with_limits(known, rate_per_s=1, burst=1, concurrency=None).line()
    )
    async with serving(Service(AdderV2(), name="rate"), settings) as running:
        async with api_for(kind, running.url, api_key=key, retries=2) as api:
            assert await api("predict", "adder", ROW) == ANSWER
            started = time.monotonic()
            assert await api("predict", "adder", ROW) == ANSWER  # over the rate: 429, Retry-After: 1
        assert time.monotonic() - started >= 0.9
        assert answered(running, "v1_predict", "adder", 429) == 1


class Refusing:
    """A proxy that answers the first ``refuse`` requests 503 (``Retry-After: 0``), as a server starting up
    does, then forwards to the server."""

    def __init__(self, upstream: str, refuse: int) -> None:
        self.upstream, self.refuse, self.seen = upstream, refuse, 0
        self.session: ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.seen += 1
        if self.seen <= self.refuse:
            refusal = {"error": "the server is starting (a test says so)", "code": "shutting_down"}
            return web.json_response(refusal, status=503, headers={"Retry-After": "0"})
        assert self.session is not None
        async with self.session.request(request.method, self.upstream + request.path_qs) as answer:
            return web.Response(status=answer.status, body=await answer.read(), content_type="application/json")


@contextlib.asynccontextmanager
async def refusing(upstream: str, refuse: int) -> AsyncIterator[tuple[Refusing, str]]:
    proxy = Refusing(upstream, refuse)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    async with ClientSession() as proxy.session:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            host, port = runner.addresses[0][:2]
            yield proxy, f"http://{host}:{port}"
        finally:
            await runner.cleanup()


async def test_a_retry_budget_retries_past_the_count_until_the_server_answers(
    kind: str, running: RunningServer
) -> None:
    async with refusing(running.url, refuse=4) as (proxy, url):
        async with api_for(kind, url, retries=0, retry_budget_s=10) as api:
            assert (await api("model_metadata", "adder"))["name"] == "adder"
        assert proxy.seen == 5
        async with api_for(kind, url, retries=0) as counted:
            proxy.seen, proxy.refuse = 0, 1
            with pytest.raises(ShuttingDown, match="starting"):
                await counted("model_metadata", "adder")
        assert proxy.seen == 1, "without a budget, retries=0 sends once"


async def test_a_retry_budget_gives_up_once_spent(kind: str, running: RunningServer) -> None:
    async with refusing(running.url, refuse=1000) as (proxy, url), api_for(kind, url, retry_budget_s=0.5) as api:
        started = time.monotonic()
        with pytest.raises(ShuttingDown):
            await api("get", "0" * 32)
        assert 0.5 <= time.monotonic() - started < 3
        assert proxy.seen >= 3


async def test_a_server_unreachable_for_longer_than_the_retry_budget_is_a_connection_error(kind: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with api_for(kind, url, retries=0, retry_budget_s=0.4) as api:
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="could not connect"):
            await api("model_metadata", "adder")
    assert 0.4 <= time.monotonic() - started < 3, "the last retry falls at the budget's end"


async def test_a_server_that_cannot_be_reached_is_a_connection_error(kind: str) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago, and that nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with api_for(kind, url, retries=1) as api:
        with pytest.raises(ConnectionError, match="could not connect"):
            await api("predict", "adder", ROW)


# --- streaming -----------------------------------------------------------------------------------------


async def test_stream_yields_each_part(api: Api) -> None:
    assert await api.items("stream", "ticks", {"n": 3, "fail_at": -1}) == [{"i": 0}, {"i": 1}, {"i": 2}]


async def test_an_error_in_the_middle_of_a_stream_is_raised_as_its_class(api: Api) -> None:
    parts: list[Any] = []
    with pytest.raises(ModelError, match="failed while streaming") as raised:
        await api.items("stream", "ticks", {"n": 5, "fail_at": 2}, into=parts)
    assert parts == [{"i": 0}, {"i": 1}]
    assert raised.value.code == "model_error"


async def test_leaving_a_stream_early_stops_the_model(api: Api) -> None:
    TICKS.closed.clear()
    n = 1_000_000
    assert await api.items("stream", "ticks", {"n": n, "fail_at": -1}, first=2) == [{"i": 0}, {"i": 1}]
    assert await asyncio.to_thread(TICKS.closed.wait, 10)
    assert TICKS.produced < n


async def test_a_model_that_does_not_stream_answers_one_part(api: Api) -> None:
    assert await api.items("stream", "adder", ROW) == [ANSWER]


# --- lazy predictions ----------------------------------------------------------------------------------


async def test_a_lazy_handle_runs_the_model_only_when_read(api: Api) -> None:
    before = TALLY.rows
    handle, read = await api.lazy("tally", {"x": 21})
    assert re.fullmatch(r"/v1/predictions/\S+", handle.url)
    assert handle.expires_in_s > 0
    assert TALLY.rows == before  # made, checked, not computed
    assert await read() == {"double": 42}
    assert await read() == {"double": 42}
    assert TALLY.rows == before + 1


async def test_a_lazy_handle_is_checked_when_made(api: Api) -> None:
    with pytest.raises(ModelNotFound):
        await api.lazy("nope", {"x": 1})


# --- jobs ----------------------------------------------------------------------------------------------


async def test_submit_then_wait_for_the_result(api: Api) -> None:
    job = await api("submit", "adder", ROW, priority=5)
    assert job["status"] in ("queued", "running", "succeeded")
    assert job["priority"] == 5
    done = await api("wait", job["id"], timeout_s=10)
    assert (done["status"], done["result"]) == ("succeeded", ANSWER)
    assert (await api("get", job["id"]))["result"] == ANSWER


async def test_submit_sets_an_idempotency_key_and_a_given_one_returns_the_same_job(api: Api) -> None:
    made = await api("submit", "adder", ROW)
    assert re.fullmatch(r"[0-9a-f]{32}", made["idempotency_key"])
    first = await api("submit", "adder", ROW, idempotency_key=f"order-17-{api.kind}")
    again = await api("submit", "adder", ROW, idempotency_key=f"order-17-{api.kind}")
    assert again["id"] == first["id"] != made["id"]


async def test_submit_many_makes_one_job_per_input(api: Api) -> None:
    jobs = await api("submit_many", "adder", [ROW, [ROW, ROW]], version="1")
    assert len({job["id"] for job in jobs}) == 2
    done = [await api("wait", job["id"], timeout_s=10) for job in jobs]
    assert [job["version"] for job in done] == ["1", "1"]
    assert done[1]["result"] == [{"sum": [5.0, 7.0, 9.0], "total": 21.0}] * 2


async def test_submit_many_takes_the_callers_keys_and_max_attempts(api: Api) -> None:
    keys = [f"run-{api.kind}:1", f"run-{api.kind}:2"]
    rows = [{"fail": True}, {"fail": False}]
    jobs = await api("submit_many", "faulty", rows, max_attempts=1, idempotency_keys=keys)
    again = await api("submit_many", "faulty", rows, max_attempts=1, idempotency_keys=keys)
    assert [job["id"] for job in again] == [job["id"] for job in jobs], "a key seen before gives the job it made"
    failed, succeeded = [await api("wait", job["id"], timeout_s=10) for job in jobs]
    assert [failed["idempotency_key"], succeeded["idempotency_key"]] == keys
    assert (failed["status"], failed["attempts"], failed["max_attempts"]) == ("failed", 1, 1)
    assert (succeeded["status"], succeeded["result"]) == ("succeeded", {"ok": True})
    with pytest.raises(ValueError, match="one key per input: 1 keys for 2 inputs"):
        await api("submit_many", "faulty", rows, idempotency_keys=["only-one"])


async def test_submit_passes_max_attempts(api: Api) -> None:
    job = await api("submit", "faulty", {"fail": True}, max_attempts=2)
    done = await api("wait", job["id"], timeout_s=20)
    assert (done["status"], done["attempts"], done["max_attempts"]) == ("failed", 2, 2)


async def test_model_metadata_describes_a_model_and_an_unknown_one_is_not_found(api: Api) -> None:
    latest = await api("model_metadata", "adder")
    first = await api("model_metadata", "adder", version="1")
    assert latest["name"] == first["name"] == "adder"
    assert (latest["versions"], first["versions"]) == (["2"], ["1"])
    assert [tensor["name"] for tensor in first["inputs"]] == ["a", "b"]
    with pytest.raises(ModelNotFound, match="nope"):
        await api("model_metadata", "nope")
    with pytest.raises(ModelNotFound):
        await api("model_metadata", "adder", version="9")


async def test_events_follow_a_job_until_it_is_final(api: Api, gate: Gate) -> None:
    job = await api("submit", "gate", {"x": 7})
    following = asyncio.ensure_future(api.items("events", job["id"]))
    gate.opened.set()
    statuses = [event["status"] for event in await following]
    assert statuses[-1] == "succeeded"
    assert set(statuses) <= {"queued", "running", "succeeded"}
    assert [event["status"] for event in await api.items("events", job["id"])] == ["succeeded"]


async def test_wait_gives_up_after_its_timeout_and_cancel_cancels(api: Api, gate: Gate) -> None:
    job = await api("submit", "gate", {"x": 7})
    with pytest.raises(
        TimeoutError, match=rf"job {job['id']} was not final within 0.2 s \(last seen (queued|running)\)"
    ):
        await api("wait", job["id"], timeout_s=0.2)
    assert (await api("cancel", job["id"]))["status"] == "cancelled"
    assert (await api("wait", job["id"], timeout_s=5))["status"] == "cancelled"


async def test_an_unknown_job_is_not_found(api: Api) -> None:
    with pytest.raises(NotFound, match="no job"):
        await api("get", "0" * 32)


# --- through a proxy: a lost answer, and answers asyncserve never gives -----------------------------------


class LossyProxy:
    """Forwards every request to the server, but answers the first job submission 503 after the server took it:
    the client never hears that its job was made. Also answers codes and bodies no asyncserve server sends."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.submissions: list[tuple[str | None, int, dict[str, Any]]] = []
        self.session: ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/v1/models/teapot/predict":
            return web.json_response({"error": "short and stout", "code": "teapot"}, status=418)
        if request.path == "/v1/models/gateway/predict":
            return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")
        status, body = await self.forward(request)
        if (request.method, request.path) == ("POST", "/v1/jobs"):
            self.submissions.append((request.headers.get("Idempotency-Key"), status, orjson.loads(body)))
            if len(self.submissions) == 1:
                lost = {"error": "the answer was lost on the way", "code": "unavailable"}
                return web.json_response(lost, status=503, headers={"Retry-After": "0"})
        return web.Response(status=status, body=body, content_type="application/json")

    async def forward(self, request: web.Request) -> tuple[int, bytes]:
        assert self.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        url = self.upstream + request.path_qs
        async with self.session.request(request.method, url, data=await request.read(), headers=headers) as answer:
            return answer.status, await answer.read()


@contextlib.asynccontextmanager
async def lossy_proxy(upstream: str) -> AsyncIterator[tuple[LossyProxy, str]]:
    proxy = LossyProxy(upstream)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    async with ClientSession() as proxy.session:
        await site.start()
        try:
            host, port = runner.addresses[0][:2]
            yield proxy, f"http://{host}:{port}"
        finally:
            await runner.cleanup()


async def test_a_submission_retried_after_its_answer_was_lost_makes_one_job(kind: str, running: RunningServer) -> None:
    async with lossy_proxy(running.url) as (proxy, url), api_for(kind, url, retries=2) as api:
        job = await api("submit", "adder", ROW)
    (key, status, made), (key_again, status_again, found) = proxy.submissions
    assert (status, status_again) == (202, 200)  # made, then found by its key
    assert key == key_again == job["idempotency_key"]
    assert job["id"] == made["id"] == found["id"]


async def test_a_code_no_class_declares_keeps_its_code_and_status(kind: str, running: RunningServer) -> None:
    async with lossy_proxy(running.url) as (_, url), api_for(kind, url, retries=3) as api:
        with pytest.raises(AsyncServeError) as teapot:
            await api("predict", "teapot", ROW)
        with pytest.raises(AsyncServeError) as gateway:
            await api("predict", "gateway", ROW)
    assert type(teapot.value) is AsyncServeError
    assert (teapot.value.message, teapot.value.code, teapot.value.status_code) == ("short and stout", "teapot", 418)
    assert (gateway.value.code, gateway.value.status_code) == ("http_502", 502)
    assert "bad gateway" in gateway.value.message


# --- API keys, lifecycle, the exception lookup ---------------------------------------------------------


async def test_the_api_key_is_sent_as_a_bearer_token(kind: str) -> None:
    key, known = new_key("client", ["infer"])
    settings = Settings(executor_workers=1, jobs="", api_keys=known.line())
    async with serving(Service(AdderV2(), name="keys"), settings) as running:
        async with api_for(kind, running.url, api_key=key) as api:
            assert await api("predict", "adder", ROW) == ANSWER
        async with api_for(kind, running.url) as anonymous:
            with pytest.raises(Unauthorized) as raised:
                await anonymous("predict", "adder", ROW)
    assert (raised.value.code, raised.value.status_code) == ("unauthorized", 401)


async def test_a_closed_client_refuses_to_send(kind: str, running: RunningServer) -> None:
    async with api_for(kind, running.url) as api:
        pass
    with pytest.raises(RuntimeError, match="is closed"):
        await api("predict", "adder", ROW)


def test_arguments_are_checked_when_the_client_is_made() -> None:
    with pytest.raises(ValueError, match="retries must be an integer >= 0, got -1"):
        AsyncClient("http://localhost:8000", retries=-1)
    with pytest.raises(ValueError, match="base_url must start with http:// or https://"):
        AsyncClient("localhost:8000")


def test_events_are_read_from_chunks_cut_anywhere() -> None:
    text = b'event: queued\r\ndata: {"a":\ndata: 1}\r\n\n: a comment\nid: 7\ndata: [2]\n\nevent: end\ndata: {}\n\n'
    for size in (1, 2, 5, len(text)):
        parser = EventParser()
        events = [event for start in range(0, len(text), size) for event in parser.feed(text[start : start + size])]
        assert events == [Event("queued", '{"a":\n1}'), Event("message", "[2]"), Event("end", "{}")], size


def test_each_code_names_its_class() -> None:
    assert AsyncServeError.for_code("overloaded") is Overloaded
    assert AsyncServeError.for_code("deadline_exceeded") is DeadlineExceeded
    assert AsyncServeError.for_code("model_not_found") is ModelNotFound
    assert AsyncServeError.for_code("internal") is AsyncServeError
    assert AsyncServeError.for_code("no_such_code") is AsyncServeError


# --- the README ----------------------------------------------------------------------------------------


README = (REPO / "README.md").read_text()


def _readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


async def test_the_readme_client_examples_run_and_answer_what_they_say() -> None:
    models: dict[str, Any] = {}
    for marker in ("class Scaler", "class Countdown"):
        module = types.ModuleType("readme")
        exec(compile(next(b for b in _readme_blocks() if marker in b), "README.md", "exec"), module.__dict__)
        models.update({name: value for name, value in module.__dict__.items() if name in ("Scaler", "Countdown")})
    # (the gRPC block, run by tests/grpc/test_readme_grpc.py, is tritonclient's)
    client_blocks = [block for block in _readme_blocks() if "Client(" in block and "tritonclient" not in block]
    assert len(client_blocks) == 2
    ran: list[dict[str, Any]] = []
    async with serving(Service(models["Scaler"](), models["Countdown"](), name="readme")) as running:
        for block in client_blocks:
            ran.append({})
            code = compile(block.replace("http://localhost:8000", running.url), "README.md", "exec")
            await asyncio.to_thread(exec, code, ran[-1])
    blocking, asynchronous = ran
    assert blocking["answer"] == asynchronous["answer"] == {"y": [1.0, 20.0, 300.0]}
    np.testing.assert_array_equal(blocking["outputs"]["y"], np.array([[1.0, 20.0, 300.0]], np.float32))
    assert (blocking["job"]["status"], blocking["job"]["result"]) == ("succeeded", blocking["answer"])
    assert blocking["parts"] == [{"left": 3}, {"left": 2}, {"left": 1}, {"left": 0}]
    assert blocking["handle"].url.startswith("/v1/predictions/")
