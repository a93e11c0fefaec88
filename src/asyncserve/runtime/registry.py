"""The model registry: which models a server has, their state, and the one way to run one.

Loading happens in the background after start-up, so liveness answers at once while readiness
turns true only when every model is loaded and warm.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from asyncserve import tracing
from asyncserve._utils import is_count
from asyncserve.calls import deadline_scope, request_deadline
from asyncserve.composition.ensemble import Ensemble
from asyncserve.exceptions import (
    AsyncServeError,
    ConfigurationError,
    DeadlineExceeded,
    ModelError,
    ModelNotFound,
    ModelNotReady,
)
from asyncserve.features import fetch_features
from asyncserve.metrics import Metrics
from asyncserve.model import ModelSpec, call_predict, check_outputs
from asyncserve.runtime.batching import Batcher, BatchSettings, Runner
from asyncserve.runtime.executor import Executor, Prediction, ProcessExecutor, ThreadExecutor, load_and_warm
from asyncserve.runtime.scheduler import WorkerScheduler
from asyncserve.runtime.streaming import Streams
from asyncserve.tensors import Columns

logger = logging.getLogger(__name__)


class ModelState(enum.StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ModelEntry:
    spec: ModelSpec
    batcher: Batcher
    state: ModelState = ModelState.LOADING
    reason: str = ""
    streams: Streams | None = None
    """For a streaming model (its predict yields): its answers in parts."""

    def index_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.spec.name, "state": self.state.value, "reason": self.reason}
        if self.spec.version is not None:
            row["version"] = self.spec.version
        return row


def _version_order(version: str | None) -> tuple[int, int, str]:
    # Numeric versions compare as numbers ("10" > "9"); others after them, by text.
    if version is None:
        return (0, 0, "")
    return (1, int(version), "") if is_count(version) else (2, 0, version)


class ModelRegistry:
    """Models by name and version, their readiness, and ``predict`` routed to the right place."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        executor: Executor,
        metrics: Metrics,
        *,
        loop_delay_s: Callable[[], float] = lambda: 0.0,
        input_pending: Callable[[], bool] = lambda: False,
        threads_per_call: int = 0,
    ) -> None:
        self._loop_delay_s = loop_delay_s
        self._input_pending = input_pending
        self._executor = executor
        self._scheduler = WorkerScheduler(executor.workers)
        """Shares the server's executor between the models that have no workers of their own."""
        self._own_executors = {
            spec.key: _own_executor(spec, threads_per_call) for spec in specs if _has_own_workers(spec)
        }
        self._metrics = metrics
        self._entries = {spec.key: ModelEntry(spec, self._batcher(spec), streams=self._streams(spec)) for spec in specs}
        self._by_name: dict[str, list[ModelEntry]] = {}
        for entry in self._entries.values():
            self._by_name.setdefault(entry.spec.name, []).append(entry)
        for versions in self._by_name.values():
            versions.sort(key=lambda e: _version_order(e.spec.version), reverse=True)
        for entry in self._entries.values():
            self._publish(entry)
        self._bind_ensembles()

    def _bind_ensembles(self) -> None:
        """Check each ensemble's members against their declarations and let it call them."""
        caller = RegistryCaller(self)
        for entry in self._entries.values():
            ensemble = entry.spec.model
            if not isinstance(ensemble, Ensemble):
                ensemble.bind(caller)
                continue
            specs = {}
            for label, (name, version) in ensemble.dependencies().items():
                try:
                    specs[label] = self.find(name, version).spec
                except ModelNotFound as exc:
                    raise ConfigurationError(f"ensemble {entry.spec.label!r}: {exc.message}") from None
            ensemble.check_members(specs)
            ensemble.bind(caller)

    def executor_for(self, spec: ModelSpec) -> Executor:
        """Where the model's batches run: its own workers, or the server's executor."""
        return self._own_executors.get(spec.key, self._executor)

    def _batcher(self, spec: ModelSpec) -> Batcher:
        share = None
        if spec.is_async:
            concurrency = spec.max_concurrent_batches or 64
        else:
            # By default a model may keep every worker busy, one batch per worker, as long as the other
            # models have no work (the scheduler keeps a worker for them when they do).
            executor = self.executor_for(spec)
            concurrency = spec.max_concurrent_batches or executor.workers
            scheduler = self._scheduler if executor is self._executor else WorkerScheduler(executor.workers)
            share = scheduler.share(spec.label, weight=spec.capacity.weight, cap=concurrency)
        settings = BatchSettings(
            max_batch_size=spec.max_batch_size,
            max_wait_s=spec.max_wait_s,
            max_concurrent_batches=concurrency,
            max_queue_size=spec.max_queue_size,
        )
        metrics = self._metrics.for_batcher(spec.label)
        return Batcher(
            spec.label, self._runner(spec), settings, metrics,
            loop_delay_s=self._loop_delay_s, input_pending=self._input_pending, share=share,
        )  # fmt: skip

    def _streams(self, spec: ModelSpec) -> Streams | None:
        if not spec.streams:
            return None
        stepper = self.executor_for(spec)
        if not spec.is_async and not isinstance(stepper, ThreadExecutor):
            raise ConfigurationError(
                f"model {spec.label!r} streams from a plain generator, which cannot run in worker processes; "
                "use --executor thread, or make its predict an async generator"
            )
        limit = spec.max_queue_size  # answers streaming at once; more are refused 503
        return Streams(spec, stepper, self._metrics.for_streams(spec.label), limit=limit)  # type: ignore[arg-type]

    def stream(self, entry: ModelEntry, columns: Columns, rows: int, deadline: float) -> AsyncIterator[Columns]:
        """The parts of a streaming model's answer to a request (ModelError if the model does not stream)."""
        if entry.streams is None:
            raise ModelError(f"model {entry.spec.label!r} does not stream its answers; its predict returns them whole")
        return entry.streams.start(columns, rows, deadline)

    def _runner(self, spec: ModelSpec) -> Runner:
        inference_duration = self._metrics.inference_duration.labels(spec.label)
        inference_rows = self._metrics.inference_rows.labels(spec.label)
        executor = self.executor_for(spec)

        async def run(columns: Columns, rows: int, deadline: float) -> Prediction:
            try:
                if spec.is_async:
                    outputs, seconds, waited = await self._predict_async(spec, columns, rows, deadline)
                else:
                    outputs, seconds, waited = await executor.run(spec, columns, rows, deadline)
            except AsyncServeError:
                raise
            except Exception as exc:
                # The batcher hands this to each caller; whoever answers the client logs its cause.
                raise ModelError(
                    f"model {spec.label!r} failed while predicting; the server log has the details"
                ) from exc
            inference_duration.observe(seconds)
            inference_rows.inc(rows)
            return outputs, seconds, waited

        return tracing.model_span(spec.label, run)

    def start(self) -> None:
        """Start every model's batcher (in the running event loop)."""
        for entry in self._entries.values():
            entry.batcher.start()

    async def aclose(self) -> None:
        """Stop admitting rows, let running batches finish, fail what is still queued; close ended streams."""
        await asyncio.gather(*(entry.batcher.aclose() for entry in self._entries.values()))
        await asyncio.gather(*(entry.streams.aclose() for entry in self._entries.values() if entry.streams))
        await asyncio.gather(*(executor.aclose() for executor in self._own_executors.values()))

    @property
    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    @property
    def ready(self) -> bool:
        return all(entry.state is ModelState.READY for entry in self._entries.values())

    def find(self, name: str, version: str | None = None) -> ModelEntry:
        """The model ``name`` at ``version``, or its highest version; ModelNotFound otherwise."""
        versions = self._by_name.get(name)
        if not versions:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise ModelNotFound(f"unknown model {name!r}; this server has: {known}")
        if version is None:
            return versions[0]
        for entry in versions:
            if entry.spec.version == version:
                return entry
        known = ", ".join(str(e.spec.version) for e in versions)
        raise ModelNotFound(f"model {name!r} has no version {version!r}; its versions: {known}")

    def get_ready(self, name: str, version: str | None = None) -> ModelEntry:
        versions = self._by_name.get(name) if version is None else None
        # (Asked per request: the highest version is found here, anything else by find.)
        entry = versions[0] if versions else self.find(name, version)
        if entry.state is ModelState.LOADING:
            raise ModelNotReady(f"model {entry.spec.label!r} is still loading; retry later", retry_after_s=2.0)
        if entry.state is ModelState.UNAVAILABLE:
            raise ModelNotReady(
                f"model {entry.spec.label!r} is unavailable ({entry.reason}); to serve it again: "
                f"POST /v2/repository/models/{entry.spec.name}/load",
                retry_after_s=2.0,
            )
        return entry

    async def load_all(self) -> None:
        """Load and warm every model; a model that fails becomes UNAVAILABLE with the reason."""
        entries = list(self._entries.values())
        shared = [e for e in entries if not e.spec.is_async and e.spec.key not in self._own_executors]
        async_entries = [e for e in entries if e.spec.is_async]
        loads = [self._load_sync(self._executor, shared)]
        loads += [self._load_sync(self._own_executors[key], [self._entries[key]]) for key in self._own_executors]
        loads += [self._load_async(e) for e in async_entries]
        started = time.perf_counter()
        await asyncio.gather(*loads)
        ready = [e.spec.label for e in entries if e.state is ModelState.READY]
        failed = [e.spec.label for e in entries if e.state is not ModelState.READY]
        logger.info(
            "loaded %d of %d model(s) in %.2fs (%d with %r, %d with workers of their own, %d async): %s%s",
            len(ready), len(entries), time.perf_counter() - started, len(shared), self._executor,
            len(self._own_executors), len(async_entries), ", ".join(ready) or "none",
            f"; failed: {', '.join(failed)}" if failed else "",
        )  # fmt: skip

    async def _load_sync(self, executor: Executor, entries: list[ModelEntry]) -> None:
        if isinstance(executor, ThreadExecutor):
            # Threads load each model on its own: one that fails leaves the others serving.
            await asyncio.gather(*(self._load_one(e, executor.start([e.spec])) for e in entries))
            return
        try:
            await executor.start([e.spec for e in entries])  # each worker process loads them all at its start
        except Exception as exc:
            logger.exception("loading models %s failed", [e.spec.label for e in entries])
            for entry in entries:
                self._set(entry, ModelState.UNAVAILABLE, _load_failed(exc))
            return
        for entry in entries:
            self._set(entry, ModelState.READY)

    async def _load_async(self, entry: ModelEntry) -> None:
        # load() is plain code even for an async model; keep it off the loop.
        await self._load_one(entry, asyncio.to_thread(load_and_warm, entry.spec))

    async def _load_one(self, entry: ModelEntry, loading: Awaitable[None]) -> None:
        try:
            await loading
        except Exception as exc:
            logger.exception("loading model %s failed", entry.spec.label)
            self._set(entry, ModelState.UNAVAILABLE, _load_failed(exc))
            return
        self._set(entry, ModelState.READY)

    def unload(self, name: str) -> None:
        """Stop serving every version of ``name`` (the repository extension's unload)."""
        for entry in self._versions(name):
            self._set(entry, ModelState.UNAVAILABLE, "unloaded")

    async def load(self, name: str) -> list[ModelEntry]:
        """Serve ``name`` again: load it anew, or retry a load that failed."""
        entries = [e for e in self._versions(name) if e.state is not ModelState.READY]
        for entry in entries:
            self._set(entry, ModelState.LOADING)
            spec = entry.spec
            loading = asyncio.to_thread(load_and_warm, spec) if spec.is_async else self.executor_for(spec).reload(spec)
            await self._load_one(entry, loading)
        return entries

    def versions(self, name: str) -> list[ModelEntry]:
        """Every version of ``name``, highest first (ModelNotFound for an unknown name)."""
        self.find(name)
        return list(self._by_name[name])

    def _versions(self, name: str) -> list[ModelEntry]:
        self.find(name)
        return self._by_name[name]

    def _set(self, entry: ModelEntry, state: ModelState, reason: str = "") -> None:
        entry.state, entry.reason = state, reason
        self._publish(entry)

    def _publish(self, entry: ModelEntry) -> None:
        ready = 1 if entry.state is ModelState.READY else 0
        self._metrics.model_ready.labels(entry.spec.name, entry.spec.version or "").set(ready)

    async def predict(
        self, entry: ModelEntry, columns: Columns, rows: int, deadline: float, priority: int = 0
    ) -> Columns:
        """Run the model on a request's rows, batched with other requests' rows."""
        return await self.enqueue(entry, columns, rows, deadline, priority)

    def enqueue(
        self, entry: ModelEntry, columns: Columns, rows: int, deadline: float, priority: int = 0
    ) -> asyncio.Future[Columns]:
        """Queue a request's rows on the model's batcher; the future gets their outputs, or the error to answer."""
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"the deadline passed before model {entry.spec.label!r} could start")
        return entry.batcher.enqueue(columns, rows, deadline, priority)

    async def _predict_async(self, spec: ModelSpec, columns: Columns, rows: int, deadline: float) -> Prediction:
        started = time.perf_counter()
        try:
            # The deadline travels to models this one calls (an ensemble's members) in a context variable.
            with deadline_scope(deadline):
                async with asyncio.timeout(deadline - time.monotonic()):
                    result = await call_predict(spec, columns)
        except TimeoutError:
            raise DeadlineExceeded(f"model {spec.label!r} did not answer before the request's deadline") from None
        return check_outputs(spec, result, rows), time.perf_counter() - started, 0.0


