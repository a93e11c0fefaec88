"""The composition root: one :class:`App` builds every component of a served :class:`Service` from one
:class:`Settings`, starts them in order and stops them in reverse.

Example::

    async with App(service, Settings(jobs="memory://")) as app:
        await app.wait_ready()
        ...                                # app.http.handle(request, respond)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Self

import asyncserve
from asyncserve import tracing
from asyncserve._utils import cause_of, display_url
from asyncserve.composition.caches import MemoryPredictionCache, PredictionCache, RedisPredictionCache
from asyncserve.composition.deferred import DeferredPredictions, LazyPrediction
from asyncserve.config import Settings
from asyncserve.exceptions import ConfigurationError, StartupError
from asyncserve.grpc import require_grpc
from asyncserve.http.app import HttpApp
from asyncserve.http.auth import Authenticator
from asyncserve.http.jobs import JobsAPI
from asyncserve.jobs import Broker, open_broker
from asyncserve.jobs.webhooks import WebhookDelivery
from asyncserve.jobs.worker import Worker
from asyncserve.metrics import LoopLagProbe, Metrics
from asyncserve.predlog import InputPolicy, PredictionLogger, open_sink
from asyncserve.runtime.executor import Executor, ProcessExecutor, ThreadExecutor
from asyncserve.runtime.peers import MetricsPeers, WorkerGroup
from asyncserve.runtime.pipeline import Pipeline
from asyncserve.runtime.registry import ModelRegistry
from asyncserve.service import Service

if TYPE_CHECKING:
    from asyncserve.grpc.server import GrpcServer

logger = logging.getLogger(__name__)

KEYS_CHECK_S = 1.0
"""How often the API keys file is checked for changes."""

IDLE_CHECK_S = 0.05
"""How often an idle server looks for deferred predictions to compute (``deferred_when_idle``)."""


class App:
    """A :class:`Service` ready to serve: models, batchers, executor, pipeline, jobs and the HTTP app.

    Start-up (``__aenter__``) opens each component in order; models load in the background, so
    liveness answers while they do (:meth:`wait_ready` waits for them). Shutdown (``aclose``) closes
    them in reverse, each attempted whatever the others did, and reports every failure: job workers
    stop claiming and hand back their jobs, the batchers finish running batches, the prediction log
    is flushed (every accepted record written or spilled), then feature sources, executor, webhooks,
    peers and broker close.
    """

    def __init__(
        self,
        service: Service,
        settings: Settings | None = None,
        *,
        worker_group: WorkerGroup | None = None,
        input_pending: Callable[[], bool] | None = None,
    ) -> None:
        if not isinstance(service, Service):
            raise ConfigurationError(f"App() takes an asyncserve.Service, got {type(service).__name__}")
        self.service = service
        self.settings = settings or Settings()
        self.metrics = Metrics()
        self.metrics.build_info.labels(asyncserve.__version__).set(1)
        self.peers = None if worker_group is None else MetricsPeers(worker_group, self.metrics.exposition)
        """With ``--workers N``: how ``/metrics`` gathers every worker's."""
        self.executor = make_executor(self.settings)
        self.loop_lag = LoopLagProbe(self.metrics.loop_lag, self.settings.loop_lag_interval_s)
        self.input_pending: Callable[[], bool] = input_pending or (lambda: False)
        """Whether requests already received wait for the event loop to parse them (set by the HTTP server)."""
        self.registry = ModelRegistry(
            service.specs, self.executor, self.metrics,
            loop_delay_s=self.loop_lag.current_lag_s, input_pending=lambda: self.input_pending(),
            threads_per_call=self.settings.threads_per_call,
        )  # fmt: skip
        self.pipeline = Pipeline(
            self.registry, self.metrics, make_prediction_logger(self.settings, self.metrics),
            make_prediction_cache(self.settings),
        )  # fmt: skip
        self.deferred = DeferredPredictions(max_handles=self.settings.max_deferred)
        self.broker: Broker | None = open_broker(self.settings.jobs) if self.settings.jobs else None
        webhook_settings = self.settings.webhooks
        self.webhooks = WebhookDelivery(webhook_settings)
        self.jobs = None
        if self.broker is not None:
            self.jobs = JobsAPI(
                self.broker, self.registry, self.pipeline, webhook_settings, self.settings.max_batch_jobs
            )
        self.auth = Authenticator.from_settings(self.settings.api_keys_file, self.settings.api_keys)
        self.http = HttpApp(
            self.settings, service, self.registry, self.pipeline, self.deferred, self.metrics, self.loop_lag,
            jobs=self.jobs, peers=self.peers, auth=self.auth,
        )  # fmt: skip
        self._count_elsewhere()
        self.grpc: GrpcServer | None = None
        """The gRPC server, with ``grpc_port`` set (started with the app)."""
        self.job_workers: list[Worker] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._loading: asyncio.Task[None] | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._close_errors: list[Exception] = []

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

    # Lifecycle

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("this App has been started already; build another App to serve again")
        self._stack = stack = contextlib.AsyncExitStack()
        try:
            await self._start(stack)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        grace_s = self.settings.grace_period_s
        stop_tracing = tracing.configure(self.settings)
        if stop_tracing is not None:  # closed last: spans of the shutdown are flushed too
            self._on_close(stack, "the trace exporter", lambda: asyncio.to_thread(stop_tracing))
        self.loop_lag.start()
        self._on_close(stack, "the loop-lag probe", self.loop_lag.aclose)
        if self.broker is not None:
            url = display_url(self.settings.jobs)
            fix = "start it, or set ASYNCSERVE_JOBS (--broker) to a broker that answers (sqlite://var/jobs.db)"
            await _starting(f"job broker {url}", fix, self.broker.open())
            self._on_close(stack, "the job broker", self.broker.aclose)
        if self.peers is not None:
            fix = "check that the temporary directory (TMPDIR) is writable"
            await _starting("the --workers metrics peers", fix, self.peers.start())
            self._on_close(stack, "the metrics peers", self.peers.aclose)
        await _starting("webhook delivery", "check the ASYNCSERVE_WEBHOOK_* settings", self.webhooks.__aenter__())
        self._on_close(stack, "webhook delivery", lambda: self.webhooks.aclose(timeout_s=grace_s))
        self._on_close(stack, "the executor", self.executor.aclose)
        await self._start_pipeline(stack, grace_s)
        self.registry.start()
        self._on_close(stack, "the batchers", self.registry.aclose)
        self._on_close(stack, "the job workers", self._stop_job_workers)
        self.service.bind(self)
        stack.callback(self.service.unbind, self)
        # Models load in the background so that liveness answers while they do.
        self._loading = self._spawn(self._load_then_work(), "asyncserve-load")
        self._on_close(stack, "model loading", self._stop_loading)
        if self.auth.source is not None:
            watching = self._spawn(self._reload_keys(), "asyncserve-keys")
            stack.callback(watching.cancel)
        if self.settings.grpc_port >= 0:
            await self._start_grpc(stack, grace_s)

    async def _start_grpc(self, stack: contextlib.AsyncExitStack, grace_s: float) -> None:
        """The gRPC server, closed first: its calls drain (``stop_grpc``) while the batchers still run."""
        require_grpc()
        from asyncserve.grpc.server import GrpcServer  # imports grpc: only when asked for

        self.grpc = GrpcServer(self.http, self.settings)
        await self.grpc.start()
        http_pending, grpc_pending = self.input_pending, self.grpc.input_pending
        self.input_pending = lambda: http_pending() or grpc_pending()
        self._on_close(stack, "the gRPC server", lambda: self.stop_grpc(grace_s))

    async def stop_grpc(self, grace_s: float) -> None:
        """Refuse new gRPC calls; those under way get ``grace_s`` seconds (the HTTP drain runs beside it)."""
        if self.grpc is not None:
            await self.grpc.stop(grace_s)

    async def _start_pipeline(self, stack: contextlib.AsyncExitStack, grace_s: float) -> None:
        """Open what the pipeline uses: feature sources, the prediction cache and the prediction log."""
        fix = "check the sources' settings in the service"
        await _starting("feature sources", fix, self.pipeline.open())
        self._on_close(stack, "the feature sources and caches", self.pipeline.aclose)
        if self.pipeline.cache is not None:
            url = display_url(self.settings.prediction_cache)
            fix = "start Redis there, or set ASYNCSERVE_PREDICTION_CACHE to a URL that answers (or to memory)"
            await _starting(f"prediction cache {url}", fix, self.pipeline.cache.open())
        predlog = self.pipeline.predlog
        if predlog is not None:
            url = display_url(self.settings.prediction_log)
            fix = "fix ASYNCSERVE_PREDICTION_LOG, or create what it names"
            await _starting(f"prediction log {url}", fix, predlog.start())
            self._on_close(stack, "the prediction log", lambda: predlog.aclose(timeout_s=grace_s))

    def _on_close(self, stack: contextlib.AsyncExitStack, what: str, close: Callable[[], Awaitable[Any]]) -> None:
        async def attempt() -> None:
            try:
                await close()
            except Exception as exc:  # every other component still gets closed
                logger.error("closing %s failed", what, exc_info=exc)
                self._close_errors.append(exc)

        stack.push_async_callback(attempt)

    async def aclose(self) -> None:
        """Stop every component, in the reverse order of start-up; raises the failures after trying all."""
        self.begin_shutdown()
        stack, self._stack = self._stack, contextlib.AsyncExitStack()  # closed once; never reopened
        if stack is not None:
            await stack.aclose()
        errors, self._close_errors = self._close_errors, []
        if errors:
            raise ExceptionGroup("closing asyncserve failed", errors)

    def begin_shutdown(self) -> None:
        """Turn readiness off and refuse new predictions; in-flight ones go on (the server drains them)."""
        self.http.inference.shutting_down = True

    @property
    def shutting_down(self) -> bool:
        return self.http.shutting_down

    async def wait_ready(self) -> None:
        """Wait until the start-up loading has finished (whether every model loaded or not)."""
        if self._loading is None:
            raise RuntimeError("the App has not started; use `async with App(...)` first")
        await asyncio.shield(self._loading)

    @property
    def loaded(self) -> bool:
        """Whether the start-up loading has finished."""
        return self._loading is not None and self._loading.done()

    # Background work

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        task.add_done_callback(_log_failure)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _load_then_work(self) -> None:
        await self.registry.load_all()
        if self.settings.deferred_when_idle:
            _ = self._spawn(self._compute_deferred_when_idle(), "asyncserve-idle")
        if self.broker is None or self.jobs is None:
            return
        # Job workers start once the models can run their jobs.
        for _ in range(self.settings.job_workers):
            worker = Worker(
                self.broker, self.jobs.run, concurrency=self.settings.job_concurrency,
                lease_s=self.settings.job_lease_s, webhooks=self.webhooks,
            )  # fmt: skip
            await worker.__aenter__()
            self.job_workers.append(worker)
            _ = self._spawn(worker.run(), f"asyncserve-{worker.worker_id}")

    async def _compute_deferred_when_idle(self) -> None:
        """Compute unread deferred predictions, one at a time, while no inference request is in flight."""
        while not self.shutting_down:
            await asyncio.sleep(IDLE_CHECK_S)
            while self.http.inferring == 0 and not self.shutting_down:
                if not await self.deferred.compute_when_idle(limit=1):
                    break

    async def _reload_keys(self) -> None:
        """Read the API keys file again when it changes: keys rotate without a restart."""
        while True:
            await asyncio.sleep(KEYS_CHECK_S)
            await asyncio.to_thread(self.auth.reload)

    async def _stop_loading(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading

    async def _stop_job_workers(self) -> None:
        """Job workers stop claiming and finish or hand back their jobs; then their tasks end."""
        await asyncio.gather(*(w.aclose(timeout_s=self.settings.grace_period_s) for w in self.job_workers))
        tasks = [task for task in self._tasks if task is not self._loading]
        if tasks:
            await asyncio.wait(tasks)

    def lazy(self, model: str, inputs: Any, version: str | None = None) -> LazyPrediction:
        """``Service.lazy``: the model and inputs checked now, the prediction computed on the first await."""
        return self.http.inference.lazy(model, inputs, version)

    def __repr__(self) -> str:
        return f"App({self.service!r}, ready={self.registry.ready}, shutting_down={self.shutting_down})"


async def _starting(component: str, fix: str, start: Awaitable[Any]) -> None:
    """Await ``start``; a failure becomes a one-line :class:`StartupError` naming ``component`` and ``fix``.

    A :class:`ConfigurationError` already says what to do, and passes as it is.
    """
    try:
        await start
    except ConfigurationError:
        raise
    except Exception as exc:
        raise StartupError(component, cause_of(exc), fix) from exc


def make_executor(settings: Settings) -> Executor:
    if settings.executor == "process":
        return ProcessExecutor(settings.pool_size, threads_per_call=settings.threads_per_call)
    return ThreadExecutor(settings.pool_size, threads_per_call=settings.threads_per_call)


def make_prediction_logger(settings: Settings, metrics: Metrics) -> PredictionLogger | None:
    if not settings.prediction_log:
        return None
    redact = frozenset(name.strip() for name in settings.prediction_log_redact.split(",") if name.strip())
    return PredictionLogger(
        open_sink(settings.prediction_log),
        max_buffer=settings.prediction_log_buffer,
        overflow="refuse" if settings.prediction_log_overflow == "refuse" else "drop",
        spill_path=settings.prediction_log_spill,
        write_timeout_s=settings.prediction_log_write_timeout_s,
        replay_interval_s=settings.prediction_log_replay_interval_s,
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


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task %s failed", task.get_name(), exc_info=task.exception())
