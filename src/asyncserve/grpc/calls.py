"""gRPC calls over HTTP/2 streams: the gRPC wire format (grpc/doc/PROTOCOL-HTTP2.md) around a servicer.

A :class:`Methods` table maps each ``:path`` to a servicer method, its request message and its
shape (unary or streaming, each way). For each request stream, :meth:`Methods.open_stream` checks
the request's headers and makes a :class:`Call`, which collects the length-prefixed messages,
runs the servicer method in a task, and sends its answer: response headers, messages, then
trailers with ``grpc-status``. A servicer method receives the Call as its context: the time left
before the call's deadline (``grpc-timeout``), its metadata, and :class:`GrpcError` to end it with
a status.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, NamedTuple

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from asyncserve.grpc import http2
from asyncserve.grpc.http2 import Connection, Headers, Stream
from asyncserve.grpc.status import GrpcError, StatusCode

logger = logging.getLogger(__name__)

ACCEPTED_ENCODINGS = b"identity,deflate,gzip"
RESPONSE_HEADERS = (
    b"\x88"  # :status 200, static table entry 8
    + http2.literal_header(b"content-type", b"application/grpc")
    + http2.literal_header(b"grpc-accept-encoding", ACCEPTED_ENCODINGS)
)
TRAILERS_OK = http2.literal_header(b"grpc-status", b"0")
TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
TRANSPORT_HEADERS = frozenset(
    (b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding", b"content-length")
)
"""Request headers that are the transport's, not the call's metadata."""


def message_frame(payload: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def status_block(
    code: StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = (), *, with_headers: bool = False
) -> bytes:
    """Trailers (or, ``with_headers``, a whole trailers-only response) ending a call with ``code``."""
    block = RESPONSE_HEADERS if with_headers else b""
    block += http2.literal_header(b"grpc-status", b"%d" % code)
    if message:  # percent-encoded as the protocol says: UTF-8, then every byte outside 0x20-0x7E, and '%'
        block += http2.literal_header(
            b"grpc-message", urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()
        )
    for name, value in trailers:
        block += http2.literal_header(name.lower().encode("latin-1"), value.encode("latin-1"))
    return block


def parse_timeout(value: bytes) -> float:
    """Seconds from a ``grpc-timeout`` header: at most 8 digits and a unit (H, M, S, m, u, n)."""
    unit = TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        raise GrpcError(StatusCode.INTERNAL, f"malformed grpc-timeout {value.decode('latin-1')!r}")
    return int(digits) * unit


class Deferred(NamedTuple):
    """A unary method's answer that is not ready: ``finish(future)`` makes the response once ``future``
    is done, or raises what ends the call. Cancelling ``future`` abandons the work.

    A method that returns one runs without a task of its own: its checks and the start of its work
    happen in the turn of the loop that received the request, as an HTTP request's do.
    """

    future: asyncio.Future[Any]
    finish: Callable[[asyncio.Future[Any]], Message | bytes]
    """Makes the response: a message, or a message already serialized."""


@dataclass(slots=True)
class RequestHead:
    """What a call's request headers say."""

    method: bytes = b""
    path: bytes = b""
    content_type: bytes = b""
    timeout: bytes = b""
    encoding: bytes = b""
    metadata: list[tuple[bytes, bytes]] = field(default_factory=list)

    @classmethod
    def parse(cls, headers: Headers) -> RequestHead:
        head = cls()
        for name, value in headers:
            if name == b":path":
                head.path = value
            elif name == b":method":
                head.method = value
            elif name == b"content-type":
                head.content_type = value
            elif name == b"grpc-timeout":
                head.timeout = value
            elif name == b"grpc-encoding":
                head.encoding = value
            elif name[:1] != b":" and name not in TRANSPORT_HEADERS:
                head.metadata.append((name, value))
        return head


@dataclass(frozen=True, slots=True)
class Method:
    """One method of a service: what its ``:path`` calls, what it reads, whether it streams each way."""

    name: str
    handler: Callable[..., Any]
    request_type: type[Message]
    client_streaming: bool
    server_streaming: bool


