"""Random frames into the HTTP/2 connection: every sequence is served or refused, never a crash.

The connection is driven through its asyncio.Protocol interface with a transport that records what
it writes; the frames are random in type, flags, stream and payload, cut at a random point.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from typing import Any

import pytest

from asyncserve.grpc.http2 import PREFACE, Connection, Http2Limits, Stream

GRPC_REQUEST_HEADERS = b"\x83\x86\x84\x41\x01t\x5f\x10application/grpc"
"""POST, http, /, :authority t, content-type application/grpc (HPACK, no table insertions but one)."""


class RecordingTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Echo:
    """Answers every stream when it ends, with a random amount of data (flow control gets exercised)."""

    def __init__(self, connection: Connection, stream: Stream, rng: random.Random) -> None:
        self.connection, self.stream, self.rng = connection, stream, rng

    def data(self, chunk: bytes) -> None:
        self.connection.read(self.stream, len(chunk))

    def end(self) -> None:
        self.connection.respond(self.stream, b"\x88", bytes(self.rng.randint(0, 70_000)), b"\x00\x01a\x01b")

    def reset(self) -> None: ...


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | kind, flags, stream_id) + payload


def random_frames(rng: random.Random) -> bytes:
    frames = [PREFACE, frame(4, 0, 0, b"")]
    if rng.random() < 0.5:  # a valid request first, so that what follows meets a stream being answered
        frames += [frame(1, 4, 1, GRPC_REQUEST_HEADERS), frame(0, 1, 1, bytes(rng.randint(0, 100)))]
    for _ in range(rng.randint(1, 8)):
        kind = rng.choice([0, 1, 2, 3, 4, 6, 7, 8, 9, 10])
        flags = rng.choice([0, 1, 4, 5, 8, 0x20, 0x2C, 0xFF])
        stream_id = rng.choice([0, 1, 1, 3, 2, 5, 2**31 - 1])
        payload = rng.randbytes(rng.choice([0, 1, 4, 5, 6, 8, 12, 30]))
        if kind == 1 and rng.random() < 0.5:
            payload = GRPC_REQUEST_HEADERS
        elif kind == 8 and rng.random() < 0.5:  # a valid window increment
            payload = rng.randint(1, 100_000).to_bytes(4, "big")
        frames.append(frame(kind, flags, stream_id, payload))
    return b"".join(frames)


async def test_random_frames_never_crash_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(20261206)
    caplog.set_level(logging.ERROR, logger="asyncserve.grpc")
    for _ in range(3000):
        transport = RecordingTransport()
        connection = Connection(lambda c, s, _: Echo(c, s, rng), Http2Limits(), lambda _: None)
        connection.connection_made(transport)  # type: ignore[arg-type]
        data = random_frames(rng)
        cut = rng.randint(0, len(data))
        connection.data_received(data[:cut])
        connection.data_received(data[cut:])
        await asyncio.sleep(0)
        connection.connection_lost(None)
        sent = b"".join(transport.written)
        assert sent[3] == 4  # the server's preface, its SETTINGS, came first
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
