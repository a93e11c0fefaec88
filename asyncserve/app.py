"""The ASGI application: routes of the Open Inference Protocol (V2) and the JSON API, errors, lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

import asyncserve
from asyncserve import openapi, v2
from asyncserve.batching import LOOP_HOPS
from asyncserve.config import Settings
from asyncserve.disconnects import ClientGone, DisconnectWatch
from asyncserve.exceptions import (
    AsyncServeError,
    ConfigurationError,
    InvalidRequest,
    ModelError,
    ModelNotReady,
    Overloaded,
    SchemaViolation,
    ShuttingDown,
    Unavailable,
)
from asyncserve.executor import Executor, ProcessExecutor, ThreadExecutor
from asyncserve.inference import InferenceRoutes, parse_timeout
from asyncserve.jobs import open_broker
from asyncserve.jobs.webhooks import WebhookDelivery, WebhookSettings
from asyncserve.jobs.worker import Worker
from asyncserve.jobs_api import JobsAPI
from asyncserve.lazy import (
    DeferredPredictions,
    LazyPrediction,
    MemoryPredictionCache,
    PredictionCache,
    RedisPredictionCache,
)
from asyncserve.metrics import COMPILED, CONTENT_TYPE, LoopLagProbe, Metrics
from asyncserve.peers import MetricsPeers, WorkerGroup
from asyncserve.pipeline import Pipeline
from asyncserve.predlog import InputPolicy, PredictionLogger, open_sink
from asyncserve.registry import ModelRegistry
from asyncserve.routing import (
    JSON_TYPE,
    Receive,
    Request,
    Response,
    Route,
    Router,
    Scope,
    Send,
    header_dict,
    new_request_id,
)
from asyncserve.service import Service

logger = logging.getLogger(__name__)

Refusal = tuple[int, list[tuple[bytes, bytes]], bytes]
"""A response written straight from the HTTP parser: status, headers (without content-length), body."""

Respond = Callable[[Response, str], None]
"""Writes a response (and its request id) straight to the client's connection."""

EXTENSIONS = ["binary_tensor_data", "model_repository"]
"""The protocol extensions this server implements, exactly as ``GET /v2`` reports them."""

IDLE_CHECK_S = 0.05
"""How often an idle server looks for deferred predictions to compute (``deferred_when_idle``)."""


def make_executor(settings: Settings) -> Executor:
    if settings.executor == "process":
        return ProcessExecutor(settings.pool_size)
    return ThreadExecutor(settings.pool_size)


def make_prediction_logger(settings: Settings, metrics: Metrics) -> PredictionLogger | None:
    if not settings.prediction_log:
        return None
    redact = frozenset(name.strip() for name in settings.prediction_log_redact.split(",") if name.strip())
    return PredictionLogger(
        open_sink(settings.prediction_log),
        max_buffer=settings.prediction_log_buffer,
        overflow="refuse" if settings.prediction_log_overflow == "refuse" else "drop",
        spill_path=settings.prediction_log_spill,
        input_policy=InputPolicy(settings.prediction_log_inputs, redact),  # type: ignore[arg-type]
        registry=metrics.registry,
    )


def make_prediction_cache(settings: Settings) -> PredictionCache | None:
    if not settings.prediction_cache:
        return None
    if settings.prediction_cache == "memory":
        return MemoryPredictionCache(settings.prediction_cache_ttl_s, settings.prediction_cache_size)
    if settings.prediction_cache.startswith(("redis://", "rediss://", "unix://")):
        return RedisPredictionCache(settings.prediction_cache, ttl_s=settings.prediction_cache_ttl_s)
    raise ConfigurationError(f"prediction_cache must be 'memory' or a redis:// URL, got {settings.prediction_cache!r}")


