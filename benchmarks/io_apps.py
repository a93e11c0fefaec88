"""The baselines of the I/O benchmark: the bare-ASGI ceiling (httpx or aiohttp) and a synchronous FastAPI service.

Each answers ``POST /v1/models/score/predict`` with ``{"user_id": N}`` by doing what asyncserve's
``benchmarks.io_models`` services do: fetch the user's row from the feature service
(``GET {IO_FEATURE_URL}/users/N``, which answers after 50 ms), score it with the small logistic
model ``predict_proba`` (the very function asyncserve's model calls), log the prediction as one JSON
line, and answer ``{"probability": p}``. They also answer ``GET /v2/health/ready``.

- ``bare_httpx`` and ``bare_aiohttp``: a hand-written ASGI app with one pooled async client (256
  connections) opened at start-up; the record is encoded on the loop and a background task writes
  the buffered lines to ``IO_LOG_PATH`` in a worker thread (500 lines or 1 s, whichever comes first,
  like asyncserve's prediction logger). ``uvicorn benchmarks.io_apps:bare_aiohttp``.
- ``fastapi_app``: the usual synchronous service, a factory (``uvicorn --factory
  benchmarks.io_apps:fastapi_app``): a ``def`` endpoint with pydantic request and response models,
  a blocking ``requests.Session`` per thread and a buffered file append under a lock; FastAPI runs
  the endpoint in its thread pool (AnyIO's default of 40 threads).

Environment: ``IO_FEATURE_URL`` (like ``http://127.0.0.1:8123``), ``IO_LOG_PATH`` (the JSONL file;
empty keeps the lines in memory and drops them).
"""

# FastAPI, pydantic, aiohttp and requests are benchmark requirements (requirements-io.txt), not
# dependencies of asyncserve: without them (as in CI's `make check`) mypy sees them as Any and must
# not call that an error; requests ships no type information at all.
# mypy: disable-error-code="import-not-found, import-untyped, misc, untyped-decorator"

# No `from __future__ import annotations`: FastAPI reads the endpoint's annotations at run time,
# and its pydantic models are local to the factory.

import asyncio
import contextlib
import os
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
import numpy.typing as npt
import orjson

from benchmarks import bare
from benchmarks.bare import Receive, Scope, Send

Array = npt.NDArray[Any]

MODEL = "score"
PREDICT_PATH = f"/v1/models/{MODEL}/predict"
POOL_SIZE = 256
TIMEOUT_S = 2.0
LOG_BATCH = 500
LOG_INTERVAL_S = 1.0

# The model: a logistic regression with fixed weights over age and a hashed country.
COUNTRY_BUCKETS = 16
_COUNTRY_WEIGHTS = np.linspace(-0.8, 0.8, COUNTRY_BUCKETS)
_AGE_WEIGHT = 0.045
_AGE_MEAN = 47.0
_BIAS = -0.3


def country_buckets(countries: Iterable[Any]) -> npt.NDArray[np.intp]:
    """Each country name hashed (CRC-32, stable across processes) into one of ``COUNTRY_BUCKETS``."""
    codes = [zlib.crc32(str(country).encode()) % COUNTRY_BUCKETS for country in countries]
    return np.asarray(codes, dtype=np.intp)


def predict_proba(age: Array, country: Array) -> npt.NDArray[np.float32]:
    """P(positive) for a batch of users: ``sigmoid(bias + w_age * (age - mean) + w_country[hash(country)])``."""
    centred_age = np.asarray(age, dtype=np.float64) - _AGE_MEAN
    z = _BIAS + _AGE_WEIGHT * centred_age + _COUNTRY_WEIGHTS[country_buckets(country)]
    result: npt.NDArray[np.float32] = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    return result


def score_row(row: dict[str, Any]) -> float:
    """The model on one feature row, as the baselines call it (one row per request)."""
    return float(predict_proba(np.array([row["age"]]), np.array([row["country"]], dtype=object))[0])


def log_record(user_id: int, row: dict[str, Any], probability: float, started: float) -> bytes:
    """One prediction as a JSON line: time, model, inputs, features, outputs, latency."""
    record = {
        "ts": time.time(),
        "model": MODEL,
        "inputs": {"user_id": user_id},
        "features": {"age": row["age"], "country": row["country"]},
        "outputs": {"probability": probability},
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
    }
    return orjson.dumps(record) + b"\n"


def feature_url() -> str:
    url = os.environ.get("IO_FEATURE_URL", "")
    if not url.startswith("http://127.0.0.1:"):
        raise RuntimeError(f"IO_FEATURE_URL must be a loopback URL like http://127.0.0.1:8123, got {url!r}")
    return url.rstrip("/")


# The bare ASGI ceiling


class RowClient(Protocol):
    """A pooled async HTTP client fetching one user's row per call."""

    async def open(self) -> None: ...

    async def row(self, user_id: int) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


