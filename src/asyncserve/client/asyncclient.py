"""``AsyncClient``: predictions, V2 inference with NumPy arrays, jobs, lazy handles and streams, from asyncio code."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import uuid
from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, overload
from urllib.parse import quote

import numpy.typing as npt
import orjson

from asyncserve.client import v2
from asyncserve.client.events import read_events
from asyncserve.client.transport import Answer, Transport, retry_delay_s, server_error
from asyncserve.exceptions import AsyncServeError

Row = Mapping[str, Any]
"""One row of the JSON API: input name -> value (a number, a string, a list)."""
JSONObject = dict[str, Any]

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "expired"})
"""A job in one of these will never change again."""
_JSON_HEADERS = {"Content-Type": "application/json"}


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


class AsyncClient:
    """A client of an asyncserve server, for asyncio code; one pool of up to ``max_connections`` connections.

    Args:
        base_url: The server, for example ``"http://localhost:8000"``.
        api_key: Sent as ``Authorization: Bearer <key>``.
        timeout_s: The longest one attempt may take (past it, ``TimeoutError``), and the longest wait
            before a retry. A stream's or a job's events are bounded by the server, not by it.
        retries: How many times a request the server refused with 503 or 429 (or that could not
            connect) is sent again, after jittered exponential backoff that honours ``Retry-After``.
        max_connections: Requests in flight at once; more wait for a connection.
        retry_budget_s: Instead of counting ``retries``, retry for up to this many seconds from a
            request's first failure, however many retries it takes (backoff grows to 10 s between
            them): a client that rides out a server restart. None (the default) counts ``retries``.

    Raises (from every method): the server's error as its class (``asyncserve.ModelNotFound``,
    ``asyncserve.DeadlineExceeded``, ...), with the server's ``message`` and ``code``;
    ``ConnectionError`` when the server cannot be reached; ``TimeoutError`` past ``timeout_s``.

    Usage::

        import asyncserve
        import numpy as np

        async with asyncserve.AsyncClient("http://localhost:8000") as client:
            answer = await client.predict("iris", {"features": [5.1, 3.5, 1.4, 0.2]})
            outputs = await client.infer("scaler", {"x": np.ones((2, 3), np.float32)})
            job = await client.submit("iris", {"features": [5.1, 3.5, 1.4, 0.2]})
            job = await client.wait(job["id"], timeout_s=60)
            async for part in client.stream("countdown", {"start": 3}):
                print(part)
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        max_connections: int = 256,
        retry_budget_s: float | None = None,
    ) -> None:
        _check(timeout_s > 0, "timeout_s must be a number of seconds > 0", timeout_s)
        _check(retries >= 0, "retries must be an integer >= 0", retries)
        _check(max_connections >= 1, "max_connections must be an integer >= 1", max_connections)
        _check(base_url.startswith(("http://", "https://")), "base_url must start with http:// or https://", base_url)
        _check(
            retry_budget_s is None or retry_budget_s > 0, "retry_budget_s must be None or seconds > 0", retry_budget_s
        )
        self._transport = Transport(
            base_url,
            api_key=api_key,
            timeout_s=timeout_s,
            retries=retries,
            max_connections=max_connections,
            retry_budget_s=retry_budget_s,
        )
        self._state = _State.UNOPENED

    def __repr__(self) -> str:
        return f"AsyncClient({self._transport.base_url!r}, state={self._state.name.lower()})"

    # Lifecycle

    async def __aenter__(self) -> Self:
        self._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection; the client cannot be used again."""
        self._state = _State.CLOSED
        await self._transport.aclose()

    def _open(self) -> Transport:
        if self._state is _State.CLOSED:
            raise RuntimeError("this AsyncClient is closed; make a new one to send more requests")
        self._state = _State.OPENED
        return self._transport

    # The JSON API

    @overload
    async def predict(
        self, model: str, rows: Row, *, deadline_s: float | None = None, priority: int | None = None
    ) -> JSONObject: ...

    @overload
    async def predict(
        self, model: str, rows: Sequence[Row], *, deadline_s: float | None = None, priority: int | None = None
    ) -> list[JSONObject]: ...

    async def predict(
        self, model: str, rows: Row | Sequence[Row], *, deadline_s: float | None = None, priority: int | None = None
    ) -> JSONObject | list[JSONObject]:
        """``POST /v1/models/{model}/predict``: one row (a dict) answers a dict, a list of rows a list.

        Args:
            deadline_s: Sent as ``X-Request-Timeout``; past it the server answers 504 (``DeadlineExceeded``).
            priority: 0 to 9 (``X-Priority``); higher rows are batched first.

        Example::

            await client.predict("iris", {"features": [5.1, 3.5, 1.4, 0.2]})  # {"label": "setosa", ...}
        """
        headers = _JSON_HEADERS if priority is None else {**_JSON_HEADERS, "X-Priority": str(priority)}
        url = self._open().url(f"/v1/models/{_quote(model)}/predict")
        answer = await self._transport.request("POST", url, body=_dumps(rows), headers=headers, deadline_s=deadline_s)
        document: JSONObject | list[JSONObject] = orjson.loads(answer.body)
        return document

    async def stream(
        self, model: str, inputs: Row | Sequence[Row], *, deadline_s: float | None = None
    ) -> AsyncGenerator[JSONObject, None]:
        """The parts of a streaming model's answer, each as soon as the server sends it (Server-Sent Events).

        An ``error`` event raises the error's class (``ModelError``, ``DeadlineExceeded``, ...). Breaking
        out of the loop closes the connection, which stops the model at its next part. A model that
        does not stream answers one part: its whole answer.

        Example::

            async with contextlib.aclosing(client.stream("countdown", {"start": 3})) as parts:
                async for part in parts:
                    print(part["left"])
        """
        headers = {**_JSON_HEADERS, "Accept": "text/event-stream"}
        url = self._open().url(f"/v1/models/{_quote(model)}/predict")
        response = await self._transport.open("POST", url, body=_dumps(inputs), headers=headers, deadline_s=deadline_s)
        async with response:
            if not response.content_type.startswith("text/event-stream"):
                yield orjson.loads(await response.read())
                return
            async for event in read_events(response.content.iter_any()):
                if event.name == "end":
                    return
                if event.name == "error":
                    raise server_error(response.status, event.data.encode(), response.headers)
                yield orjson.loads(event.data)
        raise ConnectionError(f"the stream of {model!r} ended before its end event: the connection was cut")

    # The Open Inference Protocol (V2)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        version: str | None = None,
        binary: bool = True,
        outputs: Sequence[str] | None = None,
        deadline_s: float | None = None,
        priority: int | None = None,
    ) -> dict[str, npt.NDArray[Any]]:
        """``POST /v2/models/{model}[/versions/{version}]/infer``: NumPy arrays in, NumPy arrays out.

        Each array's first dimension counts rows; its dtype picks the V2 datatype (float32 is FP32,
        str or object arrays BYTES). ``binary=True`` sends and receives the tensors' bytes (the binary
        tensor data extension); ``binary=False`` sends JSON. ``outputs`` names the outputs wanted
        (all by default).

        Example::

            outputs = await client.infer("scaler", {"x": np.array([[1, 2, 3]], dtype=np.float32)})
            outputs["y"]  # array([[  1.,  20., 300.]], dtype=float32)
        """
        parameters = {} if priority is None else {"priority": priority}
        body, headers = v2.encode_request(inputs, binary=binary, outputs=outputs, parameters=parameters)
        path = f"/v2/models/{_quote(model)}" + ("" if version is None else f"/versions/{_quote(version)}")
        url = self._open().url(path + "/infer")
        answer = await self._transport.request("POST", url, body=body, headers=headers, deadline_s=deadline_s)
        return v2.decode_response(answer.body, answer.headers.get("Inference-Header-Content-Length"))

    async def model_metadata(self, model: str, *, version: str | None = None) -> JSONObject:
        """``GET /v2/models/{model}[/versions/{version}]``: the model's name, versions, platform, inputs and outputs.

        Raises ``ModelNotFound`` for a model (or version) the server does not serve: a quick check
        before sending it work.

        Example::

            metadata = await client.model_metadata("scaler")
            [tensor["name"] for tensor in metadata["inputs"]]  # ["x"]
        """
        path = f"/v2/models/{_quote(model)}" + ("" if version is None else f"/versions/{_quote(version)}")
        return _object(await self._open().request("GET", self._transport.url(path), idempotent=True))

    # Lazy predictions

    async def lazy(self, model: str, rows: Row | Sequence[Row]) -> LazyHandle:
        """A handle to a prediction the server computes only when it is read (``Prefer: lazy``).

        The model and the rows are checked now; ``await handle`` reads it
        (``GET /v1/predictions/{id}``), which computes it the first time.

        Example::

            handle = await client.lazy("iris", {"features": [5.1, 3.5, 1.4, 0.2]})
            answer = await handle  # computed now, or never if never awaited
        """
        headers = {**_JSON_HEADERS, "Prefer": "lazy"}
        url = self._open().url(f"/v1/models/{_quote(model)}/predict")
        document = _object(await self._transport.request("POST", url, body=_dumps(rows), headers=headers))
        return LazyHandle(self, document["id"], document["url"], float(document["expires_in_s"]))

    async def _read_lazy(self, handle_id: str) -> Any:
        url = self._open().url(f"/v1/predictions/{_quote(handle_id)}")
        return orjson.loads((await self._transport.request("GET", url, idempotent=True)).body)

    # Jobs

    async def submit(
        self,
        model: str,
        inputs: Row | Sequence[Row],
        *,
        version: str | None = None,
        webhook: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
    ) -> JSONObject:
        """``POST /v1/jobs``: the job, queued (202) or, for a key seen before, the job it made.

        Every submission carries an ``Idempotency-Key`` (``idempotency_key``, or a fresh one), the
        same on each retry, so a retried submission never makes a second job. ``max_attempts``
        bounds the runs of a job that fails (the server's default is 3).

        Example::

            job = await client.submit("iris", {"features": [5.1, 3.5, 1.4, 0.2]}, priority=5)
            job["id"], job["status"]  # ("0190...", "queued")
        """
        options = {"version": version, "webhook": webhook, "priority": priority, "max_attempts": max_attempts}
        document = _job(model, inputs, options)
        key = idempotency_key or uuid.uuid4().hex
        headers = {**_JSON_HEADERS, "Idempotency-Key": key}
        url = self._open().url("/v1/jobs")
        answer = await self._transport.request("POST", url, body=_dumps(document), headers=headers, idempotent=True)
        return _object(answer)

    async def submit_many(
        self,
        model: str,
        inputs: Sequence[Row | Sequence[Row]],
        *,
        version: str | None = None,
        webhook: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        idempotency_keys: Sequence[str] | None = None,
    ) -> list[JSONObject]:
        """``POST /v1/jobs/batch``: one job per item of ``inputs``; each ``{"id", "status", "url"}``, in order.

        Each job carries an idempotency key of its own, so a retried batch makes no job twice:
        ``idempotency_keys`` (one per item; a key seen before gives the job it made, so a program
        that restarts and submits again with the same keys finds its jobs), or fresh ones.
        ``max_attempts`` bounds the runs of a job that fails. The server checks every item before
        it makes any job: one bad item refuses the batch (``InvalidRequest`` or ``SchemaViolation``,
        naming it).

        Example::

            rows = [{"features": [5.1, 3.5, 1.4, 0.2]}, {"features": [6.7, 3.0, 5.2, 2.3]}]
            jobs = await client.submit_many("iris", rows, idempotency_keys=["run-7:1", "run-7:2"])
        """
        keys = [uuid.uuid4().hex for _ in inputs] if idempotency_keys is None else list(idempotency_keys)
        if len(keys) != len(inputs):
            raise ValueError(f"idempotency_keys must give one key per input: {len(keys)} keys for {len(inputs)} inputs")
        options = {"version": version, "webhook": webhook, "priority": priority, "max_attempts": max_attempts}
        documents = [
            {**_job(model, item, options), "idempotency_key": key} for item, key in zip(inputs, keys, strict=True)
        ]
        url = self._open().url("/v1/jobs/batch")
        answer = await self._transport.request(
            "POST", url, body=_dumps(documents), headers=_JSON_HEADERS, idempotent=True
        )
        jobs: list[JSONObject] = _object(answer)["jobs"]
        return jobs

    async def get(self, job_id: str) -> JSONObject:
        """``GET /v1/jobs/{id}``: the job now (``status``, and ``result`` or ``error`` once final)."""
        url = self._open().url(f"/v1/jobs/{_quote(job_id)}")
        return _object(await self._transport.request("GET", url, idempotent=True))

    async def cancel(self, job_id: str) -> JSONObject:
        """``DELETE /v1/jobs/{id}``: the job, cancelled unless it had already finished."""
        url = self._open().url(f"/v1/jobs/{_quote(job_id)}")
        return _object(await self._transport.request("DELETE", url, idempotent=True))

    async def events(self, job_id: str) -> AsyncGenerator[JSONObject, None]:
        """``GET /v1/jobs/{id}/events``: the job now, then at every change of status, until it is final.

        Example::

            async for job in client.events(job_id):
                print(job["status"])  # queued, running, succeeded
        """
        url = self._open().url(f"/v1/jobs/{_quote(job_id)}/events")
        response = await self._transport.open("GET", url, idempotent=True)
        async with response:
            async for event in read_events(response.content.iter_any()):
                yield orjson.loads(event.data)

    async def wait(self, job_id: str, *, timeout_s: float) -> JSONObject:
        """The job once final (succeeded, failed, cancelled or expired), followed on its event stream.

        Raises:
            TimeoutError: The job was not final within ``timeout_s``.

        Example::

            job = await client.wait(job["id"], timeout_s=60)
            job["result"] if job["status"] == "succeeded" else job["error"]
        """
        last: JSONObject = {"status": "unknown"}
        try:
            async with asyncio.timeout(timeout_s) as scope:
                reconnection = 0
                while True:
                    async with contextlib.aclosing(self.events(job_id)) as events:
                        async for last in events:
                            if last["status"] in FINAL_STATUSES:
                                return last
                    # The server ended the stream before the job was final (it is shutting down, say).
                    await asyncio.sleep(retry_delay_s(reconnection, None))
                    reconnection += 1
        except TimeoutError:
            if not scope.expired():
                raise  # a connection timed out, not the wait
            raise TimeoutError(
                f"job {job_id} was not final within {timeout_s} s (last seen {last['status']})"
            ) from None


class LazyHandle:
    """A prediction the server computes when it is first read: ``await handle`` reads it.

    ``id``, ``url`` (``/v1/predictions/{id}``) and ``expires_in_s`` are the server's. Reading it
    again returns the answer already read.
    """

    def __init__(self, client: AsyncClient, handle_id: str, url: str, expires_in_s: float) -> None:
        self.id = handle_id
        self.url = url
        self.expires_in_s = expires_in_s
        self._client = client
        self._answer: Any = None
        self._read = False

    def __repr__(self) -> str:
        return f"LazyHandle(id={self.id!r}, read={self._read})"

    def __await__(self) -> Generator[Any, None, Any]:
        return self.result().__await__()

    async def result(self) -> Any:
        """The answer (a dict, or a list for a list of rows), computed on the server on the first read."""
        if not self._read:
            self._answer = await self._client._read_lazy(self.id)
            self._read = True
        return self._answer


def _job(model: str, inputs: Row | Sequence[Row], options: Mapping[str, object]) -> JSONObject:
    """A job's document: the options that are not None (``version``, ``webhook``, ...) beside the inputs."""
    document: JSONObject = {"model": model, "inputs": inputs}
    document.update((name, value) for name, value in options.items() if value is not None)
    return document


def _quote(segment: str) -> str:
    return quote(segment, safe="")


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:
        raise TypeError(
            f"the inputs must be JSON-like rows (dicts of numbers, strings, lists, arrays): {exc}"
        ) from None


def _object(answer: Answer) -> JSONObject:
    document = orjson.loads(answer.body)
    if not isinstance(document, dict):
        raise AsyncServeError(f"the server answered {answer.body[:100]!r} where a JSON object was expected")
    return document


def _check(ok: bool, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{rule}, got {value!r}")
