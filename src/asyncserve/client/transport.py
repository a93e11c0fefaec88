"""One pooled aiohttp session: requests with retries and deadlines, and the server's errors as their classes.

What is retried, up to ``retries`` times (or, given ``retry_budget_s``, for up to that many seconds
from the first failure, however many retries it takes), with jittered exponential backoff that never
comes back before the server's ``Retry-After``:

- a 503 (the server took nothing: overloaded, a model not ready, shutting down), and a 429 (the API
  key is over its rate or concurrency: nothing was taken either);
- a connection that could not be made (no byte of the request was sent);
- for a request marked idempotent (reads, cancels, job submissions with their idempotency key), a
  connection lost before the answer came too.

Nothing else is: not another 4xx (the request is wrong, sending it again changes nothing), not a 500
(the model failed, and may have had effects), not a 504 (the deadline has passed). A retry that
would start after the request's deadline (``deadline_s``), or wait longer than ``timeout_s``, is
not made: the last error is raised. Each attempt sends what is left of the deadline as
``X-Request-Timeout``, so the deadline holds across retries.

aiohttp, not httpx: at 256 requests in flight httpx's pool cost tens of times aiohttp's CPU per
request (``benchmarks/results/io.md``); ``benchmarks/results/client.md`` measures this client
against a bare aiohttp loop.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import aiohttp
import orjson
from yarl import URL

from asyncserve.exceptions import AsyncServeError, MethodNotAllowed, RateLimited, SchemaViolation, Unavailable

BASE_BACKOFF_S = 0.1
"""The first retry's wait; each further one doubles it, up to ``MAX_BACKOFF_S``."""
MAX_BACKOFF_S = 10.0
JITTER = 0.25
"""Each wait is stretched by a random share up to this, so that clients refused together do not return together."""
_TAKEN_NOTHING = frozenset({429, 503})
"""Answers that say the server did nothing with the request: sending it again is safe."""


class Answer(NamedTuple):
    """A successful answer, read whole."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class _Retry:
    """An attempt that may be made again: the error to raise if it is not, and the server's Retry-After."""

    error: Exception
    retry_after_s: float | None = None