class Methods:
    """The methods of each service, by ``:path``: ``(service descriptor, servicer, its message module)``.

    A method the servicer does not define is not served (UNIMPLEMENTED, as for an unknown path).
    """

    def __init__(
        self, services: Sequence[tuple[ServiceDescriptor, object, ModuleType]], *, max_message_bytes: int
    ) -> None:
        self.by_path: dict[bytes, Method] = {}
        for service, servicer, messages in services:
            for method in service.methods:
                handler = getattr(servicer, method.name, None)
                if handler is None:
                    continue
                path = f"/{service.full_name}/{method.name}".encode()
                self.by_path[path] = Method(
                    method.name, handler, getattr(messages, method.input_type.name),
                    method.client_streaming, method.server_streaming,
                )  # fmt: skip
        self.max_message_bytes = max_message_bytes
        self._understood: dict[int, tuple[Headers, RequestHead, Method]] = {}
        self.calls: set[Call] = set()
        """Calls whose servicer method runs."""
        self.idle = asyncio.Event()
        self.idle.set()

    def open_stream(self, connection: Connection, stream: Stream, headers: Headers) -> Call | None:
        """The Call for a new request stream, or None when the request was answered (refused) at once."""
        try:
            head, method = self._understand(headers)
            deadline = connection.loop.time() + parse_timeout(head.timeout) if head.timeout else None
        except GrpcError as exc:
            connection.end_with(stream, status_block(exc.code, exc.message, exc.trailers, with_headers=True))
            return None
        return Call(self, connection, stream, method, head.metadata, deadline, head.encoding)

    def _understand(self, headers: Headers) -> tuple[RequestHead, Method]:
        """The request's head and method. A connection hands the same list for the same header block
        (``Connection._decode``), so what a list says is kept while the list is (by identity)."""
        known = self._understood.get(id(headers))
        if known is not None and known[0] is headers:
            return known[1], known[2]
        head = RequestHead.parse(headers)
        method = self._method(head)
        if len(self._understood) >= 256:
            self._understood.clear()
        self._understood[id(headers)] = (headers, head, method)
        return head, method

    def _method(self, head: RequestHead) -> Method:
        if head.method != b"POST":
            raise GrpcError(
                StatusCode.UNIMPLEMENTED, f"gRPC calls are POST requests, not {head.method.decode('latin-1')}"
            )
        if not head.content_type.startswith(b"application/grpc"):
            content_type = head.content_type.decode("latin-1")
            raise GrpcError(StatusCode.UNKNOWN, f"content-type {content_type!r} is not gRPC's: send application/grpc")
        method = self.by_path.get(head.path)
        if method is None:
            raise GrpcError(StatusCode.UNIMPLEMENTED, f"unknown method {head.path.decode('latin-1')}")
        if head.encoding not in (b"", b"identity", b"gzip", b"deflate"):
            raise GrpcError(
                StatusCode.UNIMPLEMENTED,
                f"grpc-encoding {head.encoding.decode('latin-1')!r} is not supported: use identity, deflate or gzip",
                (("grpc-accept-encoding", ACCEPTED_ENCODINGS.decode()),),
            )
        return method

    def started(self, call: Call) -> None:
        self.calls.add(call)
        self.idle.clear()

    def finished(self, call: Call) -> None:
        self.calls.discard(call)
        if not self.calls:
            self.idle.set()


END = object()
"""Put in a streaming call's inbox when the client has sent its last message."""


