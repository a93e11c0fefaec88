"""The HTTP/1.1 protocol: asyncserve's own ``asyncio.Protocol`` on httptools' public parser.

Every request takes one way: the parser's callbacks gather its head and body, then the app's
``handle`` runs the route's handler and calls back with the response, at once or when the
prediction is done. A request that only waits for its batch costs no task; one whose client goes
away has its work cancelled, which withdraws its rows from the batcher.

What the protocol guarantees a client:

- keep-alive, with an idle timeout; HTTP/1.0 gets its answer and the connection closes;
- pipelined requests answered in order (at most ``MAX_PIPELINED`` parsed ahead, then reading pauses);
- ``Expect: 100-continue`` answered before the body is read, or refused (413, 417) without it;
- chunked request bodies; limits on URL length (414), header count and size (431), body size (413);
- a head that takes longer than ``head_timeout_s`` to arrive is answered 408 and closed;
- a request with both ``Content-Length`` and ``Transfer-Encoding``, two lengths, or a transfer
  coding other than ``chunked`` is refused 400 and the connection closed (request smuggling);
- a bug anywhere in the request's way answers 500 and logs its traceback;
- the path is routed as sent: an encoded slash (``%2F``) never splits a segment.

A client whose connection ends (or that closes its sending side: the two cannot be told apart) is
gone: the work of its request is cancelled, which withdraws its rows from the batcher.

Under overload, two rules keep every turn of the event loop short, so that deadlines, the lag
probe and finished predictions get their turn: answers decided inside the parser's callbacks are
written on the next turn (``_respond``), and parsing stops for the turn once it has taken
``PARSE_BUDGET_S`` (``ParseBudget``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http
import logging
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httptools
import orjson

from asyncserve._utils import is_count
from asyncserve.exceptions import (
    AsyncServeError,
    ExpectationFailed,
    HeadersTooLarge,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    Unavailable,
    URITooLong,
)
from asyncserve.http.routing import JSON_TYPE, Request, Response, StreamingResponse, new_request_id

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("asyncserve.access")

PARSE_BUDGET_S = 0.001
"""How long one turn of the event loop may spend parsing (and so refusing or starting) requests."""

MAX_PIPELINED = 16
"""Requests parsed ahead of the one being answered on a connection; past that, reading pauses (the
requests that one read brought in are parsed whatever their number)."""

STATUS_LINES = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode()) for status in http.HTTPStatus
}

LINGER_S = 2.0
"""How long a connection closing after its answer drops what the client still sends, before it is cut."""

Respond = Callable[[Response, str], None]
"""Writes a response (and its request id) to the client: ``handle`` calls it exactly once per request."""


class Dispatcher(Protocol):
    """What the protocol serves: the app (``asyncserve.http.app.HttpApp``)."""

    def early_response(self, method: str, path: str, headers: dict[str, str]) -> Response | None:
        """An answer to give from the request's head alone (a refusal under overload), or None."""

    def handle(self, request: Request, respond: Respond) -> asyncio.Future[Any] | None:
        """Serve ``request``: ``respond`` gets its response, now or later. Returns the work under way, if
        any, which the protocol cancels when the client goes away (``respond`` is then never called)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What a connection may send, and how long it may take (``Settings`` gives them)."""

    max_body_bytes: int
    max_url_bytes: int = 8 * 1024
    max_header_count: int = 100
    max_header_bytes: int = 16 * 1024
    keep_alive_s: float = 5.0
    head_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 10_000
    max_held_body_bytes: int = 512 * 1024 * 1024
    access_log: bool = False
    answer_half_closed: bool = False
    """Answer a client that shuts its sending side after its requests (see ``HttpProtocol.eof_received``)."""


