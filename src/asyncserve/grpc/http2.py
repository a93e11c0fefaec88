"""HTTP/2 server connections (RFC 9113), as much of the protocol as gRPC uses.

Why not a library: the h2 package's state machine costs about 115 µs of CPU per unary call on
this project's machines (measured in-process, without sockets), more than asyncserve's whole
HTTP/1.1 request; grpc.aio costs about 180 µs per call across its threads. This connection does
what a gRPC server needs and no more (no server push, no priorities, no HTTP/1.1 upgrade), keeps
flow control and the frame rules of the RFC, and decodes header blocks with ``hpack``. Our own
header blocks use no dynamic table: they are literals, so encoding them keeps no state.

A :class:`Connection` owns the frames; each request stream gets a :class:`Stream`, and the
``open_stream`` callback given to the connection returns the :class:`StreamHandler` that hears
the stream's data, its end, or its reset (``asyncserve.grpc.calls`` is the gRPC one).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import hpack

from asyncserve.http.protocol import ParseBudget

logger = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9

HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
DEFAULT_FRAME_SIZE = 16_384
MAX_FRAME_SIZE_LIMIT = 2**24 - 1

FRAME_HEAD = struct.Struct(">IBI")
"""A frame's 9-byte head, read as (length << 8 | type, flags, stream id)."""

Headers = list[tuple[bytes, bytes]]


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return FRAME_HEAD.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def header_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """A header block as HEADERS, then CONTINUATION frames where it is longer than ``max_frame``."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return frame(HEADERS, flags | END_HEADERS, stream_id, block)
    chunks = [block[at : at + max_frame] for at in range(0, len(block), max_frame)]
    frames = [frame(HEADERS, flags, stream_id, chunks[0])]
    frames += [frame(CONTINUATION, 0, stream_id, chunk) for chunk in chunks[1:-1]]
    frames.append(frame(CONTINUATION, END_HEADERS, stream_id, chunks[-1]))
    return b"".join(frames)


def literal_header(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing and a new name (RFC 7541 6.2.2), no Huffman coding."""
    return b"\x00" + _string(name) + _string(value)


def _string(value: bytes) -> bytes:
    return _integer(len(value), 7) + value


