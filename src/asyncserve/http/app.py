"""The HTTP app: routes of the Open Inference Protocol (V2), the JSON API, jobs and operations, and the
one way every request is served (``handle``), whatever carried it (asyncserve's protocol or ASGI)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncserve
from asyncserve import tracing
from asyncserve.composition.deferred import DeferredPredictions
from asyncserve.config import Settings
from asyncserve.exceptions import (
    AsyncServeError,
    HostNotAllowed,
    ModelError,
    ModelNotReady,
    Overloaded,
    ShuttingDown,
    Unavailable,
    UnsupportedMediaType,
)
from asyncserve.http import docs, openapi, v2
from asyncserve.http.admin import RepositoryRoutes
from asyncserve.http.auth import ApiKey, Authenticator, audit_logger, is_loopback
from asyncserve.http.catalog import ModelCatalog
from asyncserve.http.inference import InferenceRoutes, parse_timeout
from asyncserve.http.jobs import JobsAPI
from asyncserve.http.openapi_jobs import JobsDocument
from asyncserve.http.protocol import Respond
from asyncserve.http.routing import Pending, Request, Response, Route, Router
from asyncserve.http.streams import GenerateRoutes
from asyncserve.http.ui import Dashboard
from asyncserve.metrics import CONTENT_TYPE, LoopLagProbe, Metrics
from asyncserve.runtime.batching import LOOP_HOPS
from asyncserve.runtime.peers import MetricsPeers
from asyncserve.runtime.pipeline import Pipeline
from asyncserve.runtime.registry import ModelRegistry
from asyncserve.service import Service

logger = logging.getLogger(__name__)

EXTENSIONS = ["binary_tensor_data", "model_repository"]
"""The protocol extensions this server implements, exactly as ``GET /v2`` reports them."""


class HttpApp:
    """Routes requests to handlers, renders every error as JSON, and counts each request in the metrics.

    Example::

        http_app = HttpApp(settings, service, registry, pipeline, deferred, metrics, loop_lag)
        http_app.handle(request, respond)  # respond(response, request_id), now or later
    """

    def __init__(
        self,
        settings: Settings,
        service: Service,
        registry: ModelRegistry,
        pipeline: Pipeline,
        deferred: DeferredPredictions,
        metrics: Metrics,
        loop_lag: LoopLagProbe,
        *,
        jobs: JobsAPI | None = None,
        peers: MetricsPeers | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.registry = registry
        self.pipeline = pipeline
        self.metrics = metrics
        self.loop_lag = loop_lag
        self.peers = peers
        self.auth = auth or Authenticator()
        """API keys; with none configured every route is open."""
        self.allowed_hosts = allowed_hosts(settings)
        """The Host names answered; None: any."""
        self._hosts_answered: set[str] = set()
        self.inference = InferenceRoutes(settings, registry, pipeline, deferred, jobs)
        self.repository = RepositoryRoutes(registry)
        self.jobs = jobs
        self.inferring = 0
        """Inference requests in flight (the server is idle when there are none)."""
        self._model_names = {spec.name for spec in service.specs}
        self._openapi_json: bytes | None = None
        self.dashboard = Dashboard(
            service.name, registry, metrics, loop_lag, executor_workers=settings.pool_size,
            broker=None if jobs is None else jobs.broker, peers=peers,
        )  # fmt: skip
        self._docs_assets = docs.DocsAssets()
        self._catalog = ModelCatalog(registry)
        self.router = self._build_router()

    @property
    def shutting_down(self) -> bool:
        return self.inference.shutting_down

    def _build_router(self) -> Router:
        r = Router()
        # The inference routes first: the router tries routes with parameters in order.
        inference = self.inference
        r.add("POST", "/v2/models/{model}/infer", inference.infer, "v2_infer", scope="infer", inference=True)
        r.add("POST", "/v1/models/{model}/predict", inference.predict, "v1_predict", scope="infer", inference=True)
        r.add(
            "POST",
            "/v1/models/{model}/versions/{version}/predict",
            inference.predict,
            "v1_predict",
            scope="infer",
            inference=True,
        )
        r.add("GET", "/v1/models", self.list_models, "v1_models", scope="infer")
        r.add("GET", "/v2/health/live", self.live, "live", scope=None)
        r.add("GET", "/v2/health/ready", self.ready, "ready", scope=None)
        r.add("GET", "/v2", self.server_metadata, "server_metadata", scope="infer")
        r.add("GET", "/v2/models/{model}", self.model_metadata, "model_metadata", scope="infer")
        r.add("GET", "/v2/models/{model}/versions/{version}", self.model_metadata, "model_metadata", scope="infer")
        r.add("GET", "/v2/models/{model}/ready", self.model_ready, "model_ready", scope=None)
        r.add("GET", "/v2/models/{model}/versions/{version}/ready", self.model_ready, "model_ready", scope=None)
        r.add(
            "POST",
            "/v2/models/{model}/versions/{version}/infer",
            inference.infer,
            "v2_infer",
            scope="infer",
            inference=True,
        )
        generate = GenerateRoutes(self.registry, self.pipeline, inference.admit)
        r.add("POST", "/v2/models/{model}/generate", generate.generate, "v2_generate", scope="infer", inference=True)
        stream = generate.generate_stream
        r.add("POST", "/v2/models/{model}/generate_stream", stream, "v2_generate_stream", scope="infer", inference=True)
        self.repository.add_routes(r)
        r.add(
            "GET", "/v1/predictions/{handle}", inference.deferred_result, "v1_deferred", scope="infer", inference=True
        )
        if self.jobs is not None:
            self.jobs.add_routes(r)
        r.add("GET", "/metrics", self.prometheus, "metrics", scope="metrics")
        r.add("GET", "/openapi.json", self.openapi_json, "openapi", scope=None)
        r.add("GET", "/docs", self.docs, "docs", scope=None)
        self.dashboard.add_routes(r)
        for name in docs.ASSET_TYPES:
            r.add("GET", f"/docs/{name}", self.docs_asset, "docs", scope=None)
        return r

    # Serving a request

    def handle(self, request: Request, respond: Respond) -> asyncio.Future[Any] | None:
        """Serve ``request``: ``respond`` gets its response (exactly once), now or when its work is done.

        Returns the work under way; cancelling it (the client went away) withdraws the request, and
        ``respond`` is then not called.
        """
        if tracing.tracer is not None and request.trace is None:  # tracing off: this check is all it costs
            return tracing.serve_request(self.handle, request, respond)
        started = time.perf_counter()
        route_name = "unknown"
        try:
            if not request.screened:  # pipelined requests, and the ASGI adapter's, are checked here
                self._check_origin(request.method, request.headers)
            route, request.params = self.router.match(request.method, request.path)
            route_name = route.name
            if self.auth.enabled:  # (else the request has no key, and needs none)
                request.key = self._admit(request, route)
        except AsyncServeError as exc:
            model = self.model_label(request.params.get("model", ""))
            respond(self._error_response(exc, route_name, model), request.request_id)
            self.metrics.observe_request(route_name, model, exc.status_code, time.perf_counter() - started)
            return None
        model = self.model_label(request.params.get("model", ""))
        self.metrics.request_started(route_name)
        if route.inference:
            self.inferring += 1
        try:
            reply = route.handler(request)
            if route.is_async:
                work: asyncio.Future[Any] = asyncio.get_running_loop().create_task(reply)  # type: ignore[arg-type]
                answer: Callable[[Any], Response] = _as_is
            elif isinstance(reply, Pending):
                work, answer = reply.work, reply.answer
            else:
                self._finish(request, route, model, started, respond, None, reply)  # type: ignore[arg-type]
                return None
        except Exception as exc:
            self._finish(request, route, model, started, respond, None, exc)
            return None
        # One partial, called with the finished work: no closure per request.
        work.add_done_callback(functools.partial(self._finish, request, route, model, started, respond, answer))
        return work

    def _check_origin(self, method: str, headers: dict[str, str]) -> None:
        """Refuse what a web page could send from a browser: another Host name (DNS rebinding), and POST bodies
        in the types a page may send without the browser asking first (forms, plain text)."""
        if self.allowed_hosts is not None:
            host = headers.get("host")
            # The few Host values a server sees are remembered: this check runs on every request.
            if host is not None and host not in self._hosts_answered:
                if _host_name(host) not in self.allowed_hosts:
                    raise HostNotAllowed(
                        f"this server does not answer to Host {host!r}; add it to --allowed-hosts "
                        "(ASYNCSERVE_ALLOWED_HOSTS)"
                    )
                if len(self._hosts_answered) < 64:
                    self._hosts_answered.add(host)
        content_type = headers.get("content-type")
        if method == "POST" and content_type is not None and content_type not in NOT_FORMS:
            media_type = content_type.partition(";")[0].strip().lower()
            if media_type in FORM_TYPES:
                raise UnsupportedMediaType(
                    f"content type {media_type!r} is not taken on POST (a web page could send it from another site); "
                    "send application/json"
                )

    def _admit(self, request: Request, route: Route) -> ApiKey | None:
        """The request's API key, checked against the route's scope and taken against its limits (asked only
        when the server has keys)."""
        if route.scope is None:
            return None
        key = self.auth.identify(request.headers)
        self.auth.authorize(key, route.scope)
        if key is not None:
            self.auth.admit(key, time.monotonic())
        return key

    def _finish(
        self,
        request: Request,
        route: Route,
        model: str,
        started: float,
        respond: Respond,
        answer: Callable[[Any], Response] | None,
        outcome: asyncio.Future[Any] | Response | Exception,
    ) -> None:
        route_name = route.name
        if route.inference:
            self.inferring -= 1
        if request.key is not None:
            self.auth.release(request.key)
        self.metrics.request_finished(route_name)
        if isinstance(outcome, asyncio.Future) and outcome.cancelled():
            self.metrics.disconnects.labels(route_name, model).inc()  # only a client that went cancels
            return
        if isinstance(outcome, Response):
            response = outcome
        else:
            response = self._outcome_response(request, route_name, model, answer, outcome)
        if route.scope == "admin" or route_name == "jobs_cancel":  # logged before the client hears of it
            who = "-" if request.key is None else request.key.name
            audit_logger.info("%s %s %s -> %d", who, request.method, request.path, response.status)
        respond(response, request.request_id)
        self.metrics.observe_request(route_name, model, response.status, time.perf_counter() - started)

    def _outcome_response(
        self,
        request: Request,
        route_name: str,
        model: str,
        answer: Callable[[Any], Response] | None,
        outcome: asyncio.Future[Any] | Exception,
    ) -> Response:
        # The failure is read, not raised: raising it here would tie it, through its traceback, to
        # this frame and so to itself, a cycle per failed request for the garbage collector to find.
        failure = outcome if isinstance(outcome, BaseException) else outcome.exception()
        if failure is None:
            try:
                return answer(outcome.result())  # type: ignore[misc,union-attr]
            except Exception as exc:  # encoding the outputs failed: a bug, logged
                failure = exc
        if not isinstance(failure, Exception):
            raise failure  # KeyboardInterrupt and the like are not a request's failure
        if not isinstance(failure, AsyncServeError):
            where = f"{request.method} {request.path}"
            logged = _log_fields(request, route_name, model, AsyncServeError.code)
            logger.error(
                "request %s: unexpected error on %s", request.request_id, where, exc_info=failure, extra=logged
            )
            failure = AsyncServeError(
                f"internal server error; the server log has the details (request {request.request_id})"
            )
        if isinstance(failure, ModelError):
            cause = failure.__cause__ or failure
            logged = _log_fields(request, route_name, model, failure.code)
            logger.error("request %s: %s", request.request_id, failure.message, exc_info=cause, extra=logged)
        return self._error_response(failure, route_name, model)

    def _error_response(self, exc: AsyncServeError, route_name: str, model: str) -> Response:
        self.metrics.errors.labels(route_name, model, exc.code).inc()
        return Response.json(exc.to_dict(), exc.status_code, exc.headers())

    def model_label(self, name: str) -> str:
        # Only names of served models become label values: a client must not be able to grow
        # the metrics without bound by asking for made-up models.
        return name if name in self._model_names else ""

    # Refusing from the head alone

    def early_response(self, method: str, path: str, headers: dict[str, str]) -> Response | None:
        """The answer to give at once, from its head, to an inference request that the swamped event loop
        cannot serve within its budget; None (almost always): serve the request.

        Under overload refusing must cost far less than serving: this runs before the body is read
        or decoded, from what the loop-lag probe measured a moment ago.
        """
        try:
            self._check_origin(method, headers)
        except AsyncServeError as exc:
            self.metrics.observe_request("unknown", "", exc.status_code, 0.0)
            return self._error_response(exc, "unknown", "")
        if self.auth.enabled:
            refused = self._refused_at_the_door(method, path, headers)
            if refused is not None:
                return refused
        lag = self.loop_lag.current_lag_s()
        if lag < 0.01 or method != "POST":
            return None
        try:
            route, params = self.router.match(method, path)
            overloaded = self._swamped(headers.get("x-request-timeout"), lag)
        except AsyncServeError:
            return None  # the handler gives the precise error
        if overloaded is None or not route.inference:
            return None
        model = self.model_label(params.get("model", ""))
        self.metrics.observe_request(route.name, model, overloaded.status_code, 0.0)
        return self._error_response(overloaded, route.name, model)

    def _refused_at_the_door(self, method: str, path: str, headers: dict[str, str]) -> Response | None:
        """401 or 403 from the head alone, so that a request without a valid key never has its body read."""
        try:
            route, params = self.router.match(method, path)
        except AsyncServeError:
            return None  # the handler gives the precise error
        try:
            if route.scope is not None:
                self.auth.authorize(self.auth.identify(headers), route.scope)
        except AsyncServeError as exc:
            model = self.model_label(params.get("model", ""))
            self.metrics.observe_request(route.name, model, exc.status_code, 0.0)
            return self._error_response(exc, route.name, model)
        return None

    def _swamped(self, asked_timeout: str | None, lag: float) -> Overloaded | None:
        budget = parse_timeout(asked_timeout) if asked_timeout is not None else self.settings.grace_period_s
        if LOOP_HOPS * lag < budget:
            return None
        return Overloaded(
            f"the server is overloaded (its event loop runs {lag * 1000:.0f} ms late, too late for this request's "
            f"{budget * 1000:.0f} ms); retry later",
            retry_after_s=max(1.0, lag),
        )

    # Health and metadata

    def live(self, request: Request) -> Response:
        return Response.json({"live": True})

    def serving(self) -> bool:
        """What ``ready`` answers 200 for: not shutting down, every model ready, no failing feature source
        (gRPC's ServerReady and health check ask it too)."""
        return not self.shutting_down and self.registry.ready and not self.pipeline.unhealthy_sources()

    def ready(self, request: Request) -> Response:
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

    def server_metadata(self, request: Request) -> Response:
        return Response.json({"name": self.service.name, "version": asyncserve.__version__, "extensions": EXTENSIONS})

    def model_metadata(self, request: Request) -> Response:
        entry = self.registry.find(request.params["model"], request.params.get("version"))
        return Response.json(v2.model_metadata(entry.spec))

    def list_models(self, request: Request) -> Response:
        return Response.json(self._catalog.models())

    def model_ready(self, request: Request) -> Response:
        entry = self.registry.get_ready(request.params["model"], request.params.get("version"))
        return Response.json({"name": entry.spec.name, "ready": True})

    # Operations

    async def prometheus(self, request: Request) -> Response:
        body = self.metrics.exposition() if self.peers is None else await self.peers.exposition()
        return Response(200, body, content_type=CONTENT_TYPE)

    def openapi_json(self, request: Request) -> Response:
        if self._openapi_json is None:
            jobs = None if self.jobs is None else JobsDocument(self.jobs.max_batch, self.jobs.webhooks.enabled)
            document = openapi.openapi_document(self.service.name, asyncserve.__version__, self.service.specs, jobs)
            self._openapi_json = Response.json(document).body
        return Response(200, self._openapi_json)

    def docs(self, request: Request) -> Response:
        html = docs.docs_html("/openapi.json", f"{self.service.name} - asyncserve")
        return Response(200, html.encode(), content_type="text/html; charset=utf-8")

    async def docs_asset(self, request: Request) -> Response:
        """Swagger UI's script or stylesheet, from the package (``/docs`` works offline)."""
        name = request.path.rpartition("/")[2]
        body = await self._docs_assets.read(name)
        # The page asks for them with ?v=<version>: a new version is a new URL, so a day's caching is safe.
        headers = {"cache-control": "public, max-age=86400"}
        return Response(200, body, headers, content_type=docs.ASSET_TYPES[name])


def _log_fields(request: Request, route_name: str, model: str, code: str) -> dict[str, str | None]:
    """What a log line about a failed request says of it, as ``extra=`` fields (``asyncserve/logs.py``)."""
    return {"request_id": request.request_id, "route": route_name, "model": model or None, "code": code}


def _as_is(response: Response) -> Response:
    return response


FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
"""The body types a web page may POST to another site without the browser asking it first (CORS)."""

NOT_FORMS = frozenset({"application/json", "application/octet-stream"})
"""Content-Type values seen on most requests, known at once not to be forms."""

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The Host names a server answers to (None: any), from ``allowed_hosts`` or, by default, where it listens."""
    names = frozenset(name.strip().lower() for name in settings.allowed_hosts.split(",") if name.strip())
    if "*" in names:
        return None
    if names:
        return names | LOOPBACK_NAMES if is_loopback(settings.host) else names
    return LOOPBACK_NAMES if is_loopback(settings.host) else None


def _host_name(host: str) -> str:
    """A Host header without its port: ``example.com:8000`` -> ``example.com``, ``[::1]:8000`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if host.count(":") == 1 else host