class AsyncServeApp:
    """Serves a :class:`Service` over HTTP; an ASGI app to run under uvicorn (see ``asyncserve.server``).

    Example::

        app = AsyncServeApp(service, Settings(executor="thread"))
        # uvicorn.run(app) or asyncserve.serve(service)
    """

    def __init__(
        self, service: Service, settings: Settings | None = None, *, worker_group: WorkerGroup | None = None
    ) -> None:
        self.service = service
        self.settings = settings or Settings()
        self.metrics = Metrics()
        self.peers = None if worker_group is None else MetricsPeers(worker_group, self.metrics.exposition)
        """With ``--workers N``: how ``/metrics`` gathers every worker's."""
        self.metrics.build_info.labels(asyncserve.__version__, "true" if COMPILED else "false").set(1)
        self.executor = make_executor(self.settings)
        self.disconnects = DisconnectWatch()
        self.loop_lag = LoopLagProbe(self.metrics.loop_lag, self.settings.loop_lag_interval_s)
        self.input_pending: Callable[[], bool] = lambda: False
        """Whether requests already received wait for the event loop to parse them (set by asyncserve's protocol)."""
        self.registry = ModelRegistry(
            service.specs, self.executor, self.metrics,
            loop_delay_s=self.loop_lag.current_lag_s, input_pending=lambda: self.input_pending(),
        )  # fmt: skip
        self.pipeline = Pipeline(
            self.registry,
            self.metrics,
            make_prediction_logger(self.settings, self.metrics),
            make_prediction_cache(self.settings),
        )
        self.deferred = DeferredPredictions(max_handles=self.settings.max_deferred)
        self.broker = open_broker(self.settings.jobs) if self.settings.jobs else None
        self.webhook_settings = WebhookSettings.from_env()
        self.jobs_api = (
            JobsAPI(self.broker, self.registry, self.pipeline, self.webhook_settings, self.settings.max_batch_jobs)
            if self.broker is not None
            else None
        )
        self.job_workers: list[Worker] = []
        self._worker_tasks: set[asyncio.Task[None]] = set()
        self.webhooks = WebhookDelivery(self.webhook_settings)
        self.inference = InferenceRoutes(self.settings, self.registry, self.pipeline, self.deferred, self.jobs_api)
        self._inferring = 0
        """Inference requests in flight (the server is idle when there are none)."""
        self._count_elsewhere()
        self._loading: asyncio.Task[None] | None = None
        self._openapi_json: bytes | None = None
        self.router = self._build_router()
        self._model_names = {spec.name for spec in service.specs}

    def _count_elsewhere(self) -> None:
        counted, pipeline, deferred = self.metrics.counted, self.pipeline, self.deferred
        counted.read_from("asyncserve_coalesced_requests", lambda: pipeline.coalescer.coalesced)
        if pipeline.cache is not None:
            cache = pipeline.cache
            counted.read_from("asyncserve_prediction_cache_hits", lambda: cache.hits)
            counted.read_from("asyncserve_prediction_cache_misses", lambda: cache.misses)
        counted.read_from("asyncserve_deferred_created", lambda: deferred.created)
        counted.read_from("asyncserve_deferred_resolved", lambda: deferred.resolved)
        counted.read_from("asyncserve_deferred_expired", lambda: deferred.expired)

    def _build_router(self) -> Router:
        r = Router()
        # The inference routes first: the router tries routes with parameters in order.
        inference = self.inference
        r.add(
            "POST", "/v2/models/{model}/infer", inference.infer, "v2_infer",
            cancel_on_disconnect=True, direct=inference.infer_now,
        )  # fmt: skip
        r.add(
            "POST", "/v1/models/{model}/predict", inference.predict, "v1_predict",
            cancel_on_disconnect=True, direct=inference.predict_now,
        )  # fmt: skip
        r.add("GET", "/v2/health/live", self.live, "live")
        r.add("GET", "/v2/health/ready", self.ready, "ready")
        r.add("GET", "/v2", self.server_metadata, "server_metadata")
        r.add("GET", "/v2/models/{model}", self.model_metadata, "model_metadata")
        r.add("GET", "/v2/models/{model}/versions/{version}", self.model_metadata, "model_metadata")
        r.add("GET", "/v2/models/{model}/ready", self.model_ready, "model_ready")
        r.add("GET", "/v2/models/{model}/versions/{version}/ready", self.model_ready, "model_ready")
        r.add(
            "POST", "/v2/models/{model}/versions/{version}/infer", inference.infer, "v2_infer",
            cancel_on_disconnect=True, direct=inference.infer_now,
        )  # fmt: skip
        r.add("POST", "/v2/repository/index", self.repository_index, "repository_index")
        r.add("POST", "/v2/repository/models/{model}/load", self.repository_load, "repository_load")
        r.add("POST", "/v2/repository/models/{model}/unload", self.repository_unload, "repository_unload")
        r.add("GET", "/v1/predictions/{handle}", inference.deferred_result, "v1_deferred", cancel_on_disconnect=True)
        if self.jobs_api is not None:
            jobs = self.jobs_api
            r.add("POST", "/v1/jobs", jobs.submit, "jobs_submit")
            r.add("POST", "/v1/jobs/batch", jobs.submit_batch, "jobs_batch")
            r.add("GET", "/v1/jobs", jobs.list, "jobs_list")
            r.add("GET", "/v1/jobs/{job}", jobs.get, "jobs_get")
            r.add("GET", "/v1/jobs/{job}/events", jobs.events, "jobs_events")
            r.add("DELETE", "/v1/jobs/{job}", jobs.cancel, "jobs_cancel")
        r.add("GET", "/metrics", self.prometheus, "metrics")
        r.add("GET", "/openapi.json", self.openapi_json, "openapi")
        r.add("GET", "/docs", self.docs, "docs")
        return r

    # ASGI entry point

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        # Websocket scopes are not served; returning closes them.

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        arrived = time.monotonic()
        headers = header_dict(scope["headers"])
        request_id = headers.get("x-request-id") or new_request_id()
        route_name, model = "unknown", ""
        try:
            route, params = self.router.match(scope["method"], scope["path"])
            route_name, model = route.name, self._model_label(params.get("model", ""))
            request = Request(scope, receive, request_id, params, headers, arrived, self.settings.max_body_bytes)
            self.metrics.request_started(route_name)
            try:
                if route.cancel_on_disconnect:
                    self._shed_if_swamped(request)
                    self._inferring += 1
                    try:
                        # Read the body first: afterwards the only message left to receive is the disconnect.
                        await request.body()
                        response = await self.disconnects.run(route.handler(request), receive)
                    finally:
                        self._inferring -= 1
                else:
                    response = await route.handler(request)
            finally:
                self.metrics.request_finished(route_name)
        except ClientGone:
            self.metrics.disconnects.labels(route_name, model).inc()
            return
        except Exception as exc:
            response = self._failure_response(exc, request_id, route_name, model, f"{scope['method']} {scope['path']}")
        await response.send(send, request_id)
        self.metrics.observe_request(route_name, model, response.status, time.perf_counter() - started)

    def _shed_if_swamped(self, request: Request) -> None:
        """Refuse before reading the body when the event loop alone is already slower than the request's budget.

        Under overload refusing must cost less than serving: this check runs before the body is
        read or decoded, from what the loop-lag probe measured a moment ago. (Served by asyncserve's
        own protocol, such a request is refused even earlier, by ``refusal``, from the HTTP parser.)
        """
        overloaded = self._swamped(request.headers.get("x-request-timeout"))
        if overloaded is not None:
            raise overloaded

    def _swamped(self, asked_timeout: str | None) -> Overloaded | None:
        lag = self.loop_lag.current_lag_s()
        if lag < 0.01:
            return None
        budget = parse_timeout(asked_timeout) if asked_timeout is not None else self.settings.grace_period_s
        if LOOP_HOPS * lag < budget:
            return None
        return Overloaded(
            f"the server is overloaded (its event loop runs {lag * 1000:.0f} ms late, too late for this request's "
            f"{budget * 1000:.0f} ms); retry later",
            retry_after_s=max(1.0, lag),
        )

    def refusal(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]) -> Refusal | None:
        """The answer to give at once, from the HTTP parser, to an inference request that the swamped
        event loop cannot serve within its budget; None (almost always): serve the request."""
        if self.loop_lag.current_lag_s() < 0.01 or method != b"POST":
            return None
        try:
            route, params = self.router.match("POST", url.partition(b"?")[0].decode("latin-1"))
            header = dict(headers)
            asked = header.get(b"x-request-timeout")
            overloaded = self._swamped(None if asked is None else asked.decode("latin-1"))
        except (AsyncServeError, UnicodeDecodeError):
            return None  # the ASGI path gives the precise error
        if overloaded is None or not route.cancel_on_disconnect:
            return None
        request_id = header.get(b"x-request-id") or new_request_id().encode()
        route_name, model = route.name, self._model_label(params.get("model", ""))
        self.metrics.errors.labels(route_name, model, overloaded.code).inc()
        self.metrics.observe_request(route_name, model, overloaded.status_code, 0.0)
        extra = [(name.encode(), value.encode()) for name, value in overloaded.headers().items()]
        response_headers = [(b"content-type", JSON_TYPE.encode()), (b"x-request-id", request_id), *extra]
        return overloaded.status_code, response_headers, orjson.dumps(overloaded.to_dict())

    # Inference straight from the HTTP parser

    def direct_request(self, method: str, path: str, raw_headers: list[tuple[bytes, bytes]]) -> DirectRequest | None:
        """The inference request that asyncserve's protocol may serve without ASGI (``serve_direct``), or None.

        Only the plain case qualifies: an inference route, a declared body within the limit, no
        ``Prefer`` (lazy and asynchronous answers go through ASGI). Every error of a request taken
        here is answered as the ASGI path answers it.
        """
        if method != "POST" or self.shutting_down:
            return None
        try:
            route, params = self.router.match(method, path)
        except AsyncServeError:
            return None  # the ASGI path gives the precise error
        if route.direct is None:
            return None
        headers = header_dict(raw_headers)
        declared = headers.get("content-length", "")
        if "prefer" in headers or not declared.isdigit() or int(declared) > self.settings.max_body_bytes:
            return None
        return DirectRequest(route, params, method, path, raw_headers, headers, time.monotonic())

    def serve_direct(self, direct: DirectRequest, body: bytes, respond: Respond) -> asyncio.Future[Any] | None:
        """Serve a request taken by ``direct_request``, its body read: ``respond`` gets the response, at once
        or when the prediction is done. Returns the prediction under way (cancel it when the client goes)."""
        started = time.perf_counter()
        route_name, model = direct.route.name, self._model_label(direct.params.get("model", ""))
        request_id = direct.headers.get("x-request-id") or new_request_id()
        scope = {"type": "http", "method": direct.method, "path": direct.path, "headers": direct.raw_headers}
        limit = self.settings.max_body_bytes
        request = Request(scope, _no_receive, request_id, direct.params, direct.headers, direct.arrived, limit, body)
        self.metrics.request_started(route_name)
        self._inferring += 1
        finish = functools.partial(self._finish_direct, direct, request_id, route_name, model, started, respond)
        try:
            work, answer = direct.route.direct(request, body)  # type: ignore[misc]
        except Exception as exc:
            finish(None, exc)
            return None
        work.add_done_callback(lambda done: finish(answer, done))
        return work

    def _finish_direct(
        self,
        direct: DirectRequest,
        request_id: str,
        route_name: str,
        model: str,
        started: float,
        respond: Respond,
        answer: Callable[[Any], Response] | None,
        outcome: asyncio.Future[Any] | Exception,
    ) -> None:
        self._inferring -= 1
        self.metrics.request_finished(route_name)
        if isinstance(outcome, asyncio.Future) and outcome.cancelled():
            self.metrics.disconnects.labels(route_name, model).inc()  # only a client that went cancels
            return
        # The failure is read, not raised: raising it here would tie it, through its traceback, to
        # this frame and so to itself, a cycle per failed request for the garbage collector to find.
        failure = outcome if isinstance(outcome, BaseException) else outcome.exception()
        if failure is None:
            try:
                response = answer(outcome.result())  # type: ignore[misc,union-attr]
            except Exception as exc:  # encoding the outputs failed: a bug, logged
                failure = exc
        if failure is not None:
            if not isinstance(failure, Exception):
                raise failure  # KeyboardInterrupt and the like are not a request's failure
            where = f"{direct.method} {direct.path}"
            response = self._failure_response(failure, request_id, route_name, model, where)
        respond(response, request_id)
        self.metrics.observe_request(route_name, model, response.status, time.perf_counter() - started)

    def _model_label(self, name: str) -> str:
        # Only names of served models become label values: a client must not be able to grow
        # the metrics without bound by asking for made-up models.
        return name if name in self._model_names else ""

    def _failure_response(self, exc: Exception, request_id: str, route_name: str, model: str, where: str) -> Response:
        if not isinstance(exc, AsyncServeError):
            logger.error("request %s: unexpected error on %s", request_id, where, exc_info=exc)
            exc = AsyncServeError(f"internal server error; the server log has the details (request {request_id})")
        return self._error_response(exc, request_id, route_name, model)

    def _error_response(self, exc: AsyncServeError, request_id: str, route_name: str, model: str) -> Response:
        if isinstance(exc, ModelError):
            logger.error("request %s: %s", request_id, exc.message, exc_info=exc.__cause__ or exc)
        self.metrics.errors.labels(route_name, model, exc.code).inc()
        return Response.json(exc.to_dict(), exc.status_code, exc.headers())

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        self.loop_lag.start()
        if self.peers is not None:
            await self.peers.start()
        self.registry.start()
        await self.webhooks.__aenter__()
        if self.broker is not None:
            await self.broker.open()
        if self.pipeline.predlog is not None:
            await self.pipeline.predlog.start()
        await self.pipeline.open()
        self.service.bind(self)
        # Models load in the background so that liveness answers while they do.
        self._loading = asyncio.get_running_loop().create_task(self._load_then_work(), name="asyncserve-load")
        self._loading.add_done_callback(_log_failure)
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.aclose()
        await send({"type": "lifespan.shutdown.complete"})

    async def _load_then_work(self) -> None:
        await self.registry.load_all()
        if self.settings.deferred_when_idle:
            task = asyncio.get_running_loop().create_task(self._compute_deferred_when_idle(), name="asyncserve-idle")
            task.add_done_callback(_log_failure)
            self._worker_tasks.add(task)
        # Job workers start once the models can run their jobs.
        if self.broker is not None and self.jobs_api is not None:
            for _ in range(self.settings.job_workers):
                worker = Worker(
                    self.broker, self.jobs_api.run, concurrency=self.settings.job_concurrency,
                    lease_s=self.settings.job_lease_s, webhooks=self.webhooks,
                )  # fmt: skip
                await worker.__aenter__()
                self.job_workers.append(worker)
                task = asyncio.get_running_loop().create_task(worker.run(), name=f"asyncserve-{worker.worker_id}")
                task.add_done_callback(_log_failure)
                self._worker_tasks.add(task)

    async def _compute_deferred_when_idle(self) -> None:
        """Compute unread deferred predictions, one at a time, while no inference request is in flight."""
        while not self.shutting_down:
            await asyncio.sleep(IDLE_CHECK_S)
            while self._inferring == 0 and not self.shutting_down:
                if not await self.deferred.compute_when_idle(limit=1):
                    break

    @property
    def shutting_down(self) -> bool:
        return self.inference.shutting_down

    def begin_shutdown(self) -> None:
        """Turn readiness off and refuse new predictions; in-flight ones go on (the server drains them)."""
        self.inference.shutting_down = True

    async def aclose(self) -> None:
        """Release the models' workers and background tasks, after in-flight requests have finished."""
        self.inference.shutting_down = True
        self.service.unbind(self)
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading
        # In-flight requests are done (the server drained them). Job workers stop claiming and hand
        # back what they could not finish; then stop the batchers, flush the prediction log (every
        # accepted record written or spilled), close the sources, the executor, webhooks, the broker.
        await asyncio.gather(*(w.aclose(timeout_s=self.settings.grace_period_s) for w in self.job_workers))
        if self._worker_tasks:
            await asyncio.wait(self._worker_tasks)
        await self.registry.aclose()
        if self.pipeline.predlog is not None:
            await self.pipeline.predlog.aclose(timeout_s=self.settings.grace_period_s)
        await self.pipeline.aclose()
        await self.executor.aclose()
        await self.webhooks.aclose(timeout_s=self.settings.grace_period_s)
        if self.peers is not None:
            await self.peers.aclose()
        if self.broker is not None:
            await self.broker.aclose()
        await self.loop_lag.aclose()
        await self.disconnects.aclose()

    async def wait_ready(self) -> None:
        """Wait until the start-up loading has finished (whether every model loaded or not)."""
        if self._loading is not None:
            await asyncio.shield(self._loading)

    # Health and metadata

    async def live(self, request: Request) -> Response:
        return Response.json({"live": True})

    async def ready(self, request: Request) -> Response:
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down")
        if not self.registry.ready:
            waiting = [e.index_row() for e in self.registry.entries if e.state.value != "READY"]
            exc = ModelNotReady(f"not every model is ready: {waiting}", retry_after_s=2.0)
            return Response.json({"ready": False, **exc.to_dict()}, 503, exc.headers())
        failing = self.pipeline.unhealthy_sources()
        if failing:
            down = Unavailable(f"feature source(s) {failing} are failing and their models have no defaults")
            return Response.json({"ready": False, **down.to_dict()}, 503, down.headers())
        return Response.json({"ready": True})

    async def server_metadata(self, request: Request) -> Response:
        return Response.json({"name": self.service.name, "version": asyncserve.__version__, "extensions": EXTENSIONS})

    async def model_metadata(self, request: Request) -> Response:
        entry = self.registry.find(request.params["model"], request.params.get("version"))
        return Response.json(v2.model_metadata(entry.spec))

    async def model_ready(self, request: Request) -> Response:
        entry = self.registry.get_ready(request.params["model"], request.params.get("version"))
        return Response.json({"name": entry.spec.name, "ready": True})

    def lazy(self, model: str, inputs: Any, version: str | None = None) -> LazyPrediction:
        """``Service.lazy``: the model and inputs checked now, the prediction computed on the first await."""
        return self.inference.lazy(model, inputs, version)

    # Model repository extension

    async def repository_index(self, request: Request) -> Response:
        body = await request.body()
        only_ready = _index_filter(body)
        rows = [e.index_row() for e in self.registry.entries if not only_ready or e.state.value == "READY"]
        return Response.json(rows)

    async def repository_load(self, request: Request) -> Response:
        await self.registry.load(request.params["model"])
        entry = self.registry.find(request.params["model"])
        if entry.state.value != "READY":
            raise ModelError(f"model {entry.spec.label!r} failed to load: {entry.reason}")
        return Response.json({})

    async def repository_unload(self, request: Request) -> Response:
        self.registry.unload(request.params["model"])
        return Response.json({})

    # Operations

    async def prometheus(self, request: Request) -> Response:
        body = self.metrics.exposition() if self.peers is None else await self.peers.exposition()
        return Response(200, body, content_type=CONTENT_TYPE)

    async def openapi_json(self, request: Request) -> Response:
        if self._openapi_json is None:
            document = openapi.openapi_document(self.service.name, asyncserve.__version__, self.service.specs)
            self._openapi_json = Response.json(document).body
        return Response(200, self._openapi_json)

    async def docs(self, request: Request) -> Response:
        html = openapi.docs_html("/openapi.json", f"{self.service.name} - asyncserve")
        return Response(200, html.encode(), content_type="text/html; charset=utf-8")


@dataclass(slots=True)  # (not frozen: a frozen dataclass's __init__ costs several times more, per request)
class DirectRequest:
    """An inference request taken at the HTTP parser, its headers read (see ``AsyncServeApp.direct_request``)."""

    route: Route
    params: dict[str, str]
    method: str
    path: str
    raw_headers: list[tuple[bytes, bytes]]
    headers: dict[str, str]
    arrived: float


async def _no_receive() -> dict[str, Any]:
    raise RuntimeError("a request served from the HTTP parser has its body already; there is nothing to receive")


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task %s failed", task.get_name(), exc_info=task.exception())


def _index_filter(body: bytes) -> bool:
    """The repository index request's optional ``{"ready": true}``: list only ready models."""
    if not body.strip():
        return False
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the repository index request is not valid JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("ready", False), bool):
        raise SchemaViolation("ready", 'send {"ready": true} or {"ready": false}, or no body')
    return bool(request.get("ready", False))
