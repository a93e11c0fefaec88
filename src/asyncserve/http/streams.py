"""Answers in parts: streaming models on the JSON API, and the V2 generate extension (Triton's shape).

On the JSON API, a streaming model answers ``Accept: text/event-stream`` with Server-Sent Events
(each part an event, then ``event: end``; an error in the middle ends the stream with
``event: error`` and the error's JSON), ``Accept: application/x-ndjson`` with JSON Lines (an error
is a last line holding ``error`` and ``code``), and anything else with a JSON array of every part.

``POST /v2/models/{m}/generate`` takes the inputs as the top-level keys of a JSON object (plus
optional ``parameters``) and answers ``{"model_name", "model_version", <outputs>}``: for a streaming
model, its last part. ``generate_stream`` answers the same objects as Server-Sent Events
(``data: {...}``), one per part, and ``data: {"error": ...}`` if the stream fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from asyncserve.exceptions import AsyncServeError, InvalidRequest, SchemaViolation
from asyncserve.http import jsonapi
from asyncserve.http.routing import Pending, Reply, Request, Response, StreamingResponse
from asyncserve.runtime.pipeline import Pipeline, Prediction
from asyncserve.runtime.registry import ModelEntry, ModelRegistry
from asyncserve.tensors import Columns

EVENT_STREAM = "text/event-stream"
JSON_LINES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")

Encode = Callable[[Columns], bytes]


def wants(request: Request) -> str:
    """How the client asks for the parts: ``sse``, ``jsonl`` or ``whole``."""
    accept = request.headers.get("accept", "")
    if EVENT_STREAM in accept:
        return "sse"
    if any(media_type in accept for media_type in JSON_LINES):
        return "jsonl"
    return "whole"


def stream_reply(parts: AsyncIterator[Columns], encode: Encode, form: str) -> Reply:
    """The answer to a JSON API request of a streaming model, in the form the client asked for."""
    if form == "sse":
        return StreamingResponse(200, _events(parts, encode), content_type=EVENT_STREAM)
    if form == "jsonl":
        return StreamingResponse(200, _lines(parts, encode), content_type=JSON_LINES[0])
    return Pending(asyncio.get_running_loop().create_task(_whole(parts, encode)), _as_is)


async def _events(parts: AsyncIterator[Columns], encode: Encode) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(parts):  # type: ignore[type-var]
        try:
            async for part in parts:
                yield b"data: " + encode(part) + b"\n\n"
        except AsyncServeError as exc:
            yield b"event: error\ndata: " + orjson.dumps(exc.to_dict()) + b"\n\n"
            return
        yield b"event: end\ndata: {}\n\n"


async def _lines(parts: AsyncIterator[Columns], encode: Encode) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(parts):  # type: ignore[type-var]
        try:
            async for part in parts:
                yield encode(part) + b"\n"
        except AsyncServeError as exc:
            yield orjson.dumps(exc.to_dict()) + b"\n"


async def _whole(parts: AsyncIterator[Columns], encode: Encode) -> Response:
    async with contextlib.aclosing(parts):  # type: ignore[type-var]
        encoded = [encode(part) async for part in parts]
    return Response(200, b"[" + b",".join(encoded) + b"]")


def _as_is(response: Response) -> Response:
    return response


class GenerateRoutes:
    """The V2 generate extension: ``generate`` and ``generate_stream``, for every model."""

    def __init__(
        self, registry: ModelRegistry, pipeline: Pipeline, admit: Callable[[Request], tuple[ModelEntry, float]]
    ) -> None:
        self.registry = registry
        self.pipeline = pipeline
        self.admit = admit

    def generate(self, request: Request) -> Reply:
        entry, deadline = self.admit(request)
        columns = decode_generate(request.body, entry)
        encode = _generate_encoder(entry)
        if entry.spec.streams:
            parts = self.pipeline.stream(entry, columns, 1, deadline, request_id=request.request_id)
            return Pending(asyncio.get_running_loop().create_task(_last(parts, encode)), _as_is)
        work, to_prediction = self.pipeline.start(entry, columns, 1, deadline, request_id=request.request_id)
        return Pending(work, lambda result: Response(200, encode(to_prediction(result).outputs)))

    def generate_stream(self, request: Request) -> Reply:
        entry, deadline = self.admit(request)
        columns = decode_generate(request.body, entry)
        encode = _generate_encoder(entry)
        if entry.spec.streams:
            parts = self.pipeline.stream(entry, columns, 1, deadline, request_id=request.request_id)
        else:
            parts = _one_part(lambda: self.pipeline.run(entry, columns, 1, deadline, request_id=request.request_id))
        return StreamingResponse(200, _generate_events(parts, encode), content_type=EVENT_STREAM)


def decode_generate(body: bytes, entry: ModelEntry) -> Columns:
    """A generate request: the inputs as the JSON object's keys, and optional ``parameters``."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the generate request is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise SchemaViolation("", "a generate request is a JSON object of the model's inputs by name")
    parameters = document.pop("parameters", {})
    if not isinstance(parameters, dict):
        raise SchemaViolation("parameters", "parameters must be a JSON object")
    columns, _ = jsonapi.decode_rows(orjson.dumps(document), entry.spec)
    return columns


def _generate_encoder(entry: ModelEntry) -> Encode:
    spec = entry.spec
    head = {"model_name": spec.name, "model_version": spec.version or ""}

    def encode(outputs: Columns) -> bytes:
        row: dict[str, Any] = orjson.loads(jsonapi.encode_rows(spec, outputs, False))
        return orjson.dumps({**head, **row})

    return encode


async def _last(parts: AsyncIterator[Columns], encode: Encode) -> Response:
    last: Columns | None = None
    async with contextlib.aclosing(parts):  # type: ignore[type-var]
        async for part in parts:
            last = part
    if last is None:
        raise AsyncServeError("the model streamed no part at all")
    return Response(200, encode(last))


async def _one_part(predict: Callable[[], Awaitable[Prediction]]) -> AsyncIterator[Columns]:
    yield (await predict()).outputs


async def _generate_events(parts: AsyncIterator[Columns], encode: Encode) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(parts):  # type: ignore[type-var]
        try:
            async for part in parts:
                yield b"data: " + encode(part) + b"\n\n"
        except AsyncServeError as exc:
            yield b"data: " + orjson.dumps(exc.to_dict()) + b"\n\n"