def _has_own_workers(spec: ModelSpec) -> bool:
    return spec.capacity.instances is not None and not spec.is_async


def _own_executor(spec: ModelSpec, threads_per_call: int) -> Executor:
    instances = spec.capacity.instances or 1
    if spec.capacity.instance_kind == "process":
        return ProcessExecutor(instances, threads_per_call=threads_per_call)
    return ThreadExecutor(instances, name=spec.label, threads_per_call=threads_per_call)


def _load_failed(exc: Exception) -> str:
    """Why a load failed, for the API: the exception's type and message (the traceback goes to the log only)."""
    message = exc.message if isinstance(exc, AsyncServeError) else str(exc)
    return f"load failed: {type(exc).__name__}: {message}" if message else f"load failed: {type(exc).__name__}"


class RegistryCaller:
    """Lets a model call other models of the service (an ensemble its members): each call goes
    through the callee's own batcher, under the calling request's deadline."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    async def predict(self, name: str, columns: Columns, *, version: str | None = None) -> Columns:
        """Run ``name`` on ``columns``; a model that declares features gets them looked up first, by its keys."""
        entry = self._registry.get_ready(name, version)
        deadline = request_deadline.get(time.monotonic() + entry.spec.timeout_s)
        rows = len(next(iter(columns.values())))
        if entry.spec.features:
            # The sources merge the keys of concurrent lookups: members keyed alike share round trips.
            fetched = await fetch_features(entry.spec.features, columns, deadline)
            columns = {**columns, **fetched.columns}
        return await self._registry.predict(entry, columns, rows, deadline)