def _integer(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    encoded = bytearray((limit,))
    value -= limit
    while value >= 128:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def changes_table(block: bytes) -> bool:
    """Whether a (valid) header block adds to the HPACK dynamic table or resizes it (RFC 7541 6).

    A block that does neither decodes the same until another block changes the table, so its
    decoding can be kept: clients send the same block for call after call.
    """
    position, size = 0, len(block)
    while position < size:
        first = block[position]
        if first & 0x80:  # an indexed field
            position = _skip_integer(block, position, 0x7F)
        elif first & 0xC0 == 0x40 or first & 0xE0 == 0x20:  # indexed literal, or a table size update
            return True
        else:  # a literal without indexing or never indexed: a name index or name, then a value
            name_is_literal = first & 0x0F == 0
            position = _skip_integer(block, position, 0x0F)
            if name_is_literal:
                position = _skip_string(block, position)
            position = _skip_string(block, position)
    return False


def _skip_integer(block: bytes, position: int, mask: int) -> int:
    """The position after the integer at ``position`` whose prefix is ``mask``'s bits."""
    if block[position] & mask != mask:
        return position + 1
    position += 1
    while block[position] & 0x80:
        position += 1
    return position + 1


def _skip_string(block: bytes, position: int) -> int:
    length, mask, after = block[position] & 0x7F, 0x7F, position + 1
    if length == mask:
        length, shift = mask, 0
        while True:
            byte = block[after]
            after += 1
            length += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
    return after + length


class ConnectionError_(Exception):
    """Ends the connection with a GOAWAY carrying ``code`` and ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StreamError(Exception):
    """Resets one stream with ``code``; the connection goes on."""

    def __init__(self, stream_id: int, code: int, message: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.code = code


@dataclass(frozen=True)
class Http2Limits:
    """What a connection advertises and enforces."""

    max_concurrent_streams: int = 1000
    stream_window: int = 1 << 20
    """Bytes a client may send on one stream before the server reads them (its receive window)."""
    connection_window: int = 16 << 20
    max_frame_size: int = 1 << 20
    max_header_list_size: int = 16 << 10
    preface_timeout_s: float = 10.0
    """A connection that has not sent the HTTP/2 preface and its SETTINGS by then is closed."""


class StreamHandler(Protocol):
    """What a stream tells the layer above: its data, its end, and its reset."""

    def data(self, chunk: bytes) -> None: ...

    def end(self) -> None: ...

    def reset(self) -> None: ...


class Stream:
    """One request stream: its flow-control windows and what waits for them."""

    __slots__ = (
        "handler",
        "id",
        "local_closed",
        "pending",
        "receive_window",
        "remote_closed",
        "send_window",
        "unacknowledged",
        "unblocked",
    )  # fmt: skip

    def __init__(self, stream_id: int, send_window: int, receive_window: int) -> None:
        self.id = stream_id
        self.handler: StreamHandler | None = None
        self.send_window = send_window
        self.receive_window = receive_window
        self.unacknowledged = 0
        """Bytes the layer above has read that no WINDOW_UPDATE has given back yet."""
        self.remote_closed = False
        """The client sent END_STREAM (or reset the stream)."""
        self.local_closed = False
        """The server sent END_STREAM (or reset the stream)."""
        self.pending: collections.deque[tuple[bytes, bytes | None]] = collections.deque()
        """Data waiting for flow-control window, each with the trailers to send after it (or None)."""
        self.unblocked: asyncio.Future[None] | None = None


OpenStream = Callable[["Connection", Stream, Headers], "StreamHandler | None"]
"""Called with a new stream's request headers: the stream's handler, or None when it answered at once."""


class Connection(asyncio.Protocol):
    """One client's HTTP/2 connection: frames in, frames out, flow control both ways."""

    def __init__(
        self, open_stream: OpenStream, limits: Http2Limits, on_close: Callable[[Connection], None],
        budget: ParseBudget | None = None,
    ) -> None:  # fmt: skip
        self.open_stream = open_stream
        self.budget = budget
        """Caps the time a turn of the loop spends on incoming frames, as for HTTP/1.1 (``ParseBudget``)."""
        self.chunks_waiting = 0
        self.paused_by_budget = False
        self.limits = limits
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.last_stream_id = 0
        self.closed = False
        self.draining = False
        """A GOAWAY was sent: no new stream is opened; the connection closes when the last one ends."""
        self._buffer = bytearray()
        self._preface_seen = False
        self._settings_seen = False
        self._preface_timer: asyncio.TimerHandle | None = None
        self._receiving = False
        self._out: list[bytes] = []
        self._headers_open: tuple[int, int, bytearray] | None = None
        """A header block awaiting its CONTINUATION frames: (stream id, HEADERS flags, fragments)."""
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = limits.max_header_list_size
        self._decoded: dict[bytes, Headers] = {}
        """Header blocks of one-byte indexed fields only, decoded: they leave the HPACK table unchanged."""
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_FRAME_SIZE
        self.send_window = DEFAULT_WINDOW
        self._receive_window = DEFAULT_WINDOW
        self._blocked: dict[int, Stream] = {}
        self._writable: asyncio.Future[None] | None = None
        self.loop = asyncio.get_running_loop()
        self._handlers: dict[int, Callable[[int, int, bytes], None]] = {
            DATA: self._data, HEADERS: self._headers, CONTINUATION: self._continuation,
            WINDOW_UPDATE: self._window_update, SETTINGS: self._settings, PING: self._ping,
            RST_STREAM: self._rst_stream, GOAWAY: self._goaway, PRIORITY: self._priority,
            PUSH_PROMISE: self._push_promise,
        }  # fmt: skip

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._preface_timer = self.loop.call_later(self.limits.preface_timeout_s, self._preface_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._preface_timer is not None:
            self._preface_timer.cancel()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            self._wake(stream)
            handler, stream.handler = stream.handler, None
            if handler is not None:
                handler.reset()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self.on_close(self)

    def pause_writing(self) -> None:
        # A client that does not read its answers gets no more requests read: what waits to be sent
        # stays bounded by the transport's high-water mark and the calls under way.
        if self._writable is None or self._writable.done():
            self._writable = self.loop.create_future()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self.transport is not None and not self.closed and not self.paused_by_budget:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed or (self.budget is not None and not self.budget.allows(self, data)):
            return
        self._take(data)

    def resume(self, data: bytes) -> None:
        """Frames that waited for a turn of the loop (``ParseBudget``), then read on."""
        self.chunks_waiting -= 1
        if self.closed:
            return
        if self.paused_by_budget and not self.chunks_waiting:
            self.paused_by_budget = False
            if self.transport is not None and (self._writable is None or self._writable.done()):
                self.transport.resume_reading()
        self._take(data)

    def _take(self, data: bytes) -> None:
        self._receiving = True
        try:
            self._receive(data)
        except ConnectionError_ as exc:
            self._fail(exc.code, exc.message)
        except Exception:  # a bug of ours: the client hears INTERNAL_ERROR, the log gets the traceback
            logger.exception("gRPC connection failed on an unexpected error")
            self._fail(INTERNAL_ERROR, "internal error; the server log has the details")
        finally:
            self._receiving = False
            if self._out and self.transport is not None and not self.closed:
                out, self._out = self._out, []
                self.transport.write(b"".join(out))

    # Receiving

    def _receive(self, data: bytes) -> None:
        if self._buffer:
            self._buffer += data
            data = bytes(self._buffer)
            self._buffer.clear()
        position, size = 0, len(data)
        if not self._preface_seen:
            if not self._preface(data):
                return
            position = len(PREFACE)
        max_frame = self.limits.max_frame_size
        while size - position >= 9:
            length_kind, flags, stream_id = FRAME_HEAD.unpack_from(data, position)
            length, kind = length_kind >> 8, length_kind & 0xFF
            if length > max_frame:
                raise ConnectionError_(FRAME_SIZE_ERROR, f"a frame of {length} bytes exceeds {max_frame}")
            end = position + 9 + length
            if end > size:
                break
            payload = data[position + 9 : end]
            position = end
            try:
                self._frame(kind, flags, stream_id & MAX_WINDOW, payload)
            except StreamError as exc:
                self._reset(exc.stream_id, exc.code)
            if self.closed:
                return
        if position < size:
            self._buffer += data[position:]

    def _preface(self, data: bytes) -> bool:
        """Whether ``data`` begins with the client preface; if not whole yet, it is kept for more."""
        if len(data) >= len(PREFACE) and data.startswith(PREFACE):
            self._preface_seen = True
            self._send_preface()
            return True
        if PREFACE.startswith(data[: len(PREFACE)]):
            self._buffer += data
        else:
            self._not_http2(data)
        return False

    def _send_preface(self) -> None:
        """The server's preface (our SETTINGS), and the connection's receive window raised to ours."""
        limits = self.limits
        settings = struct.pack(
            ">HIHIHIHIHI",
            ENABLE_PUSH, 0,
            MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams,
            INITIAL_WINDOW_SIZE, limits.stream_window,
            MAX_FRAME_SIZE, limits.max_frame_size,
            MAX_HEADER_LIST_SIZE, limits.max_header_list_size,
        )  # fmt: skip
        raise_window = limits.connection_window - DEFAULT_WINDOW
        self._receive_window = limits.connection_window
        self._out.append(frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, raise_window.to_bytes(4, "big")))

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._headers_open is not None and (kind != CONTINUATION or stream_id != self._headers_open[0]):
            raise ConnectionError_(PROTOCOL_ERROR, "a header block was interrupted before its END_HEADERS")
        if not self._settings_seen and kind != SETTINGS:
            raise ConnectionError_(PROTOCOL_ERROR, "the connection must begin with a SETTINGS frame")
        handle = self._handlers.get(kind)
        if handle is not None:  # frames of unknown types are ignored (RFC 9113 4.1)
            handle(flags, stream_id, payload)

    def _goaway(self, flags: int, stream_id: int, payload: bytes) -> None:
        self.draining = True
        self._close_if_done()

    @staticmethod
    def _priority(flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "a PRIORITY frame on stream 0")
        if len(payload) != 5:
            raise StreamError(stream_id, FRAME_SIZE_ERROR, "a PRIORITY frame is 5 bytes")

    @staticmethod
    def _push_promise(flags: int, stream_id: int, payload: bytes) -> None:
        raise ConnectionError_(PROTOCOL_ERROR, "a client may not send PUSH_PROMISE")

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "a DATA frame on stream 0")
        length = len(payload)
        self._take_from_connection_window(length)
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, f"DATA on stream {stream_id}, which was never opened")
            return  # a stream the server has answered or reset: what the client sent meanwhile is dropped
        if stream.remote_closed:
            raise StreamError(stream_id, STREAM_CLOSED, f"DATA on stream {stream_id} after its END_STREAM")
        stream.receive_window -= length
        if stream.receive_window < 0:
            raise StreamError(stream_id, FLOW_CONTROL_ERROR, "the client sent more than the stream's window")
        if flags & PADDED:
            payload = self._unpad(stream_id, payload)
        if stream.handler is not None and payload:
            stream.handler.data(payload)
        if flags & END_STREAM:
            self._remote_end(stream)

    def _take_from_connection_window(self, length: int) -> None:
        """Count received data against the connection's window, and open it again once half is used.

        The connection's window is given back at once: the streams' windows bound what is held.
        """
        self._receive_window -= length
        if self._receive_window < 0:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "the client sent more than the connection's window")
        if self._receive_window < self.limits.connection_window // 2:
            increment = self.limits.connection_window - self._receive_window
            self._out.append(frame(WINDOW_UPDATE, 0, 0, increment.to_bytes(4, "big")))
            self._receive_window = self.limits.connection_window

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "a HEADERS frame on stream 0")
        if flags & PADDED:
            payload = self._unpad(stream_id, payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, payload)
        else:
            self._headers_open = (stream_id, flags, bytearray(payload))

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._headers_open is None:
            raise ConnectionError_(PROTOCOL_ERROR, "a CONTINUATION frame without a header block before it")
        _, header_flags, fragments = self._headers_open
        fragments += payload
        if len(fragments) > self.limits.max_header_list_size * 2:
            raise ConnectionError_(PROTOCOL_ERROR, "a header block larger than the connection allows")
        if flags & END_HEADERS:
            self._headers_open = None
            self._header_block(stream_id, header_flags, bytes(fragments))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)  # always decoded, even when refused: HPACK's table must stay in step
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client: gRPC clients send none; they may only end the stream
            if stream.remote_closed or not flags & END_STREAM:
                raise StreamError(stream_id, PROTOCOL_ERROR, "a second header block that does not end the stream")
            self._remote_end(stream)
            return
        if stream_id <= self.last_stream_id or stream_id % 2 == 0:
            raise ConnectionError_(PROTOCOL_ERROR, f"stream {stream_id} is not a new client stream")
        self.last_stream_id = stream_id
        if self.draining:
            self._reset(stream_id, REFUSED_STREAM)
            return
        if len(self.streams) >= self.limits.max_concurrent_streams:
            self._reset(stream_id, REFUSED_STREAM)
            return
        stream = Stream(stream_id, self._peer_initial_window, self.limits.stream_window)
        self.streams[stream_id] = stream
        ended = stream.remote_closed = bool(flags & END_STREAM)  # before the handler, which may answer at once
        stream.handler = self.open_stream(self, stream, headers)
        if ended:
            if stream.handler is not None:
                stream.handler.end()
            if stream.local_closed:
                self._forget(stream)

    def _decode(self, block: bytes) -> Headers:
        decoded = self._decoded.get(block)
        if decoded is not None:
            return decoded
        try:
            headers = self._decoder.decode(block, raw=True)
        except hpack.HPACKError as exc:
            raise ConnectionError_(COMPRESSION_ERROR, f"the header block does not decode: {exc}") from None
        result = [(bytes(name), bytes(value)) for name, value in headers]
        changes = changes_table(block)
        if changes or len(self._decoded) >= 64:
            self._decoded.clear()  # what the kept blocks' indices mean has changed, or they are many: start over
        if not changes:
            self._decoded[block] = result
        return result

    def _unpad(self, stream_id: int, payload: bytes) -> bytes:
        if not payload:
            raise ConnectionError_(PROTOCOL_ERROR, "a padded frame without its pad length")
        pad = payload[0]
        if pad >= len(payload):
            raise ConnectionError_(PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - pad]

    def _remote_end(self, stream: Stream) -> None:
        stream.remote_closed = True
        if stream.handler is not None:
            stream.handler.end()
        if stream.local_closed:
            self._forget(stream)

    def _window_update(self, flags: int, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "a WINDOW_UPDATE frame is 4 bytes")
        increment = int.from_bytes(payload, "big") & MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise ConnectionError_(PROTOCOL_ERROR, "a WINDOW_UPDATE of 0 on the connection")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "the connection's send window went past 2^31-1")
            for blocked in list(self._blocked.values()):
                self._flush(blocked)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # closed already: a window update may cross the stream's end
        if increment == 0:
            raise StreamError(stream_id, PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            raise StreamError(stream_id, FLOW_CONTROL_ERROR, "the stream's send window went past 2^31-1")
        self._flush(stream)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise ConnectionError_(PROTOCOL_ERROR, "a SETTINGS frame on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionError_(FRAME_SIZE_ERROR, "a SETTINGS acknowledgement with a payload")
            return
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "a SETTINGS frame's length is not a multiple of 6")
        for identifier, value in struct.iter_unpack(">HI", payload):
            self._setting(identifier, value)
        if not self._settings_seen:
            self._settings_seen = True
            if self._preface_timer is not None:
                self._preface_timer.cancel()
                self._preface_timer = None
        self._out.append(frame(SETTINGS, ACK, 0))
        for stream in list(self._blocked.values()):
            self._flush(stream)

    def _setting(self, identifier: int, value: int) -> None:
        if identifier == INITIAL_WINDOW_SIZE:
            if value > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
            delta, self._peer_initial_window = value - self._peer_initial_window, value
            for stream in self.streams.values():
                stream.send_window += delta
        elif identifier == MAX_FRAME_SIZE:
            if not DEFAULT_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT:
                raise ConnectionError_(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value} is out of range")
            self._peer_max_frame = value
        elif identifier == ENABLE_PUSH and value > 1:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH must be 0 or 1")
        # Others (the header table's size: ours is never used; the limits on our streams) change nothing here.

    def _ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise ConnectionError_(PROTOCOL_ERROR, "a PING frame on a stream")
        if len(payload) != 8:
            raise ConnectionError_(FRAME_SIZE_ERROR, "a PING frame is 8 bytes")
        if not flags & ACK:
            self._out.append(frame(PING, ACK, 0, bytes(payload)))

    def _rst_stream(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "an RST_STREAM frame on stream 0")
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "an RST_STREAM frame is 4 bytes")
        if stream_id > self.last_stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, f"RST_STREAM on stream {stream_id}, which was never opened")
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._abandon(stream)

    def read(self, stream: Stream, size: int) -> None:
        """The layer above has taken ``size`` bytes of the stream's data: the client may send as much more."""
        stream.unacknowledged += size
        if stream.unacknowledged >= self.limits.stream_window // 2 and not stream.remote_closed:
            stream.receive_window += stream.unacknowledged
            self._write(frame(WINDOW_UPDATE, 0, stream.id, stream.unacknowledged.to_bytes(4, "big")))
            stream.unacknowledged = 0

    # Sending

    def respond(self, stream: Stream, headers: bytes | None, data: bytes, trailers: bytes | None) -> None:
        """Send a header block (unless None), then ``data``, then ``trailers`` with END_STREAM (unless None).

        Data beyond the flow-control windows waits for the client's WINDOW_UPDATE; the trailers wait
        behind it. Header blocks are sent at once (they are not flow-controlled).
        """
        if stream.local_closed or self.closed:
            return
        size, max_frame = len(data), self._peer_max_frame
        if (
            headers is not None and trailers is not None and not stream.pending
            and 0 < size <= self.send_window and size <= stream.send_window and size <= max_frame
            and len(headers) <= max_frame and len(trailers) <= max_frame
        ):  # fmt: skip
            # A whole unary answer within the windows (nearly every one): its three frames in one go.
            self.send_window -= size
            stream.send_window -= size
            stream_id = stream.id
            self._write(b"".join((
                FRAME_HEAD.pack(len(headers) << 8 | HEADERS, END_HEADERS, stream_id), headers,
                FRAME_HEAD.pack(size << 8 | DATA, 0, stream_id), data,
                FRAME_HEAD.pack(len(trailers) << 8 | HEADERS, END_STREAM | END_HEADERS, stream_id), trailers,
            )))  # fmt: skip
            stream.local_closed = True
            self._end_local(stream)
            return
        out: list[bytes] = []
        if headers is not None:
            out.append(header_frames(stream.id, headers, False, max_frame))
        if stream.pending:  # behind data that waits for window
            stream.pending.append((data, trailers))
            trailers = None
        elif data:
            left = self._data_frames(stream, data, out)
            if left:
                stream.pending.append((left, trailers))
                self._blocked[stream.id] = stream
                trailers = None
        if trailers is not None:
            out.append(header_frames(stream.id, trailers, True, self._peer_max_frame))
            stream.local_closed = True
        self._write(b"".join(out))
        if stream.local_closed:
            self._end_local(stream)

    def end_with(self, stream: Stream, block: bytes) -> None:
        """End the stream with one header block: a trailers-only response, or trailers after what was sent."""
        self.respond(stream, None, b"", block)

    async def sent(self, stream: Stream) -> None:
        """Wait until the stream's data has gone out within its windows and the transport takes more."""
        while stream.pending and not self.closed and not stream.local_closed:
            stream.unblocked = self.loop.create_future()
            await stream.unblocked
        if self._writable is not None and not self._writable.done():
            await self._writable

    def reset(self, stream: Stream, code: int = CANCEL) -> None:
        """Abandon the stream: RST_STREAM with ``code``."""
        if not stream.local_closed or not stream.remote_closed:
            stream.local_closed = stream.remote_closed = True
            self._forget(stream)
            self._write(frame(RST_STREAM, 0, stream.id, code.to_bytes(4, "big")))

    def goaway(self) -> None:
        """Refuse new streams (the client opens them on another connection); close once the last one ends."""
        if self.closed or self.draining:
            return
        self.draining = True
        self._write(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream_id, NO_ERROR)))
        self._close_if_done()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _data_frames(self, stream: Stream, data: bytes, out: list[bytes]) -> bytes:
        """Frame as much of ``data`` as the windows allow into ``out``; return what is left."""
        size = len(data)
        if size <= self.send_window and size <= stream.send_window and size <= self._peer_max_frame:
            out.append(FRAME_HEAD.pack(size << 8 | DATA, 0, stream.id))  # the usual case: one frame
            out.append(data)
            self.send_window -= size
            stream.send_window -= size
            return b""
        view, offset = memoryview(data), 0
        while offset < size:
            allowed = min(size - offset, self.send_window, stream.send_window, self._peer_max_frame)
            if allowed <= 0:
                break
            out.append(FRAME_HEAD.pack(allowed << 8 | DATA, 0, stream.id))
            out.append(view[offset : offset + allowed])  # type: ignore[arg-type]
            offset += allowed
            self.send_window -= allowed
            stream.send_window -= allowed
        return data[offset:] if offset < size else b""

    def _flush(self, stream: Stream) -> None:
        out: list[bytes] = []
        pending = stream.pending
        while pending:
            data, trailers = pending[0]
            left = self._data_frames(stream, data, out) if data else b""
            if left:
                pending[0] = (left, trailers)
                break
            pending.popleft()
            if trailers is not None:
                out.append(header_frames(stream.id, trailers, True, self._peer_max_frame))
                stream.local_closed = True
        if not pending:
            self._blocked.pop(stream.id, None)
            self._wake(stream)
        if out:
            self._write(b"".join(out))
        if stream.local_closed:
            self._end_local(stream)

    def _end_local(self, stream: Stream) -> None:
        if not stream.remote_closed:  # answered before the client finished sending: it may stop (RFC 9113 8.1)
            stream.remote_closed = True
            self._write(frame(RST_STREAM, 0, stream.id, NO_ERROR.to_bytes(4, "big")))
        self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        stream.handler = None  # the handler holds the stream: no cycle left for the garbage collector
        self._blocked.pop(stream.id, None)
        self._wake(stream)
        self._close_if_done()

    @staticmethod
    def _wake(stream: Stream) -> None:
        if stream.unblocked is not None and not stream.unblocked.done():
            stream.unblocked.set_result(None)

    def _abandon(self, stream: Stream) -> None:
        """The stream ends without an answer: its handler hears of it."""
        handler = stream.handler
        stream.local_closed = stream.remote_closed = True
        self._forget(stream)
        if handler is not None:
            handler.reset()

    def _reset(self, stream_id: int, code: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._abandon(stream)
        self._write(frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big")))

    def _write(self, data: bytes) -> None:
        if self._receiving:
            self._out.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def _close_if_done(self) -> None:
        if self.draining and not self.streams and self.transport is not None and not self.closed:
            if self._out:
                out, self._out = self._out, []
                self.transport.write(b"".join(out))
            self.transport.close()

    def _fail(self, code: int, message: str) -> None:
        """A connection error: GOAWAY with the code and why, then close."""
        if code != INTERNAL_ERROR:
            logger.info("gRPC connection closed on a protocol error: %s", message)
        self._out.append(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream_id, code) + message.encode()))
        if self.transport is not None:
            out, self._out = self._out, []
            self.transport.write(b"".join(out))
            self.transport.close()
        self.closed = True

    def _preface_late(self) -> None:
        self._preface_timer = None
        if not self._settings_seen and self.transport is not None:
            logger.info("gRPC connection closed: no HTTP/2 preface within %g s", self.limits.preface_timeout_s)
            self.transport.close()

    def _not_http2(self, received: bytes) -> None:
        """Not HTTP/2 at all: an HTTP/1.x client is told where it is, anything else is closed."""
        if self.transport is None:
            return
        if received[:8].split(b" ")[0] in (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH"):
            body = (
                b'{"error": "this port serves gRPC, which needs HTTP/2 with prior knowledge; '
                b'send HTTP/1.1 requests to the HTTP port"}'
            )
            head = b"HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-type: application/json\r\n"
            self.transport.write(head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        self.closed = True
        self.transport.close()
