"""An HTTP/2 client on the h2 library, for the frames and mistakes that gRPC clients never send.

Example::

    async with Peer.connect("127.0.0.1:50051") as peer:
        answer = await peer.call("/inference.GRPCInferenceService/ServerLive", grpc_frame(b""))
        assert answer.trailers["grpc-status"] == "0"
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings

PATH = "/inference.GRPCInferenceService/"


def grpc_frame(payload: bytes, *, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message; ``compressed`` gzips it and sets its flag."""
    if compressed:
        payload = gzip.compress(payload)
    return bytes([1 if compressed else 0]) + len(payload).to_bytes(4, "big") + payload


def grpc_messages(data: bytes) -> list[bytes]:
    """The messages of a gRPC body (uncompressed)."""
    messages, position = [], 0
    while position < len(data):
        size = int.from_bytes(data[position + 1 : position + 5], "big")
        messages.append(data[position + 5 : position + 5 + size])
        position += 5 + size
    return messages


@dataclass
class Answer:
    """What came back on one stream."""

    headers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    trailers: dict[str, str] = field(default_factory=dict)
    reset_code: int | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def status(self) -> tuple[str, str]:
        """(grpc-status, grpc-message), from the trailers or a trailers-only answer's headers."""
        where = self.trailers or self.headers
        return where.get("grpc-status", ""), where.get("grpc-message", "")


class Peer:
    """One HTTP/2 connection driven by h2; answers are collected per stream as frames arrive."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: h2.connection.H2Connection):
        self.reader, self.writer, self.conn = reader, writer, conn
        self.answers: dict[int, Answer] = {}
        self.events: list[h2.events.Event] = []
        self.closed = asyncio.Event()
        self.changed = asyncio.Event()
        self.auto_window = True
        """Acknowledge received data at once; off, the test decides when the server may send more."""
        self._reading: asyncio.Task[None] | None = None

    @classmethod
    @asynccontextmanager
    async def connect(cls, address: str, *, settings: dict[int, int] | None = None) -> AsyncIterator[Peer]:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        if settings:
            conn.update_settings(settings)
        peer = cls(reader, writer, conn)
        peer.flush()
        peer._reading = asyncio.get_running_loop().create_task(peer._read())
        try:
            yield peer
        finally:
            peer._reading.cancel()
            writer.close()
            await asyncio.gather(peer._reading, writer.wait_closed(), return_exceptions=True)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    def open(self, method: str, *, headers: Sequence[tuple[str, str]] = (), end_stream: bool = False) -> int:
        """Open a stream with a gRPC request's headers (``method`` under ``inference.GRPCInferenceService``)."""
        stream_id = self.conn.get_next_available_stream_id()
        path = method if method.startswith("/") else PATH + method
        base = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "test"),
                ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
        given = dict(headers)
        merged = [(name, given.pop(name, value)) for name, value in base] + list(given.items())
        self.conn.send_headers(stream_id, merged, end_stream=end_stream)
        self.answers[stream_id] = Answer()
        self.flush()
        return stream_id

    async def send(self, stream_id: int, data: bytes, *, end_stream: bool = True) -> None:
        """Send ``data`` within the server's flow-control windows, waiting for it to open them."""
        while data:
            size = min(len(data), self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if size == 0:
                await self.wait_for(lambda: self.conn.local_flow_control_window(stream_id) > 0)
                continue
            self.conn.send_data(stream_id, data[:size], end_stream=end_stream and size == len(data))
            self.flush()
            data = data[size:]

    async def call(
        self, method: str, body: bytes, *, headers: Sequence[tuple[str, str]] = (), timeout_s: float = 10.0
    ) -> Answer:
        stream_id = self.open(method, headers=headers)
        if body:
            await self.send(stream_id, body)
        else:
            self.conn.end_stream(stream_id)
            self.flush()
        return await self.answer(stream_id, timeout_s)

    async def answer(self, stream_id: int, timeout_s: float = 10.0) -> Answer:
        answer = self.answers[stream_id]
        async with asyncio.timeout(timeout_s):
            await answer.ended.wait()
        return answer

    async def wait_for(self, check: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        """Wait until ``check()`` is truthy (checked after every frame read); return it."""
        async with asyncio.timeout(timeout_s):
            while not (result := check()):
                self.changed.clear()
                await self.changed.wait()
        return result

    def of_type(self, kind: type[h2.events.Event]) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                for event in self.conn.receive_data(data):
                    self._event(event)
                self.flush()
                self.changed.set()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.closed.set()
            self.changed.set()
            for answer in self.answers.values():
                answer.ended.set()

    def _event(self, event: h2.events.Event) -> None:
        self.events.append(event)
        answer = self.answers.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and answer is not None:
            answer.headers = dict(event.headers)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.DataReceived):
            if answer is not None:
                answer.data += event.data
            if self.auto_window:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived) and answer is not None:
            answer.trailers = dict(event.headers)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.StreamEnded) and answer is not None:
            answer.ended.set()
        elif isinstance(event, h2.events.StreamReset) and answer is not None:
            answer.reset_code = event.error_code
            answer.ended.set()
