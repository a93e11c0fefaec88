"""The HTTP protocol: uvicorn's httptools protocol, serving inference requests from the parser's callbacks.

Through ASGI every request costs a task, a scope, a receive and a send coroutine, four messages
and an await chain through the app: on a one-core server batching a cheap model, more than the
model itself. So an inference request is served here, without ASGI:

- *refused* (``AsyncServeApp.refusal``) with one write when the event loop is swamped: under
  overload, refusing must cost far less than serving, or the refusals alone keep the loop swamped;
- or, in the plain case (``AsyncServeApp.direct_request``), *served directly*: its body gathered
  by the parser's callbacks, then handed to ``AsyncServeApp.serve_direct``, which starts the
  prediction and calls back with the response. A model with no feature lookups runs with no task
  at all: the batcher's future calls back. A client that goes away cancels the prediction.

Every other request, and the rare inference request that is not plain (lazy, asynchronous, no
declared length, pipelined behind another), goes through uvicorn unchanged.

Under overload, two rules keep every turn of the event loop short, so that deadlines, the lag
probe and finished predictions get their turn: answers decided inside the parser's callbacks are
written on the next turn (``_write_soon``), and parsing stops for the turn once it has taken
``PARSE_BUDGET_S`` (``ParseBudget``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
import urllib.parse
from typing import TYPE_CHECKING, Any, cast

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

if TYPE_CHECKING:
    from asyncserve.app import AsyncServeApp, DirectRequest
    from asyncserve.routing import Response

logger = logging.getLogger(__name__)

_NO_SCOPE: Any = {}
"""The scope of a request answered here: uvicorn's callbacks never read it."""

UVICORN_INTERNALS = (AttributeError, KeyError, TypeError)
"""What a uvicorn release that changed the internals this protocol builds on would raise."""

SHORTCUTS = {"fast_refusals": True, "direct_inference": True}
"""The protocol's shortcuts past uvicorn's ASGI path that are on. One that meets a uvicorn whose internals
differ is turned off for the rest of the process. (A dict, not class attributes: the compiled class
would not see a class attribute change.)"""

PARSE_BUDGET_S = 0.001
"""How long one turn of the event loop may spend parsing (and so refusing or starting) requests."""


class ParseBudget:
    """Caps the time each turn of the event loop spends on incoming requests; the rest wait their turn.

    With a thousand busy connections, one turn of the loop reads a request from each before any
    timer or finished prediction gets a turn: about 70 ms even when every request is refused at
    once, longer than a tight deadline, and each hand-off of a batch to and from the executor
    waits a whole turn, so the model starves. Past the budget, a connection's bytes wait and are
    parsed first on the next turn, in arrival order, at least one connection's a turn. Should more
    bytes of a connection arrive while some wait, its reading is paused, so the kernel holds what
    follows (pausing every waiting connection would cost two system calls each time). Each turn the
    timers (deadlines, the lag probe) and finished predictions run first. A request's deadline
    counts from when it is parsed.

    One millisecond is about ten requests: turns stay a few milliseconds long under any load,
    and the cost of a turn (an epoll call, a few callbacks) is small beside ten requests.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, budget_s: float = PARSE_BUDGET_S) -> None:
        self._loop = loop
        self.budget_s = budget_s
        self.deferred = 0
        """How many times a connection's bytes waited for a later turn."""
        self._ends_at = 0.0
        """When this turn's budget ends (``time.perf_counter()``)."""
        self._turn_pending = False
        """Whether ``_next_turn`` is scheduled: bytes parsed meanwhile count against this turn's budget."""
        self._waiting: collections.deque[tuple[SheddingHttpToolsProtocol, bytes]] = collections.deque()

    def holding(self) -> bool:
        """Whether bytes received wait for a later turn: requests are in that the loop has yet to parse."""
        return bool(self._waiting)

    def allows(self, protocol: SheddingHttpToolsProtocol, data: bytes) -> bool:
        """Whether ``data`` may be parsed now; if not, it waits for a later turn (and the connection is
        paused if earlier bytes of it wait already)."""
        now = time.perf_counter()
        if not self._turn_pending:  # the first bytes since the last turn began
            self._turn_pending = True
            self._ends_at = now + self.budget_s
            self._loop.call_soon(self._next_turn)  # ready callbacks run on the next turn, after its timers
        if now < self._ends_at and not self._waiting:
            return True
        if protocol.chunks_waiting and not protocol.paused_by_budget:
            protocol.transport.pause_reading()
            protocol.paused_by_budget = True
        protocol.chunks_waiting += 1
        self._waiting.append((protocol, data))
        self.deferred += 1
        return False

    def _next_turn(self) -> None:
        self._turn_pending = False
        self._ends_at = time.perf_counter() + self.budget_s
        waiting = self._waiting
        while waiting:  # at least one a turn, however small the budget
            protocol, data = waiting.popleft()
            protocol.resume(data)
            if time.perf_counter() >= self._ends_at:
                break
        if waiting:
            self._turn_pending = True
            self._loop.call_soon(self._next_turn)