class Connections(Protocol):
    """What a connection needs of its server (``asyncserve.http.server.HttpServer``)."""

    connections: set[HttpProtocol]
    date_line: bytes
    closing: bool

    @property
    def budget(self) -> ParseBudget: ...

    def reserve(self, protocol: HttpProtocol, size: int) -> bool:
        """Room for a body of ``size`` bytes now (True), or later: ``protocol.room_granted()`` is then called."""

    def hold(self, size: int) -> None:
        """Count ``size`` bytes of a body of unknown length (chunked) as held."""

    def release(self, size: int) -> None:
        """``size`` bytes of bodies are no longer held."""

    def connection_idle(self) -> None:
        """A connection finished its requests or closed: the server may be drained."""


class HttpProtocol(asyncio.Protocol):
    """One client connection. See the module's docstring for what it guarantees."""

    def __init__(self, app: Dispatcher, limits: Limits, server: Connections) -> None:
        self.app = app
        self.limits = limits
        self.server = server
        self._budget = server.budget
        """The server's (made once it starts, before any connection): read here, not per read."""
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.client = ""
        self._parser = httptools.HttpRequestParser(self)
        # The request being parsed
        self._url = b""
        self._headers: dict[str, str] = {}
        """Names in lower case; a repeated header keeps its last value."""
        self._header_count = 0
        self._header_bytes = 0
        self._repeated: str | None = None
        """The first header that may be sent once and came again (the request is refused once its head is in)."""
        self._max_header_bytes = limits.max_header_bytes
        self._max_header_count = limits.max_header_count
        """(``limits``' two, read for every header)"""
        self._head: Request | None = None
        """The request whose head is in and whose body is being read (its ``body`` is set once it is all in)."""
        self._head_keep_alive = False
        """Whether the connection may stay open after that request's answer."""
        self._body: list[bytes] = []
        self._body_size = 0
        self._discard_body = False
        """The request was answered from its head (a refusal): its body is read and dropped."""
        self._continue_due = False
        """A ``100 Continue`` to write once the requests ahead of this one are answered."""
        # The requests parsed and not yet answered
        self._waiting: collections.deque[tuple[Request, bool]] = collections.deque()
        self._busy = False
        """Whether a request is being answered (it is not in ``_waiting``)."""
        self._keep_alive = True
        """Whether the connection stays open after the response being made."""
        self._work: asyncio.Future[Any] | None = None
        self._started = 0.0
        self._request_line = ("-", "-")
        """The method and path of the request being answered, for the access log."""
        self._broken: AsyncServeError | None = None
        """The error to answer once the requests ahead are answered; the connection then closes."""
        self._in_parser = False
        # Timeouts, checked by the server's ticker
        self.idle_since: float | None = None
        """When the connection fell idle (``loop.time()``); None while a request is under way."""
        self.head_since: float | None = None
        """When the head being parsed began to arrive; None between requests."""
        self.body_since: float | None = None
        """When the body being read began to be expected (its head was parsed); None otherwise."""
        self.lingering_since: float | None = None
        """When the connection began closing after its last answer (``_close_after_answer``)."""
        # Reading and writing
        self.chunks_waiting = 0
        """This connection's received bytes that wait for a later turn (``ParseBudget``)."""
        self.paused_by_budget = False
        self._paused_by_pipeline = False
        self._paused_for_room = False
        """Whether the body about to come waits for room among the bodies the server holds."""
        self._receiving_bytes = 0
        """The bytes counted as held for the body being received (reserved, or counted as they came)."""
        self._room_wanted = 0
        self._held_sizes: collections.deque[int] = collections.deque()
        """The bytes held for each request parsed and not yet answered, in order."""
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._peer_done = False
        """Whether the client shut its sending side (a half-close): it reads its answers, then we close."""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        self.idle_since = self.loop.time()
        over_limit = len(self.server.connections) >= self.limits.max_connections
        self.server.connections.add(self)
        if over_limit:
            # Refused politely: an answer the client can read, then the connection closes.
            self._busy = True
            self._keep_alive = False
            self._request_line = ("-", "(a connection over the server's limit)")
            limit = self.limits.max_connections
            refusal = Unavailable(f"the server holds its limit of {limit} connections; retry later", retry_after_s=1.0)
            self._write(_error(refusal), new_request_id())

    def data_received(self, data: bytes) -> None:
        if self.lingering_since is not None:
            return  # the answer is out and the connection closing: what the client still sends is dropped
        self.idle_since = None  # busy, even while these bytes wait for their turn
        if self._budget.allows(self, data):
            self._feed(data)

    def eof_received(self) -> bool | None:
        """The client sent its end of stream: it went away, or (``answer_half_closed``) it half-closed.

        A server cannot tell the two apart: a client that closes its socket and one that only shuts its
        sending side (``shutdown(SHUT_WR)``, ``nc -N``) both send the same FIN. By default it went away,
        and its requests' work is withdrawn (clients that give up close this way; their work would
        otherwise run on until its deadline). With ``answer_half_closed``, the requests it sent are
        answered, then the connection closes.
        """
        self._peer_done = True
        in_hand = self._busy or self._waiting or self.chunks_waiting
        if self.limits.answer_half_closed and self.lingering_since is None and in_hand:
            return True  # keep the transport open to write the answers
        return None  # close: connection_lost withdraws the work under way

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server.connection_idle()
        held = sum(self._held_sizes) + self._receiving_bytes
        self._held_sizes.clear()
        self._receiving_bytes = 0
        if held:
            self.server.release(held)
        work, self._work = self._work, None
        if work is not None and not work.done():
            work.cancel()  # nobody waits for this answer any more: its rows leave the queue
        self._waiting.clear()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        # The client reads slower than we answer: read no more requests until it catches up, so that
        # answers do not pile up in the transport's buffer.
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if not self._busy and self._waiting:
            self._busy = True
            self.loop.call_soon(self._serve_next)

    # Reading

    def resume(self, data: bytes) -> None:
        """Parse bytes that waited for a turn of the loop (``ParseBudget``), and read on."""
        self.chunks_waiting -= 1
        if self.transport.is_closing():
            return  # the client went away meanwhile
        if self.paused_by_budget and not self.chunks_waiting:
            self.paused_by_budget = False
            self._update_reading()
        self._feed(data)
        if self._peer_done and not (self.chunks_waiting or self._busy or self._waiting):
            self.transport.close()  # the client's last bytes held no complete request

    def _update_reading(self) -> None:
        if self.transport.is_closing():
            return
        if self.paused_by_budget or self._paused_by_pipeline or self._writing_paused or self._paused_for_room:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _feed(self, data: bytes) -> None:
        if self._broken is not None or self.lingering_since is not None:
            return  # the connection closes once the requests ahead are answered, or is closing
        self._in_parser = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the request is answered as a plain one, and the connection closes (on_headers_complete)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, AsyncServeError):
                self._break(cause)
            else:
                logger.error("a bug while reading a request from %s", self.client, exc_info=cause or exc)
                self._break(AsyncServeError("internal server error while reading the request; see the server log"))
        except httptools.HttpParserError as exc:
            self._break(InvalidRequest(f"invalid HTTP request: {exc}"))
        finally:
            self._in_parser = False

    # Parser callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._header_count = 0
        self._header_bytes = 0
        self._repeated = None
        self._body = []
        self._body_size = 0
        self.head_since = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_url_bytes:
            raise URITooLong(f"the URL is longer than the server's limit of {self.limits.max_url_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        self._header_count += 1
        if self._header_bytes > self._max_header_bytes or self._header_count > self._max_header_count:
            self._refuse_headers()
        key = _header_names.get(name) or _header_name(name)
        headers = self._headers
        if key in headers and key in SINGLE_VALUED and self._repeated is None:
            self._repeated = key
        headers[key] = value.decode("latin-1")

    def _refuse_headers(self) -> None:
        if self._header_bytes > self._max_header_bytes:
            raise HeadersTooLarge(f"the headers are larger than the server's limit of {self._max_header_bytes} bytes")
        raise HeadersTooLarge(f"the request has more than the server's limit of {self._max_header_count} headers")

    def on_headers_complete(self) -> None:
        self.head_since = None
        self.body_since = self.loop.time()
        headers = self._headers
        if self._repeated is not None:
            raise InvalidRequest(f"the {self._repeated} header is given more than once; send it once")
        url = self._url
        path, query = _targets.get(url) or _parse_target(url)  # (the few targets a server sees are remembered)
        parser = self._parser
        # No protocol upgrades: an Upgrade request is answered as a plain one, and the connection closes
        # (the parser reads nothing after it).
        keep_alive = (
            parser.get_http_version() == "1.1"
            and parser.should_keep_alive()
            and not parser.should_upgrade()
            and not self.server.closing
        )
        method = parser.get_method()
        # The request, its body still to come (on_message_complete sets it).
        head = Request(
            _METHODS.get(method) or method.decode("ascii"), path, query, headers, b"",
            headers.get("x-request-id") or new_request_id(), time.monotonic(),
        )  # fmt: skip
        declared = self._declared_length(headers)
        too_large: PayloadTooLarge | None = None
        if declared is not None and declared > self.limits.max_body_bytes:
            too_large = PayloadTooLarge(_too_large(declared, self.limits.max_body_bytes))
        self._head = head
        self._head_keep_alive = keep_alive
        self._discard_body = False
        if not self._busy and not self._waiting:
            early = _error(too_large) if too_large else self.app.early_response(head.method, head.path, headers)
            if early is not None:
                self._answer_early(early, head, keep_alive)  # the body, if any, is read and dropped
                return
            head.screened = too_large is None
        if too_large is not None:
            raise too_large  # behind other requests: answered in turn, then the connection closes
        if "expect" in headers:
            self._expect(headers["expect"])
        if declared:
            self._reserve_room(declared)

    def _reserve_room(self, size: int) -> None:
        """Take the room a declared body needs among the bodies the server holds, or wait for it before
        reading the body: a connection that waits never holds part of a body, so waiting ends."""
        if self.server.reserve(self, size):
            self._receiving_bytes = size
        else:
            self._paused_for_room = True
            self._room_wanted = size
            self._update_reading()

    def room_granted(self) -> None:
        """The server took the room this connection waited for: read the body."""
        self._receiving_bytes, self._room_wanted = self._room_wanted, 0
        self._paused_for_room = False
        self._update_reading()

    def _declared_length(self, headers: dict[str, str]) -> int | None:
        """The body's Content-Length (None: none given), once the framing headers are checked."""
        # llhttp already refuses a request with both lengths, or two lengths, or an unknown coding
        # last; these checks state the rules where the protocol can see them.
        encoding = headers.get("transfer-encoding")
        if encoding is not None and encoding.strip().lower() != "chunked":
            raise InvalidRequest(f"Transfer-Encoding {encoding!r} is not supported; send chunked or a Content-Length")
        declared = headers.get("content-length")
        if declared is not None:
            if encoding is not None:
                raise InvalidRequest("a request cannot have both Content-Length and Transfer-Encoding")
            if not is_count(declared):
                raise InvalidRequest(f"Content-Length must be a byte count, got {declared!r}")
            return int(declared)
        return None

    def _expect(self, expectation: str) -> None:
        if expectation.strip().lower() != "100-continue":
            raise ExpectationFailed(f"Expect: {expectation!r} is not supported; only 100-continue is")
        if self._busy or self._waiting:
            self._continue_due = True  # once the requests ahead are answered
        else:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _answer_early(self, response: Response, head: Request, keep_alive: bool) -> None:
        self._discard_body = True
        # A client that waits for "100 Continue" may send its body anyway or not: close after the answer.
        self._keep_alive = keep_alive and "expect" not in head.headers
        self._busy = True
        self._started = time.perf_counter()
        self._request_line = (head.method, head.path)
        self._held_sizes.append(0)  # its body, if any, is dropped as it comes
        self.loop.call_soon(self._write, response, head.request_id)

    def on_body(self, body: bytes) -> None:
        if self._discard_body:
            return
        self._body_size += len(body)
        if self._body_size > self.limits.max_body_bytes:
            raise PayloadTooLarge(_too_large(self._body_size, self.limits.max_body_bytes))
        if self._body_size > self._receiving_bytes:  # a chunked body: counted as it comes
            self.server.hold(self._body_size - self._receiving_bytes)
            self._receiving_bytes = self._body_size
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.body_since = None
        request, self._head = self._head, None
        if request is None or self._discard_body:
            self._discard_body = False
            return
        self._held_sizes.append(self._receiving_bytes)
        self._receiving_bytes = 0
        body = self._body
        request.body = body[0] if len(body) == 1 else b"".join(body)
        self._body = []
        if self._busy or self._waiting:
            self._waiting.append((request, self._head_keep_alive))
            if len(self._waiting) >= MAX_PIPELINED and not self._paused_by_pipeline:
                self._paused_by_pipeline = True
                self._update_reading()
            return
        self._serve(request, self._head_keep_alive)

    # Answering

    def _serve(self, request: Request, keep_alive: bool) -> None:
        self._busy = True
        self._keep_alive = keep_alive
        if self.limits.access_log:  # (read by the access log only)
            self._started = time.perf_counter()
            self._request_line = (request.method, request.path)
        try:
            self._work = self.app.handle(request, self._respond)
        except Exception:  # the app answers its own errors; this is a bug in it
            logger.exception("a bug while serving request %s from %s", request.request_id, self.client)
            self._respond(_error(AsyncServeError("internal server error; see the server log")), request.request_id)

    def _respond(self, response: Response, request_id: str) -> None:
        self._work = None
        if self._in_parser:
            # A client answered at once sends its next request at once; under overload libuv would
            # then go on parsing and answering for seconds before any timer (deadlines, the lag
            # probe) or finished prediction got a turn. Answered on the next turn, each connection
            # brings at most one request per turn of the loop.
            self.loop.call_soon(self._write, response, request_id)
        else:
            self._write(response, request_id)

    def _write(self, response: Response, request_id: str) -> None:
        if self.transport.is_closing():
            return  # the client went away meanwhile
        if isinstance(response, StreamingResponse):
            self._work = self.loop.create_task(self._stream(response, request_id))
            return
        keep_alive = self._keep_alive and not self.server.closing
        body = response.body
        framing = b"content-length: %d\r\n%s" % (len(body), b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
        head = response.head(request_id)
        self.transport.write(b"".join((STATUS_LINES[response.status], self.server.date_line, head, framing, body)))
        if self.limits.access_log:
            self._log_access(response, request_id, len(body))
        self._answered(keep_alive)

    async def _stream(self, response: StreamingResponse, request_id: str) -> None:
        status_and_date = STATUS_LINES[response.status] + self.server.date_line
        self.transport.write(status_and_date + response.head(request_id) + b"transfer-encoding: chunked\r\n\r\n")
        chunks = response.chunks
        try:
            async for chunk in chunks:
                if chunk:
                    self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                if self._writing_paused:
                    await self._wait_drained()  # a slow reader pauses the producer
                if self.transport.is_closing():
                    return
            self.transport.write(b"0\r\n\r\n")
        except Exception:
            # The status line is out: all that is left is to cut the stream, which the client sees
            # as a body without its last chunk.
            logger.exception("the response stream of request %s failed; closing the connection", request_id)
            self.transport.close()
            return
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        self._work = None
        if self.limits.access_log:
            self._log_access(response, request_id, -1)
        self._answered(self._keep_alive and not self.server.closing)

    async def _wait_drained(self) -> None:
        self._drained = self.loop.create_future()
        await self._drained

    def _answered(self, keep_alive: bool) -> None:
        self._busy = False
        if self._held_sizes:
            held = self._held_sizes.popleft()
            if held:
                self.server.release(held)
        if self.server.closing:
            self.server.connection_idle()
        if not keep_alive:
            self._close_after_answer()
            return
        if self._waiting:
            if not self._writing_paused:  # else resume_writing serves it
                # On the next turn, not from here: answered at once one after the other, pipelined
                # requests would otherwise nest a call per request.
                self._busy = True
                self.loop.call_soon(self._serve_next)
            return
        if self._broken is not None:
            self._write_broken()
            return
        self._await_next_request()

    def _await_next_request(self) -> None:
        if self._peer_done and not self.chunks_waiting:
            self.transport.close()  # every request the client sent is answered (the buffer is flushed first)
            return
        if self._continue_due:
            self._continue_due = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self._head is None:
            self.idle_since = self.loop.time()

    def _close_after_answer(self) -> None:
        """Close once the client has the answer: end our side and drop what the client still sends until it
        closes too (or ``LINGER_S`` passes). Closing at once while a client still sends a body would reset
        the connection, and the client could lose the answer (a 413 sent before the body was all read)."""
        self.lingering_since = self.loop.time()
        self.idle_since = self.head_since = None
        if self.transport.can_write_eof():
            self.transport.write_eof()
            if self._paused_by_pipeline or self.paused_by_budget:
                self._paused_by_pipeline = self.paused_by_budget = False
                self.transport.resume_reading()  # read (and drop) until the client closes
        else:
            self.transport.close()  # TLS cannot half-close

    def _serve_next(self) -> None:
        if self.transport.is_closing() or not self._waiting:
            self._busy = False
            return
        request, keep_alive = self._waiting.popleft()
        if self._paused_by_pipeline and len(self._waiting) < MAX_PIPELINED // 2 and self._broken is None:
            self._paused_by_pipeline = False
            self._update_reading()
        self._serve(request, keep_alive)

    def _break(self, error: AsyncServeError) -> None:
        """The request cannot be read on: answer ``error`` once the requests ahead are answered, then close."""
        self._broken = error
        self.head_since = self.body_since = None
        self._paused_by_pipeline = True  # read nothing more
        self._update_reading()
        if not self._busy and not self._waiting:
            self._busy = True
            self.loop.call_soon(self._write_broken)

    def _write_broken(self) -> None:
        if self._broken is None or self.transport.is_closing():
            return
        self._keep_alive = False
        self._request_line = ("-", "(a request that could not be read)")
        self._write(_error(self._broken), new_request_id())

    # Timeouts and shutdown (the server calls these)

    def check_timeouts(self, now: float) -> None:
        if self.lingering_since is not None:
            if now - self.lingering_since >= LINGER_S:
                self.transport.close()
        elif self.head_since is not None and now - self.head_since >= self.limits.head_timeout_s:
            self._break(RequestTimeout(f"the request head did not arrive within {self.limits.head_timeout_s:g} s"))
        elif self.body_since is not None and now - self.body_since >= self.limits.body_timeout_s:
            self._break(RequestTimeout(f"the request body did not arrive within {self.limits.body_timeout_s:g} s"))
        elif self.idle_since is not None and now - self.idle_since >= self.limits.keep_alive_s:
            self.transport.close()

    def shutdown(self) -> None:
        """Stop taking requests: close now if idle, else after the response under way."""
        if not self._busy and not self._waiting and self._head is None and self.lingering_since is None:
            self.transport.close()

    def abort(self) -> None:
        """Past the grace period: cancel the work under way and close."""
        if self._work is not None and not self._work.done():
            self._work.cancel()
        self.transport.close()

    @property
    def busy(self) -> bool:
        return self._busy or bool(self._waiting)

    def _log_access(self, response: Response, request_id: str, size: int) -> None:
        method, path = self._request_line
        took_ms = (time.perf_counter() - self._started) * 1000
        status = response.status
        access_logger.info(
            '%s "%s %s" %d %s %.1fms', self.client, method, path, status, "-" if size < 0 else size, took_ms,
            extra={
                "request_id": request_id, "client": self.client, "method": method, "path": path, "status": status,
                "bytes": size if size >= 0 else None, "duration_ms": round(took_ms, 3), "model": _model_in(path),
                "code": _error_code(response),
            },
        )  # fmt: skip


_MODEL_IN_PATH = re.compile(r"/v[12]/models/([^/]+)")


def _model_in(path: str) -> str | None:
    """The model a path names (``/v2/models/iris/infer``: ``iris``), for the access log."""
    found = _MODEL_IN_PATH.match(path)
    return None if found is None else urllib.parse.unquote(found.group(1))


def _error_code(response: Response) -> str | None:
    """The machine code of an error answer (its JSON body's ``code``), for the access log."""
    if response.status < 400 or isinstance(response, StreamingResponse) or response.content_type != JSON_TYPE:
        return None
    try:
        code = orjson.loads(response.body).get("code")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return code if isinstance(code, str) else None


class BudgetedConnection(Protocol):
    """What ParseBudget needs of a connection (HTTP/1.1's, or gRPC's HTTP/2): its bytes wait, then resume."""

    chunks_waiting: int
    paused_by_budget: bool

    @property
    def transport(self) -> asyncio.Transport | None: ...

    def resume(self, data: bytes) -> None: ...


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
        self._waiting: collections.deque[tuple[BudgetedConnection, bytes]] = collections.deque()

    def holding(self) -> bool:
        """Whether bytes received wait for a later turn: requests are in that the loop has yet to parse."""
        return bool(self._waiting)

    def allows(self, protocol: BudgetedConnection, data: bytes) -> bool:
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
            protocol.paused_by_budget = True
            if protocol.transport is not None:
                protocol.transport.pause_reading()
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


TARGETS_KEPT = 256
"""Request targets whose parse is remembered (a server sees few); past that, the memory starts afresh."""

_targets: dict[bytes, tuple[str, str]] = {}


def _parse_target(url: bytes) -> tuple[str, str]:
    """The path and query (without ``?``) of a request target, as sent; InvalidRequest if it is none."""
    known = _targets.get(url)
    if known is not None:
        return known
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        raise InvalidRequest(f"invalid request target {url[:100]!r}") from None
    target = parsed.path.decode("latin-1"), parsed.query.decode("latin-1") if parsed.query else ""
    if len(_targets) >= TARGETS_KEPT:
        _targets.clear()
    _targets[url] = target
    return target


HEADER_NAMES_KEPT = 256
"""Header names whose lower-case text is remembered (a server sees few); past that, the memory starts afresh."""

_header_names: dict[bytes, str] = {}


def _header_name(name: bytes) -> str:
    """A header's name as the headers dict keys it (lower case), remembered for the next request."""
    key = name.decode("latin-1").lower()
    if len(_header_names) >= HEADER_NAMES_KEPT:
        _header_names.clear()
    _header_names[name] = key
    return key


_METHODS = {method.encode(): method for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}
"""The usual request methods' text, found without decoding."""


SINGLE_VALUED = frozenset({
    "authorization", "content-type", "expect", "host", "idempotency-key", "inference-header-content-length",
    "prefer", "x-api-key", "x-priority", "x-request-id", "x-request-timeout",
})  # fmt: skip
"""Headers a request may send once: given twice, which one counts would be a guess."""


def _too_large(size: int, limit: int) -> str:
    return f"the request body has {size} bytes or more, over the server's limit of {limit}; send smaller batches"


def _error(error: AsyncServeError) -> Response:
    return Response.json(error.to_dict(), error.status_code, error.headers())