class HttpxRows:
    """``httpx.AsyncClient`` with a pool of ``POOL_SIZE`` keep-alive connections (as asyncserve's HttpSource)."""

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None
        self._url = ""

    async def open(self) -> None:
        self._url = feature_url() + "/users/"
        limits = httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE)
        self._client = httpx.AsyncClient(limits=limits, timeout=TIMEOUT_S)

    async def row(self, user_id: int) -> dict[str, Any]:
        assert self._client is not None, "the client opens at start-up"
        response = await self._client.get(f"{self._url}{user_id}")
        response.raise_for_status()
        row: dict[str, Any] = orjson.loads(response.content)
        return row

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


class AiohttpRows:
    """``aiohttp.ClientSession`` over a ``TCPConnector`` of ``POOL_SIZE`` keep-alive connections."""

    def __init__(self) -> None:
        self._session: Any = None
        self._url = ""

    async def open(self) -> None:
        import aiohttp

        self._url = feature_url() + "/users/"
        connector = aiohttp.TCPConnector(limit=POOL_SIZE, limit_per_host=POOL_SIZE)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))

    async def row(self, user_id: int) -> dict[str, Any]:
        async with self._session.get(f"{self._url}{user_id}") as response:
            response.raise_for_status()
            row: dict[str, Any] = orjson.loads(await response.read())
            return row

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class LineLog:
    """Lines buffered on the loop, written by a background task in a worker thread (or dropped, with no path)."""

    def __init__(self, path: str) -> None:
        self._path = Path(path) if path else None
        self._lines: list[bytes] = []
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.written = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def append(self, line: bytes) -> None:
        self._lines.append(line)
        if len(self._lines) >= LOG_BATCH:
            self._full.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), LOG_INTERVAL_S)
            await self._write()

    async def _write(self) -> None:
        self._full.clear()
        lines, self._lines = self._lines, []
        if lines and self._path is not None:
            await asyncio.to_thread(self._append, b"".join(lines))
        self.written += len(lines)

    def _append(self, data: bytes) -> None:
        assert self._path is not None
        with self._path.open("ab") as file:
            file.write(data)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._write()


class BareApp:
    """The ceiling: one fetch per request through a pooled async client, the model inline, a buffered log."""

    def __init__(self, client: RowClient) -> None:
        self._client = client
        self._log = LineLog("")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["method"] == "POST" and scope["path"] == PREDICT_PATH:
            status, body = await self._predict(await bare.read_body(receive))
            await bare.respond(send, status, body)
        elif scope["method"] == "GET" and scope["path"] == "/v2/health/ready":
            await bare.respond(send, 200, b'{"ready":true}')
        else:
            await bare.respond(send, 404, b'{"error":"not found"}')

    async def _predict(self, body: bytes) -> tuple[int, bytes]:
        started = time.perf_counter()
        try:
            user_id = int(orjson.loads(body)["user_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return 400, b'{"error":"expected {\\"user_id\\": N}"}'
        try:
            row = await self._client.row(user_id)
        except Exception as exc:
            return 502, orjson.dumps({"error": f"feature service failed: {exc!r}"})
        probability = score_row(row)
        self._log.append(log_record(user_id, row, probability, started))
        return 200, orjson.dumps({"probability": probability})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._client.open()
                self._log = LineLog(os.environ.get("IO_LOG_PATH", ""))
                self._log.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._log.aclose()
                await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


bare_httpx = BareApp(HttpxRows())
bare_aiohttp = BareApp(AiohttpRows())


# The synchronous FastAPI baseline


class SyncLog:
    """A buffered JSONL file shared by the worker threads, appended under a lock."""

    def __init__(self, path: str) -> None:
        self._file = Path(path).open("ab") if path else None  # noqa: SIM115 (open for the app's lifetime)
        self._lock = threading.Lock()

    def append(self, line: bytes) -> None:
        if self._file is not None:
            with self._lock:
                self._file.write(line)

    def close(self) -> None:
        if self._file is not None:
            with self._lock:
                self._file.close()


def fastapi_app() -> Any:
    """The FastAPI app (``uvicorn --factory``): a blocking ``def`` endpoint that FastAPI runs in its thread pool."""
    import requests
    from fastapi import FastAPI
    from pydantic import BaseModel

    url = feature_url() + "/users/"
    sessions = threading.local()
    log = SyncLog(os.environ.get("IO_LOG_PATH", ""))

    def session() -> Any:
        """One ``requests.Session`` (keep-alive connection pool) per worker thread: Sessions are not thread-safe."""
        current = getattr(sessions, "session", None)
        if current is None:
            current = sessions.session = requests.Session()
        return current

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        log.close()

    class PredictRequest(BaseModel):
        user_id: int

    class PredictResponse(BaseModel):
        probability: float

    app = FastAPI(lifespan=lifespan)

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post(PREDICT_PATH)
    def predict(request: PredictRequest) -> PredictResponse:
        started = time.perf_counter()
        response = session().get(f"{url}{request.user_id}", timeout=TIMEOUT_S)
        response.raise_for_status()
        row: dict[str, Any] = response.json()
        probability = score_row(row)
        log.append(log_record(request.user_id, row, probability, started))
        return PredictResponse(probability=probability)

    return app