class Transport:
    """Sends requests on one aiohttp session (created on first use, on the running loop).

    Example::

        transport = Transport("http://localhost:8000", api_key=None, timeout_s=30.0, retries=3, max_connections=256)
        answer = await transport.request("GET", transport.url("/v2/health/ready"))
        await transport.aclose()
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeout_s: float,
        retries: int,
        max_connections: int,
        retry_budget_s: float | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_budget_s = retry_budget_s
        self.max_connections = max_connections
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s)
        self._urls: dict[str, URL] = {}

    def url(self, path: str) -> URL:
        """The URL of ``path`` (already quoted) on the server, parsed once."""
        url = self._urls.get(path)
        if url is None:
            if len(self._urls) >= 4096:  # one entry per model and route is the use; ids come and go
                self._urls.clear()
            url = self._urls[path] = URL(self.base_url + path, encoded=True)
        return url

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0)
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers, timeout=timeout)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        url: URL,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        deadline_s: float | None = None,
        idempotent: bool = False,
    ) -> Answer:
        """Send a request, retrying what may be retried; its answer read whole, or its error raised."""
        # The attempts are awaited here, not in a helper coroutine: with hundreds of requests in flight,
        # each frame less per request is fewer objects for the garbage collector to walk.
        budget = None if deadline_s is None else _Budget(deadline_s)
        attempt, failed_at = 0, 0.0
        while True:
            try:
                response = await self._send(method, url, body, _timed(headers, budget), stream=False)
                if response.status < 400:
                    return Answer(response.status, response.headers, await response.read())
                retry = await _refusal(response)
            except Exception as exc:
                retry = _failure(exc, method, url, idempotent)
            failed_at = failed_at or time.monotonic()
            await self._pause(attempt, retry, budget, failed_at)
            attempt += 1

    async def open(
        self,
        method: str,
        url: URL,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        deadline_s: float | None = None,
        idempotent: bool = False,
    ) -> aiohttp.ClientResponse:
        """The response of a request whose answer is read as it comes (release it), retried as ``request`` is.

        The answer may last as long as it needs (a streaming model's is bounded by the request's
        deadline on the server; a job's events, by the job): only connecting is bounded by ``timeout_s``.
        """
        budget = None if deadline_s is None else _Budget(deadline_s)
        attempt, failed_at = 0, 0.0
        while True:
            try:
                response = await self._send(method, url, body, _timed(headers, budget), stream=True)
                if response.status < 400:
                    return response
                retry = await _refusal(response)
            except Exception as exc:
                retry = _failure(exc, method, url, idempotent)
            failed_at = failed_at or time.monotonic()
            await self._pause(attempt, retry, budget, failed_at)
            attempt += 1

    def _send(
        self, method: str, url: URL, body: bytes | None, headers: Mapping[str, str] | None, *, stream: bool
    ) -> Awaitable[aiohttp.ClientResponse]:
        session = self._session or self.session()
        if stream:
            return session.request(method, url, data=body, headers=headers, timeout=self._stream_timeout)
        return session.request(method, url, data=body, headers=headers)

    async def _pause(self, attempt: int, retry: _Retry, budget: _Budget | None, failed_at: float) -> None:
        """Wait before retry ``attempt + 1``, or raise the error if none is left, or none would help in time."""
        delay_s = retry_delay_s(attempt, retry.retry_after_s)
        if self.retry_budget_s is None:
            spent = attempt >= self.retries
        else:
            # The last retry falls at the budget's end, unless the server asked to wait longer.
            left_s = failed_at + self.retry_budget_s - time.monotonic()
            delay_s = max(min(delay_s, left_s), retry.retry_after_s or 0.0)
            spent = left_s <= 0.0 or delay_s > left_s
        if spent or delay_s > self.timeout_s or (budget is not None and not budget.allows(delay_s)):
            raise retry.error
        await asyncio.sleep(delay_s)


def _failure(exc: Exception, method: str, url: URL, idempotent: bool) -> _Retry:
    """A request that raised: retried when nothing was sent, or (``idempotent``) when the connection broke."""
    if isinstance(exc, TimeoutError) or not isinstance(exc, aiohttp.ClientError):
        raise exc  # timeout_s bounds an attempt and is not retried (aiohttp's timeouts are TimeoutErrors)
    if isinstance(exc, aiohttp.ClientConnectorError):  # nothing was sent
        error = ConnectionError(f"{method} {url}: could not connect ({exc.os_error!r})")
    else:
        error = ConnectionError(f"{method} {url}: the connection broke before the whole answer came ({exc!r})")
    error.__cause__ = exc
    if idempotent or isinstance(exc, aiohttp.ClientConnectorError):
        return _Retry(error)
    raise error


def _timed(headers: Mapping[str, str] | None, budget: _Budget | None) -> Mapping[str, str] | None:
    return headers if budget is None else budget.headers(headers)


async def _refusal(response: aiohttp.ClientResponse) -> _Retry:
    """The error of an answer >= 400: returned to be retried for a 503 or a 429, raised otherwise."""
    try:
        body = await response.read()
    except aiohttp.ClientError:
        body = b""
    finally:
        response.release()
    retry_after_s = parse_retry_after(response.headers.get("Retry-After"))
    error = server_error(response.status, body, response.headers, retry_after_s)
    if response.status in _TAKEN_NOTHING:
        return _Retry(error, retry_after_s)
    raise error


class _Budget:
    """What is left of a request's deadline, on the monotonic clock."""

    __slots__ = ("deadline",)

    def __init__(self, deadline_s: float) -> None:
        self.deadline = time.monotonic() + deadline_s

    def headers(self, headers: Mapping[str, str] | None) -> Mapping[str, str]:
        left_s = max(self.deadline - time.monotonic(), 0.001)
        return {**(headers or {}), "X-Request-Timeout": f"{left_s:.3f}"}

    def allows(self, delay_s: float) -> bool:
        return time.monotonic() + delay_s < self.deadline


def retry_delay_s(attempt: int, retry_after_s: float | None) -> float:
    """The wait before retry ``attempt + 1``: exponential backoff, never under Retry-After, stretched by jitter."""
    backoff_s = min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2.0**attempt)
    return max(backoff_s, retry_after_s or 0.0) * random.uniform(1.0, 1.0 + JITTER)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: a number of seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def server_error(
    status: int, body: bytes, headers: Mapping[str, str], retry_after_s: float | None = None
) -> AsyncServeError:
    """The server's error as the class its ``code`` names, with the server's message.

    A code no class declares becomes an AsyncServeError that keeps the code and the status it came
    with; so does an answer that is not asyncserve's JSON error (a proxy's page, say).
    """
    message, code = _message_and_code(status, body)
    cls = AsyncServeError.for_code(code)
    # Built without the subclass's __init__, whose arguments differ (a path, an allowed list):
    # the server's message is already whole, and the attributes are set from the answer below.
    error = cls.__new__(cls)
    AsyncServeError.__init__(error, message)
    if (code, status) != (cls.code, cls.status_code):
        vars(error).update(code=code, status_code=status)  # instance values over the class's
    _set_details(error, headers, retry_after_s)
    return error


def _message_and_code(status: int, body: bytes) -> tuple[str, str]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return document["error"], str(document.get("code", "internal"))
    text = body[:300].decode(errors="replace").strip()
    return f"HTTP {status}" + (f": {text}" if text else ""), f"http_{status}"


def _set_details(error: AsyncServeError, headers: Mapping[str, str], retry_after_s: float | None) -> None:
    if isinstance(error, Unavailable | RateLimited):
        error.retry_after_s = 1.0 if retry_after_s is None else retry_after_s
    elif isinstance(error, MethodNotAllowed):
        error.allowed = [method.strip() for method in headers.get("Allow", "").split(",") if method.strip()]
    elif isinstance(error, SchemaViolation):
        # The server words it "<path>: <problem>" (the problem alone for the whole body).
        path, separator, _ = error.message.partition(": ")
        error.path = path if separator and " " not in path else ""