def header_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    """``name: value`` lines of an HTTP/1.1 response head, each ending in CRLF."""
    return b"".join([b"%s: %s\r\n" % header for header in headers])


def parse_budget(protocol: HttpToolsProtocol) -> ParseBudget:
    """The budget of the protocol's server (all its connections share one loop)."""
    state = protocol.server_state
    budget: ParseBudget | None = getattr(state, "asyncserve_parse_budget", None)
    if budget is None:
        budget = ParseBudget(protocol.loop)
        state.asyncserve_parse_budget = budget  # type: ignore[attr-defined]
        app: AsyncServeApp = protocol.config.app  # type: ignore[assignment]
        app.input_pending = budget.holding  # the batcher waits for the requests it holds back
    return budget


class SheddingHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that refuses or serves inference requests itself once their headers are in.

    It builds on uvicorn's internals (``RequestResponseCycle``, ``STATUS_LINE``). Should a uvicorn
    release change them, requests fall back to the ASGI path, with one warning.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct: DirectRequest | None = None
        """The request being served directly whose body is still coming."""
        self._direct_body: list[bytes] = []
        self._direct_work: asyncio.Future[Any] | None = None
        """The prediction under way for the request being served directly."""
        self._in_parser = False
        """Whether a request is being handed to the app from inside the parser's callbacks."""
        self._idle_since: float | None = None
        """When the connection's last response was written (``loop.time()``); None while a request is under way."""
        self.chunks_waiting = 0
        """This connection's received bytes that wait for a later turn (``ParseBudget``)."""
        self.paused_by_budget = False
        """Whether ``ParseBudget`` paused reading: more bytes came while earlier ones waited."""
        self._budget = parse_budget(self)
        # uvicorn types the timeout as an int but takes a float too (``Config(timeout_keep_alive=0.5)``);
        # read untyped, so that the compiled build does not insist on an int.
        self._keep_alive_s = float(cast(Any, self.config).timeout_keep_alive)

    # Keep-alive: uvicorn arms a timer after every response and cancels it on the next request's
    # bytes, a timer made and unmade per request. Here the connection notes when it fell idle, and
    # one timer, armed when none is, checks on firing how long it has been idle.

    def _unset_keepalive_if_required(self) -> None:
        """Nothing to cancel: ``data_received`` marks the connection busy, and the timer checks."""

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self._arm_keep_alive(self._keep_alive_s)

    def _arm_keep_alive(self, delay_s: float) -> None:
        self.timeout_keep_alive_task = self.loop.call_later(delay_s, self.timeout_keep_alive_handler)

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_since is None:
            return  # a request is under way: its response arms the timer again
        idle_s = self.loop.time() - self._idle_since
        if idle_s >= self._keep_alive_s:
            super().timeout_keep_alive_handler()
        else:
            self._arm_keep_alive(self._keep_alive_s - idle_s)

    def data_received(self, data: bytes) -> None:
        self._idle_since = None  # busy, even while these bytes wait for their turn
        if self._budget.allows(self, data):
            super().data_received(data)

    def resume(self, data: bytes) -> None:
        """Parse bytes that waited for a turn of the loop (``ParseBudget``), and read on."""
        self.chunks_waiting -= 1
        if self.transport.is_closing():
            return  # the client went away meanwhile
        if self.paused_by_budget and not self.chunks_waiting:
            self.paused_by_budget = False
            if not self.flow.read_paused:  # uvicorn's own flow control may hold the connection paused
                self.transport.resume_reading()
        super().data_received(data)

    def on_message_begin(self) -> None:
        # uvicorn's own builds the ASGI scope here; a request served directly needs none, so it is
        # built in on_headers_complete, for the requests that go through ASGI (``_through_asgi``).
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def _through_asgi(self) -> None:
        url, headers, expect_100_continue = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.expect_100_continue = url, expect_100_continue
        self.headers.extend(headers)  # the list the scope holds
        super().on_headers_complete()

    def on_headers_complete(self) -> None:
        current: RequestResponseCycle | None = self.cycle  # None before the first request
        if current is not None and not current.response_complete:
            self._through_asgi()  # pipelined requests keep their order: they go through uvicorn
            return
        app: AsyncServeApp = self.config.app  # type: ignore[assignment]
        method = self.parser.get_method()
        if SHORTCUTS["fast_refusals"] and not self.parser.should_upgrade():
            refusal = app.refusal(method, self.url, self.headers)
            if refusal is not None and self._try(self._refuse, *refusal, flag="fast_refusals"):
                return
        if SHORTCUTS["direct_inference"] and not self.expect_100_continue and not self.parser.should_upgrade():
            direct = app.direct_request(method.decode("ascii"), self._path(), self.headers)
            if direct is not None and self._try(self._take, direct, flag="direct_inference"):
                return
        self._through_asgi()

    def _default_lines(self) -> bytes:
        """The server's default headers (the date, which uvicorn renews every second), as header lines."""
        state = self.server_state
        defaults = state.default_headers
        cached: tuple[list[tuple[bytes, bytes]], bytes] | None = getattr(state, "asyncserve_default_lines", None)
        if cached is None or cached[0] is not defaults:
            cached = defaults, header_lines(defaults)
            state.asyncserve_default_lines = cached  # type: ignore[attr-defined]
        return cached[1]

    def _try(self, step: Any, *args: Any, flag: str) -> bool:
        try:
            step(*args)
        except UVICORN_INTERNALS:
            logger.warning("this uvicorn release does not allow %s at the HTTP parser; using ASGI instead", flag)
            SHORTCUTS[flag] = False
            return False
        return True

    def _path(self) -> str:
        path: str = httptools.parse_url(self.url).path.decode("latin-1")
        return self.root_path + (urllib.parse.unquote(path) if "%" in path else path)

    def _new_cycle(self, keep_alive: bool) -> RequestResponseCycle:
        """The cycle uvicorn's own callbacks (pipelining, shutdown, disconnects) see for a request answered here."""
        cycle = RequestResponseCycle(
            scope=_NO_SCOPE, transport=self.transport, flow=self.flow, logger=self.logger,
            access_logger=self.access_logger, access_log=self.access_log,
            default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
            expect_100_continue=False, keep_alive=keep_alive, on_response=self.on_response_complete,
        )  # fmt: skip
        self.cycle = cycle
        return cycle

    def _keep_alive(self) -> bool:
        return self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()

    # Refusing

    def _refuse(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        # A client that waits for "100 Continue" before its body may send it anyway or not: close.
        cycle = self._new_cycle(self._keep_alive() and not self.expect_100_continue)
        self._write_soon(cycle, status, header_lines([*headers, (b"content-length", b"%d" % len(body))]), body)

    # Serving directly

    def _take(self, direct: DirectRequest) -> None:
        self._new_cycle(self._keep_alive())
        self._direct, self._direct_body = direct, []

    def on_body(self, body: bytes) -> None:
        if self._direct is None:
            super().on_body(body)
        else:
            self._direct_body.append(body)  # within the declared length, which the app checked

    def on_message_complete(self) -> None:
        direct = self._direct
        if direct is None:
            super().on_message_complete()
            return
        body = b"".join(self._direct_body)
        self._direct, self._direct_body = None, []
        app: AsyncServeApp = self.config.app  # type: ignore[assignment]
        respond = functools.partial(self._respond, self.cycle)
        self._in_parser = True
        try:
            self._direct_work = app.serve_direct(direct, body, respond)
        finally:
            self._in_parser = False

    def _respond(self, cycle: RequestResponseCycle, response: Response, request_id: str) -> None:
        self._direct_work = None
        write = self._write_soon if self._in_parser else self._write
        write(cycle, response.status, header_lines(response.raw_headers(request_id)), response.body)

    def connection_lost(self, exc: Exception | None) -> None:
        work, self._direct_work = self._direct_work, None
        if work is not None:
            work.cancel()  # nobody waits for this prediction any more: its rows leave the queue
        timer, self.timeout_keep_alive_task = self.timeout_keep_alive_task, None
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)

    # Writing

    def _write_soon(self, cycle: RequestResponseCycle, status: int, headers: bytes, body: bytes) -> None:
        """Write an answer decided inside the parser's callbacks (a refusal, an error) on the loop's next turn.

        A client answered at once sends its next request at once. Under overload libuv's poll phase,
        which polls again (up to 48 times) while it finds a full array of ready sockets, would then
        go on parsing and refusing requests for seconds, and no timer (deadlines, the lag probe) and
        no finished prediction would get a turn. Answered on the next turn, each connection brings at
        most one request per turn of the loop.
        """
        self.loop.call_soon(self._write, cycle, status, headers, body)

    def _write(self, cycle: RequestResponseCycle, status: int, headers: bytes, body: bytes) -> None:
        """Write a whole response (``headers`` as ``header_lines`` gives them), then let uvicorn go on as
        after any response (keep-alive, pipelining)."""
        if self.transport.is_closing():
            return  # the client went away meanwhile
        closing = b"" if cycle.keep_alive else b"connection: close\r\n"
        self.transport.write(b"".join([STATUS_LINE[status], self._default_lines(), headers, closing, b"\r\n", body]))
        cycle.response_started = cycle.response_complete = True
        if cycle.keep_alive:
            self.on_response_complete()
        else:
            self.transport.close()
