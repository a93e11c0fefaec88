"""The thin HTTP layer under the app: requests, responses and a router, straight on ASGI.

No web framework sits here on purpose: the server's own cost per request is paid on the same
core as the models, and benchmarks/results/frameworks.md shows what Starlette and FastAPI add.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from asyncserve.exceptions import MethodNotAllowed, NotFound, PayloadTooLarge

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_TYPE = "application/json"


@dataclass(slots=True)
class Request:
    scope: Scope
    receive: Receive
    request_id: str
    params: dict[str, str]
    headers: dict[str, str]
    arrived: float
    """``time.monotonic()`` when the request arrived: deadlines count from here."""
    body_limit: int
    _body: bytes | None = None

    @property
    def method(self) -> str:
        method: str = self.scope["method"]
        return method

    async def body(self) -> bytes:
        """The whole body, read once; over ``body_limit`` bytes is a PayloadTooLarge, before or while reading."""
        if self._body is None:
            self._body = await self._read_body(self.body_limit)
        return self._body

    async def _read_body(self, limit: int) -> bytes:
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(_too_large(int(declared), limit))
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(_too_large(size, limit))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(size: int, limit: int) -> str:
    return f"the request body has {size} bytes or more, over the server's limit of {limit}; send smaller batches"


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON_TYPE

    @classmethod
    def json(cls, content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return cls(status, orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), headers or {})

    def raw_headers(self, request_id: str) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"content-type", self.content_type.encode()),
            (b"content-length", str(len(self.body)).encode()),
            (b"x-request-id", request_id.encode()),
        ]
        headers.extend((name.encode(), value.encode()) for name, value in self.headers.items())
        return headers

    async def send(self, send: Send, request_id: str) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.raw_headers(request_id)})
        await send({"type": "http.response.body", "body": self.body})


class StreamingResponse(Response):
    """A response whose body is sent as the chunks come (Server-Sent Events, say)."""

    def __init__(
        self,
        status: int,
        chunks: AsyncIterator[bytes],
        headers: dict[str, str] | None = None,
        content_type: str = JSON_TYPE,
    ) -> None:
        super().__init__(status, b"", headers or {}, content_type)
        self.chunks = chunks

    async def send(self, send: Send, request_id: str) -> None:
        headers = [
            (b"content-type", self.content_type.encode()),
            (b"cache-control", b"no-cache"),
            (b"x-request-id", request_id.encode()),
        ]
        headers.extend((name.encode(), value.encode()) for name, value in self.headers.items())
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        async for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


Handler = Callable[[Request], Awaitable[Response]]

DirectHandler = Callable[[Request, bytes], tuple["asyncio.Future[Any]", Callable[[Any], Response]]]
"""A route's handler for requests served straight from the HTTP parser: given the request and its
whole body, it starts the work and returns the work's future and how its result becomes the response."""


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    name: str
    """A short label for metrics (never the raw path, whose values are unbounded)."""
    cancel_on_disconnect: bool = False
    direct: DirectHandler | None = None
    """Set for the inference routes that asyncserve's protocol may serve without an ASGI task."""


class Router:
    """Matches a method and path to a route; ``{param}`` in a path matches one segment.

    Paths without parameters are found in a dict; the others are tried in the order they were
    added, so the busiest (inference) routes should be added first.
    """

    def __init__(self) -> None:
        self._routes: list[Route] = []
        self._static: dict[tuple[str, str], Route] = {}
        self._dynamic: list[Route] = []

    def add(
        self,
        method: str,
        path: str,
        handler: Handler,
        name: str,
        *,
        cancel_on_disconnect: bool = False,
        direct: DirectHandler | None = None,
    ) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)
        route = Route(method, re.compile(f"^{regex}$"), handler, name, cancel_on_disconnect, direct)
        self._routes.append(route)
        if "{" in path:
            self._dynamic.append(route)
        else:
            self._static[(method, path)] = route

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        route = self._static.get((method, path))
        if route is not None:
            return route, {}
        for route in self._dynamic:
            if route.method == method:
                found = route.pattern.match(path)
                if found is not None:
                    return route, found.groupdict()
        return self._no_match(method, path)

    def _no_match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        for route in self._routes:
            found = route.pattern.match(path)
            if found is not None:
                allowed.append(route.method)
        if allowed:
            raise MethodNotAllowed(f"{method} is not allowed on {path}; use {' or '.join(allowed)}")
        raise NotFound(f"no route {method} {path}; see /docs for the API")

    @property
    def routes(self) -> Iterable[Route]:
        return iter(self._routes)


def new_request_id() -> str:
    """16 hex digits for a request that came without ``X-Request-ID``.

    From the process's pseudo-random generator (reseeded in each forked worker), not os.urandom:
    a system call per request would hand the GIL to the executor's threads on the busiest path.
    """
    return f"{random.getrandbits(64):016x}"


def header_dict(raw_headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header names (lower case, as servers give them) to values, decoded as HTTP's latin-1."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in raw_headers}
