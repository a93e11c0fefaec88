"""The inference routes: V2 inference, the JSON API's predict, deferred (lazy) predictions.

``infer`` and ``predict`` start the prediction in the turn of the loop that parsed the request and
return it :class:`Pending`: the pipeline's future, and how its result becomes the response. A model
without feature lookups so costs no task: the batcher's future calls back.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import orjson

from asyncserve._utils import is_count
from asyncserve.composition.deferred import DeferredPredictions, Handle, LazyPrediction
from asyncserve.config import Settings
from asyncserve.exceptions import InvalidRequest, NotFound, ShuttingDown, UnsupportedMediaType
from asyncserve.http import jsonapi, streams, v2
from asyncserve.http.jobs import JobsAPI
from asyncserve.http.routing import JSON_TYPE, Pending, Reply, Request, Response, new_request_id
from asyncserve.runtime.admission import Admission, parse_priority
from asyncserve.runtime.pipeline import Pipeline, Prediction
from asyncserve.runtime.registry import ModelEntry, ModelRegistry
from asyncserve.tensors import Columns

T = TypeVar("T")
Rows = tuple[Columns, int, bool, int]
"""A JSON API body decoded: its columns, rows, whether it was a list, and its priority."""


class InferenceRoutes:
    """Admits, decodes and runs inference requests, and encodes their answers."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        pipeline: Pipeline,
        deferred: DeferredPredictions,
        jobs_api: JobsAPI | None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.pipeline = pipeline
        self.deferred = deferred
        self.jobs_api = jobs_api
        self.admission = Admission(registry)
        """The admission every inference request goes through, over HTTP or gRPC."""
        self._deferred_as_list: dict[str, bool] = {}

    @property
    def shutting_down(self) -> bool:
        """Set when shutdown begins: new predictions are refused (503), in-flight ones go on."""
        return self.admission.shutting_down

    @shutting_down.setter
    def shutting_down(self, value: bool) -> None:
        self.admission.shutting_down = value

    def infer(self, request: Request) -> Reply:
        entry, deadline = self.admit(request)
        if entry.spec.streams:
            raise InvalidRequest(
                f"model {entry.spec.label!r} answers in parts: call POST /v2/models/{entry.spec.name}/generate_stream, "
                "or its JSON API with Accept: text/event-stream"
            )
        if self.jobs_api is not None and _prefers(request, "respond-async"):
            submitted = self.jobs_api.submit_v2(request, entry, request.body)
            return Pending(asyncio.get_running_loop().create_task(submitted), _as_is)
        if len(request.body) > self.settings.decode_off_loop_bytes:
            return _off_loop(
                lambda: self._decode_infer(request, entry), partial(self._start_infer, request, entry, deadline)
            )
        return self._start_infer(request, entry, deadline, self._decode_infer(request, entry))

    def _decode_infer(self, request: Request, entry: ModelEntry) -> v2.InferRequest:
        header_length = _binary_header_length(request)
        # Any V2 body may say application/octet-stream: tritonclient's aio client always does.
        _require_json(request, also="application/octet-stream")
        return v2.decode_infer_request(request.body, entry.spec, header_length)

    def _start_infer(self, request: Request, entry: ModelEntry, deadline: float, decoded: v2.InferRequest) -> Pending:
        priority = parse_priority(decoded.parameters.get("priority", 0), "parameters.priority")
        work, to_prediction = self.pipeline.start(
            entry, decoded.columns, decoded.rows, deadline, priority=priority, request_id=request.request_id
        )

        def answer(result: Any) -> Response:
            prediction = to_prediction(result)
            payload, headers = v2.encode_infer_response(entry.spec, decoded, prediction.outputs)
            content_type = headers.pop("content-type", JSON_TYPE)  # (the headers are the response's own)
            if prediction.degraded:
                headers.update(_degraded_header(prediction))
            return Response(200, payload, headers, content_type)

        return Pending(work, answer)

    def predict(self, request: Request) -> Reply:
        entry, deadline = self.admit(request)
        if entry.spec.streams:
            columns, rows, as_list, _ = self._decode_rows(request, entry, request.body)
            parts = self.pipeline.stream(entry, columns, rows, deadline, request_id=request.request_id)
            return streams.stream_reply(
                parts, partial(jsonapi.encode_rows, entry.spec, as_list=as_list), streams.wants(request)
            )
        if _prefers(request, "lazy"):
            columns, rows, as_list, priority = self._decode_rows(request, entry, request.body)
            return self._defer(request, entry, columns, rows, as_list, priority)
        if len(request.body) > self.settings.decode_off_loop_bytes:
            decode = partial(self._decode_rows, request, entry, request.body)
            return _off_loop(decode, partial(self._start_predict, request, entry, deadline))
        return self._start_predict(request, entry, deadline, self._decode_rows(request, entry, request.body))

    def _start_predict(self, request: Request, entry: ModelEntry, deadline: float, decoded: Rows) -> Pending:
        columns, rows, as_list, priority = decoded
        work, to_prediction = self.pipeline.start(
            entry, columns, rows, deadline, priority=priority, request_id=request.request_id
        )

        def answer(result: Any) -> Response:
            prediction = to_prediction(result)
            body = jsonapi.encode_rows(entry.spec, prediction.outputs, as_list)
            return Response(200, body, _degraded_header(prediction))

        return Pending(work, answer)

    def _decode_rows(self, request: Request, entry: ModelEntry, body: bytes) -> Rows:
        _require_json(request)
        columns, as_list = jsonapi.decode_rows(body, entry.spec)
        priority = parse_priority(request.headers.get("x-priority", "0"), "X-Priority")
        return columns, len(next(iter(columns.values()))), as_list, priority

    # Deferred (lazy) predictions

    def _defer(
        self, request: Request, entry: ModelEntry, columns: Columns, rows: int, as_list: bool, priority: int
    ) -> Response:
        """Answer 202 at once with a handle; the prediction is computed when the handle is first read."""
        handle = self._deferred_handle(entry, columns, rows, as_list, priority, request.request_id)
        location = f"/v1/predictions/{handle.id}"
        body = {"id": handle.id, "model": entry.spec.label, "url": location, "expires_in_s": handle.remaining_s()}
        return Response.json(body, 202, {"location": location, "preference-applied": "lazy"})

    def lazy(self, model: str, inputs: Any, version: str | None = None) -> LazyPrediction:
        """``Service.lazy``: the model and inputs checked now, the prediction computed on the first await."""
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down")
        entry = self.registry.get_ready(model, version)
        try:
            body = orjson.dumps(inputs, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError as exc:
            raise InvalidRequest(f"service.lazy(): inputs must be rows of JSON-like values ({exc})") from None
        columns, as_list = jsonapi.decode_rows(body, entry.spec)
        rows = len(next(iter(columns.values())))
        handle = self._deferred_handle(entry, columns, rows, as_list, 0, new_request_id())
        return LazyPrediction(handle, self.deferred.resolve)

    def _deferred_handle(
        self, entry: ModelEntry, columns: Columns, rows: int, as_list: bool, priority: int, request_id: str
    ) -> Handle:
        timeout_s = entry.spec.timeout_s

        async def compute() -> Columns:
            # The deadline starts when the handle is read, not when it was handed out.
            deadline = time.monotonic() + timeout_s
            prediction = await self.pipeline.run(
                entry, columns, rows, deadline, priority=priority, request_id=request_id
            )
            return prediction.outputs

        self._forget_expired_handles()
        handle = self.deferred.create(entry.spec.label, columns, compute, self.settings.deferred_ttl_s)
        self._deferred_as_list[handle.id] = as_list
        return handle

    def _forget_expired_handles(self) -> None:
        # Each handle's answer shape is kept beside it; drop those of handles that expired.
        if len(self._deferred_as_list) > len(self.deferred):
            self.deferred.sweep()
            self._deferred_as_list = {h: v for h, v in self._deferred_as_list.items() if _alive(self.deferred, h)}

    async def deferred_result(self, request: Request) -> Response:
        handle = self.deferred.get(request.params["handle"])
        name, _, version = handle.model_label.partition(":")
        entry = self.registry.find(name, version or None)
        outputs = await self.deferred.resolve(handle.id)
        as_list = self._deferred_as_list.get(handle.id, False)
        return Response(200, jsonapi.encode_rows(entry.spec, outputs, as_list))

    def admit(self, request: Request) -> tuple[ModelEntry, float]:
        """Find the model and fix the request's deadline, once, at the edge (``Admission.admit``)."""
        asked = request.headers.get("x-request-timeout")
        asked_s = None if asked is None else parse_timeout(asked)
        return self.admission.admit(request.params["model"], request.params.get("version"), asked_s, request.arrived)


def parse_timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidRequest(f"X-Request-Timeout must be a number of seconds > 0, got {value!r}")
    return seconds


def _as_is(response: Response) -> Response:
    return response


def _off_loop(decode: Callable[[], T], start: Callable[[T], Pending]) -> Pending:
    """Decode a large body in a thread, then start its prediction on the loop: decoding tens of megabytes
    of JSON on the event loop would stall every other request for as long."""

    async def decode_then_start() -> Response:
        pending = start(await asyncio.to_thread(decode))
        # Cancelling this task (the client went away) cancels the awaited work, which withdraws the rows.
        response: Response = pending.answer(await pending.work)
        return response

    return Pending(asyncio.get_running_loop().create_task(decode_then_start()), _as_is)


def _alive(deferred: DeferredPredictions, handle_id: str) -> bool:
    try:
        deferred.get(handle_id)
    except NotFound:
        return False
    return True


def _prefers(request: Request, preference: str) -> bool:
    """An RFC 7240 ``Prefer`` preference (``lazy``, ``respond-async``), among others, in any case."""
    prefer = request.headers.get("prefer")
    if not prefer:
        return False
    return any(part.strip().lower() == preference for part in prefer.replace(";", ",").split(","))


def _degraded_header(prediction: Prediction) -> dict[str, str]:
    """``X-Degraded`` names the feature sources whose defaults stood in: the answer is usable but degraded."""
    return {"x-degraded": ",".join(prediction.degraded)} if prediction.degraded else {}


def _binary_header_length(request: Request) -> int | None:
    value = request.headers.get("inference-header-content-length")
    if value is None:
        return None
    if not is_count(value):
        raise InvalidRequest(f"Inference-Header-Content-Length must be a byte count, got {value!r}")
    return int(value)


def _require_json(request: Request, also: str = JSON_TYPE) -> None:
    content_type = request.headers.get("content-type", JSON_TYPE)
    if content_type in (JSON_TYPE, also):
        return  # the common case, as the media type below would find it
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in (JSON_TYPE, also, "") and not media_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"content type {media_type!r} is not supported; send Content-Type: application/json "
            "(or binary tensors with the Inference-Header-Content-Length header)"
        )
