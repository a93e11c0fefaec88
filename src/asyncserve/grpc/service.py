"""The handlers of ``inference.GRPCInferenceService``, over the same components as the HTTP app.

Every call goes the way an HTTP request does: the API key (``authorization: Bearer`` or ``x-api-key``
metadata) checked against the call's scope and taken against the key's limits, then for inference
the one admission (``Admission.admit``, the gRPC deadline being the client's asked time), V2's
decoding checks, ``Pipeline.start`` (features, batching, priorities, coalescing, prediction log), and
the same metrics. An ``AsyncServeError`` ends the call with the gRPC status of its HTTP status and the
same message; anything else is a bug, logged with its traceback and answered INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncserve
from asyncserve.exceptions import AsyncServeError, InvalidRequest, ModelError
from asyncserve.grpc import inference_pb2 as pb
from asyncserve.grpc import tensors
from asyncserve.grpc.calls import Call, Deferred
from asyncserve.grpc.status import GrpcError, StatusCode
from asyncserve.http import v2
from asyncserve.http.app import EXTENSIONS, HttpApp
from asyncserve.http.auth import ApiKey, audit_logger
from asyncserve.http.routing import new_request_id
from asyncserve.model import ModelSpec
from asyncserve.runtime.registry import ModelState
from asyncserve.tensors import Columns

logger = logging.getLogger(__name__)

T = TypeVar("T")
_Answer = TypeVar("_Answer", pb.ModelInferResponse, bytes)
Encoder = Callable[[ModelSpec, str, tensors.Decoded, Columns, list[str]], _Answer]
"""What makes a prediction's response: ``tensors.encode_response`` (a message) or ``serialize_response``."""

STATUS_CODES = {
    400: StatusCode.INVALID_ARGUMENT,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.NOT_FOUND,
    405: StatusCode.UNIMPLEMENTED,
    408: StatusCode.DEADLINE_EXCEEDED,
    409: StatusCode.ALREADY_EXISTS,
    413: StatusCode.RESOURCE_EXHAUSTED,
    422: StatusCode.INVALID_ARGUMENT,
    429: StatusCode.RESOURCE_EXHAUSTED,
    500: StatusCode.INTERNAL,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.DEADLINE_EXCEEDED,
}
"""The gRPC status of each HTTP status an ``AsyncServeError`` carries; others: 4xx INVALID_ARGUMENT, 5xx INTERNAL."""


def status_of(exc: AsyncServeError) -> StatusCode:
    code = STATUS_CODES.get(exc.status_code)
    if code is not None:
        return code
    return StatusCode.INVALID_ARGUMENT if exc.status_code < 500 else StatusCode.INTERNAL


