"""Pipeline: one request's way through features, the model's batcher, and the prediction log.

For a model that declares itself deterministic, identical requests (same model, version and
inputs) in flight share one computation, and answers may come from the prediction cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from asyncserve import tracing
from asyncserve._utils import settle
from asyncserve.composition.caches import PredictionCache
from asyncserve.composition.coalescing import Coalescer
from asyncserve.composition.keys import request_key
from asyncserve.features import FeatureSource, fetch_features
from asyncserve.metrics import Metrics
from asyncserve.predlog import PredictionLogger, prediction_record
from asyncserve.runtime.registry import ModelEntry, ModelRegistry
from asyncserve.tensors import Columns

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class Prediction:
    outputs: Columns
    degraded: list[str] = field(default_factory=list)
    """Feature sources whose declared defaults stood in for them."""
    stages_ms: dict[str, float] = field(default_factory=dict)
    features: Columns = field(default_factory=dict)
    source: str = "model"
    """Where the answer came from: ``model``, ``coalesced`` (another request's computation) or ``cache``."""


Pending = tuple["asyncio.Future[Any]", Callable[[Any], Prediction]]
"""A prediction under way: the future to wait for, and what turns its result into the Prediction."""


class Pipeline:
    """Runs requests: features from every source at once, then the model (batched), then the log."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        predlog: PredictionLogger | None = None,
        cache: PredictionCache | None = None,
    ) -> None:
        self.registry = registry
        self.predlog = predlog
        self.cache = cache
        self.coalescer: Coalescer[Prediction] = Coalescer()
        self._metrics = metrics
        self.sources = _unique_sources(registry)

    async def open(self) -> None:
        """Connect every feature source (one that cannot connect yet keeps retrying on use)."""
        await asyncio.gather(*(s.open(self._metrics.for_source(s.name)) for s in self.sources))

    async def aclose(self) -> None:
        await asyncio.gather(*(source.aclose() for source in self.sources))
        if self.cache is not None:
            await self.cache.aclose()

    def unhealthy_sources(self) -> list[str]:
        """Sources whose failures fail requests (no defaults) and whose circuit breaker is open."""
        failing = {f.source.name for e in self.registry.entries for f in e.spec.features if f.on_error == "fail"}
        return [s.name for s in self.sources if s.name in failing and not s.healthy]

    async def run(
        self,
        entry: ModelEntry,
        columns: Columns,
        rows: int,
        deadline: float,
        *,
        priority: int = 0,
        request_id: str = "",
    ) -> Prediction:
        """A request's prediction, awaited (jobs, deferred predictions): ``start``, then its result."""
        work, finish = self.start(entry, columns, rows, deadline, priority=priority, request_id=request_id)
        return finish(await work)

    def start(
        self,
        entry: ModelEntry,
        columns: Columns,
        rows: int,
        deadline: float,
        *,
        priority: int = 0,
        request_id: str = "",
    ) -> Pending:
        """Start a request's prediction: its future (cancel it to withdraw the request) and what
        turns the future's result into the Prediction. Refusals raise at once.

        A model with no features runs without a task, unless identical requests share a cache: the
        future is the batcher's own (or, for a deterministic model, a share of the computation of
        identical requests in flight), and ``finish`` makes the Prediction and logs it. Without a
        task, the request reaches the batcher in the turn of the loop that parsed it, with the
        requests parsed beside it, so they batch together.
        """
        if self._needs_a_task(entry):
            stages = self._run_stages(entry, columns, rows, deadline, priority, request_id)
            return asyncio.get_running_loop().create_task(stages), _as_is
        if self.predlog is not None:
            # With overflow="refuse", a full log turns the prediction away before any work (503).
            self.predlog.check_room()
        if entry.spec.deterministic:
            return self._start_shared(entry, columns, rows, deadline, priority, request_id)
        started = time.perf_counter()

        def finish(outputs: Columns) -> Prediction:
            prediction = Prediction(outputs, stages_ms=_model_ms(started))
            self._log(entry, columns, prediction, request_id)
            return prediction

        return self.registry.enqueue(entry, columns, rows, deadline, priority), finish

    def stream(
        self, entry: ModelEntry, columns: Columns, rows: int, deadline: float, *, request_id: str = ""
    ) -> AsyncIterator[Columns]:
        """A streaming model's answer, part by part: its features first (looked up as for ``start``), then
        each part as the model yields it. A stream that completes is logged whole: each output holds, per
        row, its parts in order. Refusals that need no lookup raise at once; close the iterator to stop
        the model at its next step.
        """
        if self.predlog is not None:
            self.predlog.check_room()
        if not entry.spec.features:
            parts = self.registry.stream(entry, columns, rows, deadline)
            if self.predlog is None:
                return parts  # nothing to look up or log: no layer between the model and the client
            return self._logged_parts(entry, columns, parts, request_id, Prediction({}))
        return self._stream_with_features(entry, columns, rows, deadline, request_id)

    async def _stream_with_features(
        self, entry: ModelEntry, columns: Columns, rows: int, deadline: float, request_id: str
    ) -> AsyncGenerator[Columns, None]:
        looked_up = await _look_up(entry, columns, deadline)
        self._count_degraded(entry, looked_up)
        parts = self.registry.stream(entry, {**columns, **looked_up.features}, rows, deadline)
        async with contextlib.aclosing(self._logged_parts(entry, columns, parts, request_id, looked_up)) as logged:
            async for part in logged:
                yield part

    async def _logged_parts(
        self, entry: ModelEntry, columns: Columns, parts: AsyncIterator[Columns], request_id: str, so_far: Prediction
    ) -> AsyncGenerator[Columns, None]:
        started = time.perf_counter()
        sent: list[Columns] = []
        async with contextlib.aclosing(parts):  # type: ignore[type-var]
            async for part in parts:
                if self.predlog is not None:
                    sent.append(part)
                yield part
        if self.predlog is not None:
            so_far.outputs = _row_by_row(sent)
            so_far.stages_ms = {"features": 0.0, **so_far.stages_ms, "model": (time.perf_counter() - started) * 1000}
            self._log(entry, columns, so_far, request_id)

    def _start_shared(
        self, entry: ModelEntry, columns: Columns, rows: int, deadline: float, priority: int, request_id: str
    ) -> Pending:
        def lead() -> asyncio.Future[Prediction]:
            started = time.perf_counter()
            outputs = self.registry.enqueue(entry, columns, rows, deadline, priority)
            return _mapped(outputs, lambda result: Prediction(result, stages_ms=_model_ms(started)))

        shared, leads = self.coalescer.join(request_key(entry.spec.label, columns), lead)

        def finish(prediction: Prediction) -> Prediction:
            if not leads:
                prediction = Prediction(prediction.outputs, prediction.degraded, source="coalesced")
            self._log(entry, columns, prediction, request_id)
            return prediction

        return shared, finish

    async def _run_stages(
        self, entry: ModelEntry, columns: Columns, rows: int, deadline: float, priority: int, request_id: str
    ) -> Prediction:
        if self.predlog is not None:
            self.predlog.check_room()
        # (Models that call other models read the deadline from the context: the registry sets it.)
        if entry.spec.deterministic:
            prediction = await self._shared(entry, columns, rows, deadline, priority)
        else:
            prediction = await self._compute(entry, columns, rows, deadline, priority)
        self._log(entry, columns, prediction, request_id)
        return prediction

    async def _shared(
        self, entry: ModelEntry, columns: Columns, rows: int, deadline: float, priority: int
    ) -> Prediction:
        key = request_key(entry.spec.label, columns)
        if self.cache is not None:
            cached = await self.cache.get(key)
            if cached is not None:
                return Prediction(cached, source="cache")
        led = False

        async def compute() -> Prediction:
            nonlocal led
            led = True  # only the first of identical requests in flight runs this
            return await self._compute(entry, columns, rows, deadline, priority)

        prediction = await self.coalescer.run(key, compute)
        if not led:
            return Prediction(prediction.outputs, prediction.degraded, source="coalesced")
        if self.cache is not None and not prediction.degraded:
            await self.cache.put(key, prediction.outputs)
        return prediction

    async def _compute(
        self, entry: ModelEntry, columns: Columns, rows: int, deadline: float, priority: int
    ) -> Prediction:
        spec = entry.spec
        if not spec.features:  # the common case pays for no feature machinery
            started = time.perf_counter()
            outputs = await self.registry.predict(entry, columns, rows, deadline, priority)
            return Prediction(outputs, stages_ms={"features": 0.0, "model": (time.perf_counter() - started) * 1000})
        prediction = await _look_up(entry, columns, deadline)
        fetched_at = time.perf_counter()
        prediction.outputs = await self.registry.predict(
            entry, {**columns, **prediction.features}, rows, deadline, priority
        )
        prediction.stages_ms["model"] = (time.perf_counter() - fetched_at) * 1000
        self._count_degraded(entry, prediction)
        return prediction

    def _count_degraded(self, entry: ModelEntry, prediction: Prediction) -> None:
        for source in prediction.degraded:
            self._metrics.degraded.labels(entry.spec.label, source).inc()

    def _needs_a_task(self, entry: ModelEntry) -> bool:
        """Whether a request's way to the model has steps to await: feature lookups, or a shared cache."""
        return bool(entry.spec.features) or (entry.spec.deterministic and self.cache is not None)

    def _log(self, entry: ModelEntry, columns: Columns, prediction: Prediction, request_id: str) -> None:
        if self.predlog is None:
            return
        if tracing.tracer is not None:
            with tracing.stage("asyncserve.prediction_log", model=entry.spec.label):
                self._record(entry, columns, prediction, request_id)
            return
        self._record(entry, columns, prediction, request_id)

    def _record(self, entry: ModelEntry, columns: Columns, prediction: Prediction, request_id: str) -> None:
        assert self.predlog is not None
        spec = entry.spec
        record = prediction_record(
            request_id=request_id, model=spec.name, version=spec.version or "", inputs=columns,
            outputs=prediction.outputs, features=prediction.features, latency_ms=prediction.stages_ms,
            degraded=bool(prediction.degraded),
        )  # fmt: skip
        self.predlog.record(record)


async def _look_up(entry: ModelEntry, columns: Columns, deadline: float) -> Prediction:
    """A request's features, from every source its model declares: a Prediction with no outputs yet."""
    started = time.perf_counter()
    fetched = await fetch_features(entry.spec.features, columns, deadline)
    stages = {"features": (time.perf_counter() - started) * 1000}
    return Prediction({}, fetched.degraded, stages, fetched.columns)


def _row_by_row(parts: list[Columns]) -> Columns:
    """A streamed answer as one set of columns: each row's parts, in order, along a second dimension."""
    if not parts:
        return {}
    whole: Columns = {}
    for name in parts[0]:
        pieces = [part[name] for part in parts]
        try:
            whole[name] = np.stack(pieces, axis=1)
        except ValueError:  # parts of different shapes (dimensions declared -1): one object per part
            rows = len(pieces[0])
            whole[name] = np.array([[list(piece[row]) for piece in pieces] for row in range(rows)], dtype=object)
    return whole


def _as_is(prediction: Prediction) -> Prediction:
    return prediction


def _model_ms(started: float) -> dict[str, float]:
    return {"features": 0.0, "model": (time.perf_counter() - started) * 1000}


def _mapped(source: asyncio.Future[Any], result: Callable[[Any], T]) -> asyncio.Future[T]:
    """A future of ``result(source's result)``; cancelling it cancels ``source`` (withdrawing the rows)."""
    mapped: asyncio.Future[T] = source.get_loop().create_future()
    source.add_done_callback(functools.partial(settle, mapped, result=result))
    mapped.add_done_callback(lambda future: source.cancel() if future.cancelled() else None)
    return mapped


def _unique_sources(registry: ModelRegistry) -> list[FeatureSource]:
    sources: dict[int, FeatureSource] = {}
    names: dict[str, FeatureSource] = {}
    for entry in registry.entries:
        for feature in entry.spec.features:
            source = feature.source
            other = names.setdefault(source.name, source)
            if other is not source:
                raise ValueError(f"two different feature sources are named {source.name!r}; give each its own name")
            sources[id(source)] = source
    return list(sources.values())
