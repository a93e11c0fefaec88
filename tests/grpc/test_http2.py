"""asyncserve's own HTTP/2 under gRPC, frame by frame: h2 (an independent HTTP/2 implementation) or raw
frames as the client, against a real server process, for what standard gRPC clients never send."""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h2.events
import h2.settings
import hpack
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from tests.grpc.conftest import Served, serve_grpc
from tests.grpc.h2peer import Answer, Peer, grpc_frame, grpc_messages
from tests.processes import eventually

pytestmark = pytest.mark.e2e

NOPE = "/inference.GRPCInferenceService/Nope"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x1, 0x3, 0x6


def adder_request(a: list[float], b: list[float], request_id: str = "") -> bytes:
    request = pb.ModelInferRequest(model_name="adder", id=request_id)
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 3])
    request.raw_input_contents.extend([np.asarray([a], np.float32).tobytes(), np.asarray([b], np.float32).tobytes()])
    return bytes(request.SerializeToString())


def adder_sum(answer: Answer) -> list[float]:
    assert answer.status == ("0", ""), answer
    (message,) = grpc_messages(answer.data)
    response = pb.ModelInferResponse.FromString(message)
    index = [output.name for output in response.outputs].index("sum")
    return [float(value) for value in np.frombuffer(response.raw_output_contents[index], np.float32)]


def sleeper_request(seconds: float) -> bytes:
    request = pb.ModelInferRequest(model_name="sleeper")
    request.inputs.add(name="seconds", datatype="FP64", shape=[1])
    request.raw_input_contents.append(np.asarray([seconds], np.float64).tobytes())
    return bytes(request.SerializeToString())


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | kind, flags, stream_id) + payload


async def raw_frames(address: str, *frames: bytes, timeout_s: float = 10.0) -> list[tuple[int, int, int, bytes]]:
    """Send the preface, an empty SETTINGS and ``frames``; every frame read until the server closes."""
    async with raw_connection(address) as (reader, writer):
        writer.write(b"".join(frames))
        return await read_frames(reader, timeout_s)