class InferenceServicer:
    """The V2 gRPC service over an :class:`HttpApp`'s registry, pipeline, admission, keys and metrics."""

    def __init__(self, http: HttpApp) -> None:
        self.http = http
        self.registry = http.registry
        self.pipeline = http.pipeline
        self.metrics = http.metrics
        self.auth = http.auth
        self.admission = http.inference.admission

    # Health and metadata

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Call) -> pb.ServerLiveResponse:
        return await self._serve("ServerLive", None, "", context, lambda: pb.ServerLiveResponse(live=True))

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Call) -> pb.ServerReadyResponse:
        def ready() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.http.serving())

        return await self._serve("ServerReady", None, "", context, ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Call) -> pb.ModelReadyResponse:
        def ready() -> pb.ModelReadyResponse:
            entry = self.registry.find(request.name, request.version or None)
            return pb.ModelReadyResponse(ready=entry.state is ModelState.READY and not self.admission.shutting_down)

        return await self._serve("ModelReady", None, request.name, context, ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Call) -> pb.ServerMetadataResponse:
        def metadata() -> pb.ServerMetadataResponse:
            name, version = self.http.service.name, asyncserve.__version__
            return pb.ServerMetadataResponse(name=name, version=version, extensions=EXTENSIONS)

        return await self._serve("ServerMetadata", "infer", "", context, metadata)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Call) -> pb.ModelMetadataResponse:
        def metadata() -> pb.ModelMetadataResponse:
            document = v2.model_metadata(self.registry.find(request.name, request.version or None).spec)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            inputs = [tensor(**item) for item in document.pop("inputs")]
            outputs = [tensor(**item) for item in document.pop("outputs")]
            return pb.ModelMetadataResponse(**document, inputs=inputs, outputs=outputs)

        return await self._serve("ModelMetadata", "infer", request.name, context, metadata)

    # Inference

    def ModelInfer(self, request: pb.ModelInferRequest, context: Call) -> Deferred:
        """Without a task, as an HTTP inference: the checks and the pipeline's start now, the answer made
        when the prediction's future is done (see ``Pipeline.start``)."""
        started = time.perf_counter()
        model = request.model_name
        key = self._key_or_abort("ModelInfer", "infer", model, context, started)
        self.metrics.request_started("grpc_ModelInfer")
        self.http.inferring += 1
        try:
            entry, deadline = self._admit(request, context)
            work, to_response = self._start_prediction(entry, deadline, request, tensors.serialize_response)
        except BaseException as exc:
            self.http.inferring -= 1
            raise self._settle("ModelInfer", "infer", model, key, started, exc, request.id) from None

        def finish(done: asyncio.Future[Any]) -> bytes:
            outcome: BaseException | None = None
            try:
                return to_response(done.result())  # CancelledError when the call was: rows withdrawn
            except BaseException as exc:
                outcome = exc
                raise self._settle("ModelInfer", "infer", model, key, started, exc, request.id) from None
            finally:
                self.http.inferring -= 1
                if outcome is None:
                    self._end("ModelInfer", model, key, StatusCode.OK, started)

        return Deferred(work, finish)

    def _admit(self, request: pb.ModelInferRequest, context: Call) -> tuple[Any, float]:
        asked_s = tensors.asked_seconds(context.time_remaining(), request.parameters)
        entry, deadline = self.admission.admit(
            request.model_name, request.model_version or None, asked_s, time.monotonic()
        )
        if entry.spec.streams:
            raise InvalidRequest(f"model {entry.spec.label!r} answers in parts: call ModelStreamInfer")
        return entry, deadline

    def _start_prediction(
        self, entry: Any, deadline: float, request: pb.ModelInferRequest, encode: Encoder[_Answer]
    ) -> tuple[asyncio.Future[Any], Callable[[Any], _Answer]]:
        """The prediction's future (cancel it to withdraw the rows), and what makes the response of its result
        with ``encode`` (the message, or its serialization)."""
        decoded = tensors.decode_request(request, entry.spec)
        request_id = request.id
        work, to_prediction = self.pipeline.start(
            entry, decoded.columns, decoded.rows, deadline,
            priority=decoded.priority, request_id=request_id or new_request_id(),
        )  # fmt: skip

        def to_response(result: Any) -> _Answer:
            prediction = to_prediction(result)
            return encode(entry.spec, request_id, decoded, prediction.outputs, prediction.degraded)

        return work, to_response

    async def _predict(self, entry: Any, deadline: float, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        work, to_response = self._start_prediction(entry, deadline, request, tensors.encode_response)
        return to_response(await work)  # cancelled with the call: the rows are withdrawn

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Call
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request answered in order: a streaming model's parts, one response each; any other model's
        prediction. A request that fails gets a response with its ``error_message``, and the stream goes on."""
        started = time.perf_counter()
        key = self._key_or_abort("ModelStreamInfer", "infer", "", context, started)
        self.metrics.request_started("grpc_ModelStreamInfer")
        code = StatusCode.OK
        try:
            async for request in requests:
                async for response in self._stream_one(request, context):
                    yield response
        except BaseException:
            code = StatusCode.CANCELLED
            raise
        finally:
            self._end("ModelStreamInfer", "", key, code, started)

    async def _stream_one(
        self, request: pb.ModelInferRequest, context: Call
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        self.http.inferring += 1
        try:
            asked_s = tensors.asked_seconds(context.time_remaining(), request.parameters)
            entry, deadline = self.admission.admit(
                request.model_name, request.model_version or None, asked_s, time.monotonic()
            )
            if not entry.spec.streams:
                yield pb.ModelStreamInferResponse(infer_response=await self._predict(entry, deadline, request))
                return
            decoded = tensors.decode_request(request, entry.spec)
            request_id = request.id or new_request_id()
            parts = self.pipeline.stream(entry, decoded.columns, decoded.rows, deadline, request_id=request_id)
            async with contextlib.aclosing(parts):  # type: ignore[type-var]
                async for part in parts:
                    response = tensors.encode_response(entry.spec, request.id, decoded, part, [])
                    yield pb.ModelStreamInferResponse(infer_response=response)
        except AsyncServeError as exc:
            self._log_model_error(exc, request.id)
            model = self.http.model_label(request.model_name)
            self.metrics.errors.labels("grpc_ModelStreamInfer", model, exc.code).inc()
            yield pb.ModelStreamInferResponse(error_message=exc.message)
        except Exception as exc:
            yield pb.ModelStreamInferResponse(error_message=self._bug("ModelStreamInfer", request.id, exc))
        finally:
            self.http.inferring -= 1

    # The model repository

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Call) -> pb.RepositoryIndexResponse:
        def index() -> pb.RepositoryIndexResponse:
            entries = [e for e in self.registry.entries if not request.ready or e.state is ModelState.READY]
            rows = [pb.RepositoryIndexResponse.ModelIndex(**entry.index_row()) for entry in entries]
            return pb.RepositoryIndexResponse(models=rows)

        return await self._serve("RepositoryIndex", "admin", "", context, index)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Call
    ) -> pb.RepositoryModelLoadResponse:
        async def load() -> pb.RepositoryModelLoadResponse:
            await self.registry.load(request.model_name)
            entry = self.registry.find(request.model_name)
            if entry.state is not ModelState.READY:
                raise ModelError(f"model {entry.spec.label!r} failed to load: {entry.reason}")
            return pb.RepositoryModelLoadResponse()

        return await self._serve("RepositoryModelLoad", "admin", request.model_name, context, load)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Call
    ) -> pb.RepositoryModelUnloadResponse:
        def unload() -> pb.RepositoryModelUnloadResponse:
            self.registry.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._serve("RepositoryModelUnload", "admin", request.model_name, context, unload)

    # Every unary call

    async def _serve(
        self,
        method: str,
        scope: str | None,
        model: str,
        context: Call,
        handler: Callable[..., T | Awaitable[T]],
        *args: Any,
    ) -> T:
        """Run ``handler(*args)`` under the call's key, metrics and error mapping."""
        started = time.perf_counter()
        key = self._key_or_abort(method, scope, model, context, started)
        self.metrics.request_started(f"grpc_{method}")
        try:
            result = handler(*args)
            if inspect.isawaitable(result):
                result = await result
        except BaseException as exc:
            request_id = getattr(args[0], "id", "") if args else ""
            raise self._settle(method, scope, model, key, started, exc, request_id) from None
        self._settle(method, scope, model, key, started, None)
        return result

    def _settle(
        self, method: str, scope: str | None, model: str, key: ApiKey | None, started: float,
        outcome: BaseException | None, request_id: str = "",
    ) -> BaseException:  # fmt: skip
        """Count a call's end (its key released, metrics, the audit log) and return what ends it:
        a GrpcError for an AsyncServeError or a bug, ``outcome`` itself for a cancellation."""
        route = f"grpc_{method}"
        code, ending = StatusCode.OK, outcome
        if isinstance(outcome, AsyncServeError):
            self._log_model_error(outcome, request_id)
            code = status_of(outcome)
            self.metrics.errors.labels(route, self.http.model_label(model), outcome.code).inc()
            ending = GrpcError(code, outcome.message, tuple(outcome.headers().items()))
        elif isinstance(outcome, Exception):
            message = self._bug(method, request_id, outcome)
            code = StatusCode.INTERNAL
            self.metrics.errors.labels(route, self.http.model_label(model), "internal").inc()
            ending = GrpcError(code, message)
        elif outcome is not None:  # the client went away, or its deadline passed
            code = StatusCode.CANCELLED
            self.metrics.disconnects.labels(route, self.http.model_label(model)).inc()
        self._end(method, model, key, code, started)
        if scope == "admin":  # logged before the client hears of it
            who = "-" if key is None else key.name
            audit_logger.info("%s grpc %s %s -> %s", who, method, model, code.name)
        return ending if ending is not None else GrpcError(code, "")

    def _key_or_abort(self, method: str, scope: str | None, model: str, context: Call, started: float) -> ApiKey | None:
        """The call's API key, checked against ``scope`` and taken against its limits; the call ends if refused."""
        if scope is None or not self.auth.enabled:
            return None
        try:
            key = self.auth.identify({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
            self.auth.authorize(key, scope)
            if key is not None:
                self.auth.admit(key, time.monotonic())
        except AsyncServeError as exc:
            self.metrics.errors.labels(f"grpc_{method}", self.http.model_label(model), exc.code).inc()
            code = status_of(exc)
            self.metrics.observe_grpc(method, self.http.model_label(model), code.name, time.perf_counter() - started)
            raise GrpcError(code, exc.message, tuple(exc.headers().items())) from None
        return key

    def _end(self, method: str, model: str, key: ApiKey | None, code: StatusCode, started: float) -> None:
        if key is not None:
            self.auth.release(key)
        self.metrics.request_finished(f"grpc_{method}")
        self.metrics.observe_grpc(method, self.http.model_label(model), code.name, time.perf_counter() - started)

    @staticmethod
    def _log_model_error(exc: AsyncServeError, request_id: str) -> None:
        if isinstance(exc, ModelError):  # the model's traceback is logged, never sent
            logger.error("request %s: %s", request_id or "-", exc.message, exc_info=exc.__cause__ or exc)

    def _bug(self, method: str, request_id: str, exc: Exception) -> str:
        logger.error("gRPC %s (request %s): unexpected error", method, request_id or "-", exc_info=exc)
        return f"internal server error; the server log has the details (gRPC {method}, request {request_id or '-'})"