class Call:
    """One gRPC call: the context a servicer method receives, and its stream's handler."""

    __slots__ = (
        "_deadline_passed", "_encoding", "_ended", "_headers_sent", "_inbox", "_metadata", "_needed", "_received",
        "_received_bytes", "_task", "_timer", "_waiting", "connection", "deadline", "method", "methods", "stream",
    )  # fmt: skip

    def __init__(
        self, methods: Methods, connection: Connection, stream: Stream, method: Method,
        metadata: Sequence[tuple[bytes, bytes]], deadline: float | None, encoding: bytes,
    ) -> None:  # fmt: skip
        self.methods = methods
        self.connection = connection
        self.stream = stream
        self.method = method
        self._metadata = metadata
        self.deadline = deadline  # the loop time at which the client stops waiting (grpc-timeout), or None
        self._encoding = encoding
        self._received: list[bytes] = []
        self._received_bytes = 0
        self._needed = 5  # streaming: bytes to receive before the next message (or its prefix) is complete
        self._inbox: asyncio.Queue[Any] | None = asyncio.Queue() if method.client_streaming else None
        self._task: asyncio.Task[None] | None = None
        self._waiting: Deferred | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline_passed = False
        self._headers_sent = False
        self._ended = False
        if method.client_streaming:
            self._start(self._requests())

    # The servicer's view

    def time_remaining(self) -> float | None:
        """Seconds until the call's deadline, or None when the client set none."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self.connection.loop.time())

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The call's metadata: ``-bin`` keys with their values base64-decoded, others as text."""
        items: list[tuple[str, str | bytes]] = []
        for name, value in self._metadata:
            key = name.decode("latin-1")
            if key.endswith("-bin"):
                with contextlib.suppress(ValueError):
                    items.append((key, base64.b64decode(value + b"==")))
            else:
                items.append((key, value.decode("latin-1")))
        return tuple(items)

    # The stream's events

    def data(self, chunk: bytes) -> None:
        self._received.append(chunk)
        self._received_bytes += len(chunk)
        if self._inbox is None:
            self.connection.read(self.stream, len(chunk))
            if self._received_bytes > self.methods.max_message_bytes + 5:
                self._refuse(GrpcError(StatusCode.RESOURCE_EXHAUSTED, self._too_large(self._received_bytes - 5)))
        elif self._received_bytes >= self._needed:
            self._take_messages()

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._inbox is not None:
            self._take_messages()
            if self._received_bytes:
                self._refuse(GrpcError(StatusCode.INTERNAL, "the request ended inside a message"))
                return
            self._inbox.put_nowait(END)
            return
        try:
            messages = self._messages(b"".join(self._received) if len(self._received) != 1 else self._received[0])
            if len(messages) != 1:
                raise GrpcError(
                    StatusCode.UNIMPLEMENTED, f"{self.method.name} takes one request message, got {len(messages)}"
                )
            request = messages[0]
        except GrpcError as exc:
            self._refuse(exc)
            return
        self._received = []
        self._start(request)

    def reset(self) -> None:
        """The client reset the stream, or the connection closed: the servicer method is cancelled."""
        self._ended = True
        self._cancel()
        if self._inbox is not None:
            self._inbox.put_nowait(END)

    # Running the method

    def _start(self, request: Any) -> None:
        loop = self.connection.loop
        if self.method.client_streaming or self.method.server_streaming:
            self._task = loop.create_task(self._run(request))
        else:
            try:
                result = self.method.handler(request, self)
            except BaseException as exc:
                self._failed(exc)
                return
            if isinstance(result, Deferred):
                self._waiting = result
                result.future.add_done_callback(self._deferred_done)
            elif isinstance(result, Message):
                self._respond(result)
                return
            else:  # a coroutine
                self._task = loop.create_task(self._run_unary(result))
        self.methods.started(self)
        if self.deadline is not None:
            self._timer = loop.call_at(self.deadline, self._deadline)

    def _deferred_done(self, future: asyncio.Future[Any]) -> None:
        waiting, self._waiting = self._waiting, None
        assert waiting is not None
        try:
            self._respond(waiting.finish(future))
        except BaseException as exc:
            self._failed(exc)
        finally:
            self._done()

    async def _run_unary(self, coroutine: Awaitable[Message]) -> None:
        try:
            self._respond(await coroutine)
        except BaseException as exc:
            self._failed(exc)
        finally:
            self._done()

    def _respond(self, response: Message | bytes) -> None:
        serialized = response if isinstance(response, bytes) else response.SerializeToString()
        self.connection.respond(self.stream, RESPONSE_HEADERS, message_frame(serialized), TRAILERS_OK)

    def _failed(self, exc: BaseException) -> None:
        """End the call with what its method raised: a GrpcError's status, DEADLINE_EXCEEDED for the deadline's
        cancellation, a reset for the client's, INTERNAL (logged with its traceback) for a bug."""
        with_headers = not self._headers_sent
        if isinstance(exc, GrpcError):
            self._finish(status_block(exc.code, exc.message, exc.trailers, with_headers=with_headers))
        elif isinstance(exc, asyncio.CancelledError):
            if self._deadline_passed:
                self._finish(status_block(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", with_headers=with_headers))
            elif not self.stream.local_closed:
                self.connection.reset(self.stream)
        elif isinstance(exc, Exception):
            logger.error("gRPC %s: unexpected error", self.method.name, exc_info=exc)
            message = f"internal server error; the server log has the details (gRPC {self.method.name})"
            self._finish(status_block(StatusCode.INTERNAL, message, with_headers=with_headers))
        else:
            raise exc  # KeyboardInterrupt and the like are not the call's

    def _done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.methods.finished(self)

    async def _run(self, request: Any) -> None:
        method = self.method
        try:
            if method.server_streaming:
                async with contextlib.aclosing(method.handler(request, self)) as responses:
                    async for response in responses:
                        await self._send(response)
            else:  # client streaming only
                response = await method.handler(request, self)
                await self._send(response)
            if not self.stream.local_closed:
                self._finish(TRAILERS_OK)
        except BaseException as exc:  # the task ends here: a cancellation is the call's (the server cancels calls)
            self._failed(exc)
        finally:
            self._done()

    async def _requests(self) -> AsyncIterator[Any]:
        assert self._inbox is not None
        while True:
            item = await self._inbox.get()
            if item is END:
                return
            request, size = item
            self.connection.read(self.stream, size)
            yield request

    async def _send(self, response: Message) -> None:
        if self.stream.local_closed:
            raise asyncio.CancelledError  # the client reset the stream
        headers = None
        if not self._headers_sent:
            headers, self._headers_sent = RESPONSE_HEADERS, True
        self.connection.respond(self.stream, headers, message_frame(response.SerializeToString()), None)
        await self.connection.sent(self.stream)

    def _finish(self, block: bytes) -> None:
        self.connection.end_with(self.stream, block)

    def _refuse(self, error: GrpcError) -> None:
        """End the call before (or instead of) its method: the status, and the task cancelled if it runs."""
        self._ended = True
        self._received = []
        self._cancel()
        self._finish(status_block(error.code, error.message, error.trailers, with_headers=not self._headers_sent))

    def _deadline(self) -> None:
        self._timer = None
        self._deadline_passed = self._cancel()

    def _cancel(self) -> bool:
        """Cancel the method's task or deferred work; whether there was any to cancel."""
        if self._task is not None and not self._task.done():
            return self._task.cancel()
        if self._waiting is not None and not self._waiting.future.done():
            return self._waiting.future.cancel()
        return False

    # Messages

    def _take_messages(self) -> None:
        """Streaming: every complete message received goes to the inbox, in order."""
        assert self._inbox is not None
        buffered = b"".join(self._received)
        position = 0
        try:
            while len(buffered) - position >= 5:
                size = int.from_bytes(buffered[position + 1 : position + 5], "big")
                if size > self.methods.max_message_bytes:
                    raise GrpcError(StatusCode.RESOURCE_EXHAUSTED, self._too_large(size))
                end = position + 5 + size
                if end > len(buffered):
                    self._needed = end - position
                    break
                self._needed = 5
                message = self._message(buffered[position], buffered[position + 5 : end])
                self._inbox.put_nowait((message, end - position))
                position = end
        except GrpcError as exc:
            self._refuse(exc)
            return
        rest = buffered[position:]
        self._received = [rest] if rest else []
        self._received_bytes = len(rest)

    def _messages(self, data: bytes) -> list[Any]:
        if len(data) - 5 == int.from_bytes(data[1:5], "big") <= self.methods.max_message_bytes:
            return [self._message(data[0], data[5:])]  # one message: a unary call's request
        messages, position = [], 0
        while position < len(data):
            if len(data) - position < 5:
                raise GrpcError(StatusCode.INTERNAL, "the request ended inside a message's 5-byte prefix")
            size = int.from_bytes(data[position + 1 : position + 5], "big")
            if size > self.methods.max_message_bytes:
                raise GrpcError(StatusCode.RESOURCE_EXHAUSTED, self._too_large(size))
            end = position + 5 + size
            if end > len(data):
                raise GrpcError(StatusCode.INTERNAL, "the request ended inside a message")
            messages.append(self._message(data[position], data[position + 5 : end]))
            position = end
        return messages

    def _message(self, compressed: int, payload: bytes) -> Any:
        if compressed:
            payload = self._decompress(payload)
        try:
            return self.method.request_type.FromString(payload)
        except DecodeError as exc:
            raise GrpcError(
                StatusCode.INTERNAL, f"the request is not a valid {self.method.request_type.DESCRIPTOR.name}: {exc}"
            ) from None

    def _decompress(self, payload: bytes) -> bytes:
        if self._encoding in (b"", b"identity"):
            raise GrpcError(StatusCode.INTERNAL, "a message is flagged compressed but the call has no grpc-encoding")
        limit = self.methods.max_message_bytes
        decompressor = zlib.decompressobj(wbits=31 if self._encoding == b"gzip" else 15)
        try:
            data = decompressor.decompress(payload, limit + 1)
        except zlib.error as exc:
            raise GrpcError(
                StatusCode.INTERNAL, f"a {self._encoding.decode()} message does not decompress: {exc}"
            ) from None
        if len(data) > limit or decompressor.unconsumed_tail:
            raise GrpcError(StatusCode.RESOURCE_EXHAUSTED, self._too_large(len(data)))
        return data

    def _too_large(self, size: int) -> str:
        return (
            f"a request message of {size} bytes exceeds the server's {self.methods.max_message_bytes} "
            "(--max-body-bytes); send smaller requests"
        )