@asynccontextmanager
async def raw_connection(address: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A connection that has sent the client preface and an empty SETTINGS frame."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(PREFACE + frame(4, 0, 0))
    try:
        yield reader, writer
    finally:
        writer.close()


async def read_frames(reader: asyncio.StreamReader, timeout_s: float = 10.0) -> list[tuple[int, int, int, bytes]]:
    """Every frame (type, flags, stream, payload) read until the server closes the connection."""
    async with asyncio.timeout(timeout_s):
        received = await reader.read()
    found, position = [], 0
    while position + 9 <= len(received):
        length_kind, flags, stream_id = struct.unpack_from(">IBI", received, position)
        end = position + 9 + (length_kind >> 8)
        found.append((length_kind & 0xFF, flags, stream_id, received[position + 9 : end]))
        position = end
    return found


def request_headers(method: str, *extra: tuple[str, str]) -> bytes:
    """A request's header block from a fresh HPACK encoder (the connection's first)."""
    return hpack.Encoder().encode(
        [(":method", "POST"), (":scheme", "http"), (":path", f"/inference.GRPCInferenceService/{method}"),
         (":authority", "t"), ("content-type", "application/grpc"), *extra]
    )  # fmt: skip


def goaway_code(frames: list[tuple[int, int, int, bytes]]) -> tuple[int, str]:
    (payload,) = [payload for kind, _, _, payload in frames if kind == 7]
    return int.from_bytes(payload[4:8], "big"), payload[8:].decode()


async def metric(served: Served, pattern: str) -> float:
    async with httpx.AsyncClient(base_url=served.http_url) as http:
        text = (await http.get("/metrics")).text
    found = re.search(rf"^{re.escape(pattern)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
async def strict(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    """A server with small limits: 64 KiB messages, 1 s for a client's preface."""
    env = {"ASYNCSERVE_MAX_BODY_BYTES": str(64 * 1024), "ASYNCSERVE_HEAD_TIMEOUT_S": "1"}
    async with serve_grpc(tmp_path_factory.mktemp("strict"), env=env) as running:
        yield running


# Calls as any client makes them


async def test_a_unary_call_answers_headers_message_and_trailers(served: Served) -> None:
    async with Peer.connect(served.grpc_url) as peer:
        answer = await peer.call("ModelInfer", grpc_frame(adder_request([1, 2, 3], [4, 5, 6], "r-1")))
    assert answer.headers[":status"] == "200"
    assert answer.headers["content-type"] == "application/grpc"
    assert adder_sum(answer) == [5, 7, 9]
    assert pb.ModelInferResponse.FromString(grpc_messages(answer.data)[0]).id == "r-1"


async def test_many_calls_at_once_on_one_connection(served: Served) -> None:
    async with Peer.connect(served.grpc_url) as peer:
        streams = [peer.open("ModelInfer") for _ in range(50)]
        for i, stream_id in enumerate(streams):
            await peer.send(stream_id, grpc_frame(adder_request([i, 0, 0], [0, i, 0])))
        answers = await asyncio.gather(*(peer.answer(stream_id) for stream_id in streams))
    assert [adder_sum(answer) for answer in answers] == [[i, i, 0] for i in range(50)]


async def test_ping_is_acknowledged_with_its_data(served: Served) -> None:
    async with Peer.connect(served.grpc_url) as peer:
        peer.conn.ping(b"12345678")
        peer.flush()
        acks = await peer.wait_for(lambda: peer.of_type(h2.events.PingAckReceived))
    assert acks[0].ping_data == b"12345678"


async def test_a_gzip_message_is_decompressed(served: Served) -> None:
    async with Peer.connect(served.grpc_url) as peer:
        body = grpc_frame(adder_request([1, 1, 1], [2, 2, 2]), compressed=True)
        answer = await peer.call("ModelInfer", body, headers=[("grpc-encoding", "gzip")])
    assert adder_sum(answer) == [3, 3, 3]


# Flow control, both ways


async def test_a_client_window_of_16_bytes_gets_the_answer_in_pieces(served: Served) -> None:
    settings = {int(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE): 16}
    async with Peer.connect(served.grpc_url, settings=settings) as peer:
        await peer.wait_for(lambda: peer.of_type(h2.events.SettingsAcknowledged))
        answer = await peer.call("ModelInfer", grpc_frame(adder_request([1, 2, 3], [1, 1, 1])))
        pieces = [e for e in peer.of_type(h2.events.DataReceived) if e.data]
    assert adder_sum(answer) == [2, 3, 4]
    assert len(pieces) >= len(answer.data) / 16
    assert max(len(e.data) for e in pieces) <= 16


async def test_a_message_larger_than_the_stream_window(served: Served) -> None:
    """3 MiB in one message: the server opens its 1 MiB window again as it reads."""
    padding = b"\x7a" + b"\x80\x80\xc0\x01" + bytes(3 << 20)  # field 15, 3 MiB: unknown, kept, ignored
    async with Peer.connect(served.grpc_url) as peer:
        answer = await peer.call("ServerLive", grpc_frame(padding), timeout_s=30)
    assert answer.status == ("0", "")
    assert pb.ServerLiveResponse.FromString(grpc_messages(answer.data)[0]).live


# Cancellation


async def test_a_reset_stream_cancels_its_prediction(served: Served) -> None:
    route = 'asyncserve_client_disconnects_total{model="sleeper",route="grpc_ModelInfer"}'
    before = await metric(served, route)
    async with Peer.connect(served.grpc_url) as peer:
        stream_id = peer.open("ModelInfer")
        await peer.send(stream_id, grpc_frame(sleeper_request(1.0)))
        peer.conn.reset_stream(stream_id, error_code=8)  # CANCEL
        peer.flush()

        async def counted() -> bool:
            return await metric(served, route) == before + 1

        await eventually(counted, "the cancelled call counted")
        # The connection goes on serving.
        answer = await peer.call("ModelInfer", grpc_frame(adder_request([1, 0, 0], [0, 0, 0])))
    assert adder_sum(answer) == [1, 0, 0]


async def test_the_grpc_timeout_header_ends_the_call_with_deadline_exceeded(served: Served) -> None:
    async with Peer.connect(served.grpc_url) as peer:
        answer = await peer.call("ModelInfer", grpc_frame(sleeper_request(2.0)), headers=[("grpc-timeout", "200m")])
    assert answer.status[0] == "4"  # DEADLINE_EXCEEDED


# Requests that are wrong, each with its status and a message that says why


@pytest.mark.parametrize(
    ("headers", "body", "status", "message"),
    [
        ([(":path", NOPE)], b"", "12", f"unknown method {NOPE}"),
        ([("content-type", "text/plain")], b"", "2", "content-type 'text/plain' is not gRPC's: send application/grpc"),
        ([("grpc-encoding", "snappy")], b"", "12", "grpc-encoding 'snappy' is not supported: use identity, deflate"),
        ([("grpc-timeout", "soon")], b"", "13", "malformed grpc-timeout 'soon'"),
        ([], grpc_frame(b"\xff\xff"), "13", "the request is not a valid ModelInferRequest"),
        ([], grpc_frame(b"") * 2, "12", "ModelInfer takes one request message, got 2"),
        ([], b"", "12", "ModelInfer takes one request message, got 0"),
        ([], b"\x00\x00\x00", "13", "the request ended inside a message's 5-byte prefix"),
        ([], b"\x00\x00\x00\x00\x09abc", "13", "the request ended inside a message"),
        ([], b"\x01\x00\x00\x00\x01x", "13", "a message is flagged compressed but the call has no grpc-encoding"),
        ([("grpc-encoding", "gzip")], b"\x01\x00\x00\x00\x03abc", "13", "a gzip message does not decompress"),
    ],
)  # fmt: skip
async def test_a_wrong_request_gets_its_status_and_why(
    served: Served, headers: list[tuple[str, str]], body: bytes, status: str, message: str
) -> None:
    async with Peer.connect(served.grpc_url) as peer:
        answer = await peer.call("ModelInfer", body, headers=headers)
    assert answer.headers[":status"] == "200"
    assert answer.status[0] == status
    assert answer.status[1].startswith(message), answer


async def test_a_message_over_the_limit_is_resource_exhausted(strict: Served) -> None:
    async with Peer.connect(strict.grpc_url) as peer:
        over = await peer.call("ModelInfer", grpc_frame(bytes(64 * 1024 + 1)))
        claimed = await peer.call("ModelInfer", b"\x00\x7f\xff\xff\xff" + bytes(10))
        bomb = await peer.call(
            "ModelInfer", grpc_frame(bytes(1 << 20), compressed=True), headers=[("grpc-encoding", "gzip")]
        )
        fine = await peer.call("ModelInfer", grpc_frame(adder_request([1, 1, 1], [0, 0, 0])))
    for answer in (over, claimed, bomb):
        assert answer.status[0] == "8", answer  # RESOURCE_EXHAUSTED
        assert "--max-body-bytes" in answer.status[1]
    assert adder_sum(fine) == [1, 1, 1]


async def test_an_http1_request_is_told_this_port_speaks_grpc(served: Served) -> None:
    host, port = served.grpc_url.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v2 HTTP/1.1\r\nhost: x\r\n\r\n")
    async with asyncio.timeout(10):
        response = await reader.read()
    writer.close()
    assert response.startswith(b"HTTP/1.1 505 ")
    assert b"this port serves gRPC" in response
    assert b"HTTP port" in response


async def test_a_client_that_sends_no_preface_is_closed(strict: Served) -> None:
    host, port = strict.grpc_url.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(PREFACE[:10])
    async with asyncio.timeout(10):
        received = await reader.read()
    writer.close()
    assert received == b""  # closed, having said nothing: the client may not speak HTTP/2 at all


# Frames that break the protocol end the connection with a GOAWAY that says why


@pytest.mark.parametrize(
    ("frames", "code", "why"),
    [
        ([frame(0, 0, 0, b"x")], PROTOCOL_ERROR, "a DATA frame on stream 0"),
        ([frame(0, 0, 5, b"x")], PROTOCOL_ERROR, "DATA on stream 5, which was never opened"),
        ([frame(6, 0, 0, b"1234")], FRAME_SIZE_ERROR, "a PING frame is 8 bytes"),
        ([frame(8, 0, 0, bytes(4))], PROTOCOL_ERROR, "a WINDOW_UPDATE of 0 on the connection"),
        ([frame(8, 0, 0, b"\x7f\xff\xff\xff")], FLOW_CONTROL_ERROR, "the connection's send window went past 2^31-1"),
        ([frame(4, 0, 0, b"\x00\x05\x00\x00\x00\x01")], PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE 1 is out of range"),
        ([frame(4, 0, 0, b"\x00\x04")], FRAME_SIZE_ERROR, "a SETTINGS frame's length is not a multiple of 6"),
        ([frame(1, 0, 1, b"\x82"), frame(6, 0, 0, bytes(8))], PROTOCOL_ERROR, "a header block was interrupted"),
        ([frame(1, 4, 2, b"\x82")], PROTOCOL_ERROR, "stream 2 is not a new client stream"),
        ([frame(1, 4, 1, b"\xff\xff\xff\xff")], 0x9, "the header block does not decode"),
        ([frame(5, 4, 1, bytes(4))], PROTOCOL_ERROR, "a client may not send PUSH_PROMISE"),
        ([struct.pack(">IBI", 2 << 28, 0, 1)], FRAME_SIZE_ERROR, "a frame of 2097152 bytes exceeds 1048576"),
    ],
)  # fmt: skip
async def test_a_protocol_error_ends_the_connection_with_goaway(
    served: Served, frames: list[bytes], code: int, why: str
) -> None:
    sent_code, message = goaway_code(await raw_frames(served.grpc_url, *frames))
    assert sent_code == code
    assert message.startswith(why)


async def test_a_header_block_in_continuation_frames(served: Served) -> None:
    block = request_headers("ServerLive", ("x-padding", "p" * 3000))
    thirds = [block[:1000], block[1000:2000], block[2000:]]
    frames = [frame(1, 0, 1, thirds[0]), frame(9, 0, 1, thirds[1]), frame(9, 4, 1, thirds[2])]
    frames.append(frame(0, 1, 1, grpc_frame(b"")))
    received = await raw_frames(served.grpc_url, *frames, frame(7, 0, 0, bytes(8)), timeout_s=10)
    decoder = hpack.Decoder()
    blocks = [dict(decoder.decode(payload, raw=True)) for kind, _, sid, payload in received if kind == 1 and sid == 1]
    assert blocks[0][b":status"] == b"200"
    assert blocks[-1][b"grpc-status"] == b"0"
    (data,) = [payload for kind, _, sid, payload in received if kind == 0 and sid == 1]
    assert pb.ServerLiveResponse.FromString(grpc_messages(data)[0]).live


async def test_a_drained_connection_gets_goaway_then_its_call_answered(tmp_path: Path) -> None:
    async with serve_grpc(tmp_path) as served, raw_connection(served.grpc_url) as (reader, writer):
        writer.write(frame(1, 4, 1, request_headers("ModelInfer")) + frame(0, 1, 1, grpc_frame(sleeper_request(0.5))))

        async def under_way() -> bool:
            return await metric(served, 'asyncserve_requests_in_flight{route="grpc_ModelInfer"}') == 1

        await eventually(under_way, "the call under way")
        served.terminate()
        frames = await read_frames(reader, timeout_s=15)
        kinds = [(kind, stream_id) for kind, _, stream_id, _ in frames if kind in (0, 1, 7)]
        assert kinds == [(7, 0), (1, 1), (0, 1), (1, 1)]  # GOAWAY, then the answer: headers, message, trailers
        goaway = next(payload for kind, _, _, payload in frames if kind == 7)
        assert goaway[:8] == struct.pack(">II", 1, 0)  # the last stream it serves: 1; no error
        trailers = hpack.Decoder()
        blocks = [dict(trailers.decode(payload, raw=True)) for kind, _, _, payload in frames if kind == 1]
        assert blocks[1][b"grpc-status"] == b"0"
        assert await asyncio.wait_for(served.process.wait(), 15) == 0


async def test_data_after_the_end_of_a_stream_resets_it(served: Served) -> None:
    request = frame(1, 4, 1, request_headers("ModelStreamInfer"))  # a stream the server keeps open to answer
    ended = frame(0, 1, 1, grpc_frame(b""))  # an empty ModelInferRequest, and END_STREAM
    frames = await raw_frames(served.grpc_url, request + ended + frame(0, 0, 1, b"late"), frame(7, 0, 0, bytes(8)))
    resets = [int.from_bytes(payload, "big") for kind, _, stream_id, payload in frames if kind == 3 and stream_id == 1]
    assert resets == [0x5]  # STREAM_CLOSED


async def test_a_stream_of_answers_waits_for_a_small_client_window(served: Served) -> None:
    """Each part of a streaming model goes out as the client's 16-byte window lets it."""
    request = pb.ModelInferRequest(model_name="counting")
    request.inputs.add(name="n", datatype="INT64", shape=[1])
    request.raw_input_contents.append(np.asarray([5], np.int64).tobytes())
    settings = {int(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE): 16}
    async with Peer.connect(served.grpc_url, settings=settings) as peer:
        await peer.wait_for(lambda: peer.of_type(h2.events.SettingsAcknowledged))
        answer = await peer.call("ModelStreamInfer", grpc_frame(request.SerializeToString()))
    assert answer.status == ("0", "")
    responses = [pb.ModelStreamInferResponse.FromString(message) for message in grpc_messages(answer.data)]
    parts = [np.frombuffer(r.infer_response.raw_output_contents[0], np.int64).tolist() for r in responses]
    assert parts == [[0], [1], [2], [3], [4]]
