"""Requests, responses and the router: what the protocol hands the app and what a handler gives back.

A handler takes a :class:`Request` (its body already read, within the server's limit) and returns a
:class:`Response`, a :class:`Pending` response (a future and how its result becomes the response),
or, for an ``async def`` handler, a coroutine of a Response, which the app runs as a task. So a
request that must await (feature lookups, async models, job brokers) costs a task, and a request
that only waits for its batch costs none.

No web framework sits here on purpose: the server's own cost per request is paid on the same core
as the models, and benchmarks/results/frameworks.md shows what Starlette and FastAPI add.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
import re
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import orjson

from asyncserve.exceptions import MethodNotAllowed, NotFound
from asyncserve.http.auth import ApiKey

JSON_TYPE = "application/json"

MATCHES_KEPT = 1024
"""Paths with parameters whose match is remembered; past that, others are matched each time."""


@dataclass(slots=True)
class Request:
    """One HTTP request, as the protocol (or the ASGI adapter) read it."""

    method: str
    path: str
    """The path as the client sent it (percent-encoded), without the query; the router decodes the
    ``{param}`` values it finds in it."""
    query: str
    """The raw query string (without ``?``)."""
    headers: dict[str, str]
    """Header names in lower case; a repeated header keeps its last value."""
    body: bytes
    request_id: str
    arrived: float
    """``time.monotonic()`` when the request's head was parsed: deadlines count from here."""
    params: dict[str, str] = field(default_factory=dict)
    """The route's ``{param}`` values, set by the router."""
    key: ApiKey | None = None
    """The client's API key, once checked; None when the server has no keys."""
    trace: Any = None
    """The request's span while tracing is on (``asyncserve/tracing.py``)."""
    screened: bool = False
    """Whether its Host and content type were checked from its head (``HttpApp.early_response``)."""


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON_TYPE

    @classmethod
    def json(cls, content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return cls(status, orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), headers or {})

    def head(self, request_id: str) -> bytes:
        """The response's header lines (without content-length or framing), as written on the wire."""
        # The common case, no headers of its own, in one formatting: it is written for every request.
        head = b"content-type: %s\r\nx-request-id: %s\r\n" % (_type_bytes(self.content_type), request_id.encode())
        if not self.headers:
            return head
        own = b"".join(b"%s: %s\r\n" % (n.encode(), v.encode("latin-1")) for n, v in self.headers.items())
        return head + own

    def header_lines(self, request_id: str) -> list[tuple[bytes, bytes]]:
        """The response's headers (without content-length or framing), as byte pairs."""
        headers = [(b"content-type", self.content_type.encode()), (b"x-request-id", request_id.encode())]
        headers.extend((name.encode(), value.encode("latin-1")) for name, value in self.headers.items())
        return headers


@functools.cache
def _type_bytes(content_type: str) -> bytes:
    return content_type.encode()


class StreamingResponse(Response):
    """A response whose body is sent chunk by chunk as ``chunks`` yields them (Server-Sent Events, say).

    The protocol writes each chunk as it comes and waits while the client reads slowly, so the
    producer is paused rather than buffered without bound; a client that goes away stops it.
    """

    def __init__(
        self,
        status: int,
        chunks: AsyncIterator[bytes],
        headers: dict[str, str] | None = None,
        content_type: str = JSON_TYPE,
    ) -> None:
        super().__init__(status, b"", {"cache-control": "no-cache", **(headers or {})}, content_type)
        self.chunks = chunks


@dataclass(slots=True)
class Pending:
    """A response still being computed: ``work``'s result becomes the response through ``answer``.

    Cancelling ``work`` withdraws the request (its rows leave the batcher's queue).
    """

    work: asyncio.Future[Any]
    answer: Callable[[Any], Response]


Reply = Response | Pending
Handler = Callable[[Request], Reply] | Callable[[Request], Coroutine[Any, Any, Response]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    name: str
    """A short label for metrics (never the raw path, whose values are unbounded)."""
    is_async: bool
    """Whether the handler is an ``async def``: its coroutine runs as a task."""
    inference: bool = False
    """Whether the route runs a model: it is refused early when the event loop is swamped."""
    scope: str | None = None
    """The API key scope the route needs (``asyncserve.http.auth.SCOPES``); None: open to anyone."""


class Router:
    """Matches a method and path to a route; ``{param}`` in a path matches one segment.

    Paths without parameters are found in a dict; the others are tried in the order they were
    added, so the busiest (inference) routes should be added first. A path without parameters is a
    resource of its own: another method on it is a 405, even where a parameter would match it
    (``GET /v1/jobs/batch`` is not the job ``batch``).
    """

    def __init__(self) -> None:
        self._routes: list[Route] = []
        self._static: dict[tuple[str, str], Route] = {}
        self._dynamic: list[Route] = []
        self._fixed: dict[str, list[str]] = {}
        """Each path without parameters, and the methods it takes."""
        self._matched: dict[tuple[str, str], tuple[Route, dict[str, str]]] = {}
        """Paths with parameters matched before (the few of the models served): no regex for them."""

    def add(
        self, method: str, path: str, handler: Handler, name: str, *, scope: str | None, inference: bool = False
    ) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)
        is_async = inspect.iscoroutinefunction(handler)
        route = Route(method, re.compile(f"^{regex}$"), handler, name, is_async, inference, scope)
        self._routes.append(route)
        self._matched.clear()
        if "{" in path:
            self._dynamic.append(route)
        else:
            self._static[(method, path)] = route
            self._fixed.setdefault(path, []).append(method)

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route of ``path`` as the client sent it (percent-encoded), and its parameters, decoded.

        Matching the raw path means an encoded slash (``%2F``) never splits a segment: a path that a
        proxy rule sees under one prefix reaches the route under that prefix.
        """
        key = (method, path)
        # The paths matched before first: the inference routes, the busiest, have parameters. (A path in
        # _static is never in _matched, which holds only what _match_dynamic found.)
        known = self._matched.get(key)
        if known is not None:
            return known[0], dict(known[1])
        route = self._static.get(key)
        if route is not None:
            return route, {}
        found_route, params = self._match_dynamic(method, path)
        if len(self._matched) < MATCHES_KEPT:
            self._matched[key] = (found_route, params)
        return found_route, dict(params)

    def _match_dynamic(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        if path in self._fixed:
            self._refuse(method, path, self._fixed[path])
        for route in self._dynamic:
            if route.method == method:
                found = route.pattern.match(path)
                if found is not None:
                    params = found.groupdict()
                    if "%" in path:
                        params = {name: urllib.parse.unquote(value) for name, value in params.items()}
                    return route, params
        return self._no_match(method, path)

    def _no_match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed = [route.method for route in self._routes if route.pattern.match(path) is not None]
        if allowed:
            self._refuse(method, path, allowed)
        raise NotFound(f"no route {method} {path}; see /docs for the API")

    @staticmethod
    def _refuse(method: str, path: str, allowed: Iterable[str]) -> NoReturn:
        methods = sorted(set(allowed))
        raise MethodNotAllowed(f"{method} is not allowed on {path}; use {' or '.join(methods)}", allowed=methods)

    @property
    def routes(self) -> Iterable[Route]:
        return iter(self._routes)


def new_request_id() -> str:
    """16 hex digits for a request that came without ``X-Request-ID``.

    From the process's pseudo-random generator (reseeded in each forked worker), not os.urandom:
    a system call per request would hand the GIL to the executor's threads on the busiest path.
    """
    return f"{random.getrandbits(64):016x}"
