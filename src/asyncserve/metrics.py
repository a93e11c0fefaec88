"""Every metric asyncserve publishes, defined once, and the event-loop lag probe that feeds one of them.

Each app owns its own registry, so two apps in one process (as in the tests) never share counts.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LOOP_LAG_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """The server's metrics, exposed in the Prometheus text format at ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = LoopCounter(
            "asyncserve_requests", "HTTP requests answered, by route, model and status code.",
            ["route", "model", "status"], registry=r,
        )  # fmt: skip
        self.request_duration = LoopHistogram(
            "asyncserve_request_duration_seconds", "Time from the request's arrival to its response, in seconds.",
            ["route", "model"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "asyncserve_request_errors", "Requests that ended in an error, by route, model and error code.",
            ["route", "model", "code"], registry=r,
        )  # fmt: skip
        self.grpc_requests = LoopCounter(
            "asyncserve_grpc_requests", "gRPC calls answered, by method, model and gRPC status code.",
            ["method", "model", "code"], registry=r,
        )  # fmt: skip
        self.grpc_request_duration = LoopHistogram(
            "asyncserve_grpc_request_duration_seconds", "Time from a gRPC call's arrival to its answer, in seconds.",
            ["method", "model"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "asyncserve_requests_in_flight", "Requests being handled right now.", ["route"], registry=r
        )
        self.disconnects = Counter(
            "asyncserve_client_disconnects",
            "Requests whose client went away before the answer; their work was cancelled.",
            ["route", "model"], registry=r,
        )  # fmt: skip
        self.inference_duration = LoopHistogram(
            "asyncserve_inference_duration_seconds", "Time one predict call took, in seconds.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.inference_rows = LoopCounter("asyncserve_inference_rows", "Rows predicted.", ["model"], registry=r)
        self.stream_parts = LoopCounter(
            "asyncserve_stream_parts", "Parts of answers that streaming models sent.", ["model"], registry=r
        )
        self.streams = LoopCounter(
            "asyncserve_streams", "Streamed answers, by how they ended (completed, failed, deadline, client_gone).",
            ["model", "end"], registry=r,
        )  # fmt: skip
        self.build_info = Gauge(
            "asyncserve_build_info", "Always 1; the label tells the version.",
            ["version"], registry=r,
        )  # fmt: skip
        self.model_ready = Gauge(
            "asyncserve_model_ready", "1 when the model is loaded and warm, else 0.", ["model", "version"], registry=r
        )
        self.loop_lag = Histogram(
            "asyncserve_event_loop_lag_seconds",
            "How late the event loop woke a timer, measured continuously: time it could not spend on I/O.",
            buckets=LOOP_LAG_BUCKETS_S, registry=r,
        )  # fmt: skip

        self.batch_rows = LoopHistogram(
            "asyncserve_batch_rows", "Rows in each predict call the batcher made.",
            ["model"], buckets=BATCH_ROWS_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_worker_wait = LoopHistogram(
            "asyncserve_batch_worker_wait_seconds",
            "Time a batch waited for an executor worker (its turn among the models, behind other batches), in seconds.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.model_compute = LoopCounter(
            "asyncserve_model_compute_seconds",
            "Seconds the model's batches occupied executor workers (its compute, waits for a worker excluded).",
            ["model"], registry=r,
        )  # fmt: skip
        self.batches_running = Gauge(
            "asyncserve_batches_running", "The model's batches running right now.", ["model"], registry=r
        )
        self.executor_share = Gauge(
            "asyncserve_executor_share",
            "Fraction of its executor's workers the model kept busy lately (decayed over 10 s).",
            ["model"], registry=r,
        )  # fmt: skip
        self.batch_queue_wait = LoopHistogram(
            "asyncserve_batch_queue_wait_seconds", "Time a request's rows waited in the batcher's queue, in seconds.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.batch_queue_rows = Gauge(
            "asyncserve_batch_queue_rows", "Rows waiting in the batcher's queue.", ["model"], registry=r
        )
        self.batches = LoopCounter(
            "asyncserve_batches",
            "Batches run, by why they closed: full, idle (nothing else running), wait (max_wait_s), deadline.",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.batch_shed = LoopCounter(
            "asyncserve_batch_shed_rows",
            "Requests the batcher refused or dropped, by reason: "
            "queue_full, deadline_unreachable, expired, would_expire, cancelled.",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.batch_isolations = Counter(
            "asyncserve_batch_isolations", "Failed batches bisected to find the failing items.", ["model"], registry=r
        )
        self.batch_cost = Gauge(
            "asyncserve_batch_cost_seconds",
            "The fitted cost model t(n) = per_row * n + per_batch of one predict call, in seconds.",
            ["model", "term"], registry=r,
        )  # fmt: skip

        self.feature_fetch = Histogram(
            "asyncserve_feature_fetch_seconds", "Time of one round trip to a feature source, in seconds.",
            ["source"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.feature_batch_keys = Histogram(
            "asyncserve_feature_batch_keys", "Keys looked up in one round trip to a feature source.",
            ["source"], buckets=BATCH_ROWS_BUCKETS, registry=r,
        )  # fmt: skip
        self.feature_errors = Counter(
            "asyncserve_feature_errors", "Failed feature lookups, by source and kind (error, timeout, breaker_open).",
            ["source", "kind"], registry=r,
        )  # fmt: skip
        self.feature_cache = Counter(
            "asyncserve_feature_cache_lookups", "Feature cache lookups, by source and result (hit, miss).",
            ["source", "result"], registry=r,
        )  # fmt: skip
        self.feature_source_state = Gauge(
            "asyncserve_feature_source_breaker_state", "Circuit breaker of a source: 0 closed, 1 half open, 2 open.",
            ["source"], registry=r,
        )  # fmt: skip
        self.degraded = Counter(
            "asyncserve_degraded_responses", "Answers that used declared defaults for a failed feature source.",
            ["model", "source"], registry=r,
        )  # fmt: skip

        self.counted = CountedElsewhere()
        r.register(self.counted)
        self.counted.add("asyncserve_coalesced_requests", "Requests that shared an identical request's computation.")
        self.counted.add("asyncserve_prediction_cache_hits", "Answers served from the prediction cache.")
        self.counted.add("asyncserve_prediction_cache_misses", "Prediction cache lookups that found nothing.")
        self.counted.add("asyncserve_deferred_created", "Deferred predictions (Prefer: lazy) handed out.")
        self.counted.add("asyncserve_deferred_resolved", "Deferred predictions computed when first read.")
        self.counted.add("asyncserve_deferred_expired", "Deferred predictions that expired before or after being read.")

        # Labelled children looked up once: labels() costs microseconds, paid on every request.
        self._request_children: dict[tuple[str, str, int], tuple[LoopCounterChild, LoopHistogramChild]] = {}
        self._grpc_children: dict[tuple[str, str, str], tuple[LoopCounterChild, LoopHistogramChild]] = {}
        self._in_flight_counts: dict[str, int] = {}

    def observe_request(self, route: str, model: str, status: int, seconds: float) -> None:
        children = self._request_children.get((route, model, status))
        if children is None:
            children = self.requests.labels(route, model, str(status)), self.request_duration.labels(route, model)
            self._request_children[(route, model, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_grpc(self, method: str, model: str, code: str, seconds: float) -> None:
        """A gRPC call answered; its errors count in ``asyncserve_request_errors`` as route ``grpc_<method>``."""
        children = self._grpc_children.get((method, model, code))
        if children is None:
            children = self.grpc_requests.labels(method, model, code), self.grpc_request_duration.labels(method, model)
            self._grpc_children[(method, model, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def request_started(self, route: str) -> None:
        # A plain count, read by the gauge only when scraped: no lock or call per request.
        counts = self._in_flight_counts
        if route not in counts:
            counts[route] = 0
            self.in_flight.labels(route).set_function(lambda: counts[route])
        counts[route] += 1

    def request_finished(self, route: str) -> None:
        self._in_flight_counts[route] -= 1

    def in_flight_total(self) -> int:
        """Requests being handled right now, on every route."""
        return sum(self._in_flight_counts.values())

    def for_source(self, source: str) -> SourceMetrics:
        return SourceMetrics(self, source)

    def for_batcher(self, model: str) -> BatchMetrics:
        return BatchMetrics(self, model)

    def for_streams(self, model: str) -> StreamCounts:
        return StreamCounts(self, model)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class LoopHistogram(Collector):
    """A histogram observed from the event loop's thread only: plain numbers, no lock.

    prometheus_client's ``Histogram`` takes a lock for its sum and another for the bucket, and walks
    its buckets in Python, on every observation. A request observes two; at thousands of requests a
    second on one core, that is several percent of the loop's time. The loop is one thread, so
    counting needs no lock; the exposition is the same.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str],
        *,
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, labelnames
        self._bounds = (*buckets, math.inf)
        self._le: list[str] = [floatToGoString(bound) for bound in self._bounds]  # type: ignore[no-untyped-call]
        """The buckets' ``le`` labels, written as prometheus_client writes them."""
        self._children: dict[tuple[str, ...], LoopHistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> LoopHistogramChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = LoopHistogramChild(self._bounds)
        return child

    @property
    def bounds(self) -> tuple[float, ...]:
        """The buckets' upper bounds, the last one infinite."""
        return self._bounds

    def children(self) -> list[tuple[tuple[str, ...], LoopHistogramChild]]:
        """Every label set observed so far, and its counts."""
        return list(self._children.items())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            buckets = [(le, float(n)) for le, n in zip(self._le, itertools.accumulate(child.counts), strict=True)]
            family.add_metric(list(values), buckets, child.sum)
        yield family


class LoopHistogramChild:
    """One label set of a ``LoopHistogram``."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1  # the first bucket whose bound is >= value
        self.sum += value

    def observe_each(self, values: Iterable[float]) -> None:
        """``observe`` each value, in order, in one call (a batch's rows)."""
        counts, bounds, total = self.counts, self._bounds, self.sum
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1
            total += value
        self.sum = total


class LoopCounter(Collector):
    """A counter incremented from the event loop's thread only (see ``LoopHistogram``)."""

    def __init__(self, name: str, documentation: str, labelnames: list[str], *, registry: CollectorRegistry) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, labelnames
        self._children: dict[tuple[str, ...], LoopCounterChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> LoopCounterChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = LoopCounterChild()
        return child

    def children(self) -> list[tuple[tuple[str, ...], LoopCounterChild]]:
        """Every label set counted so far, and its count."""
        return list(self._children.items())

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


class LoopCounterChild:
    """One label set of a ``LoopCounter``."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class CountedElsewhere(Collector):
    """Counters that components keep as plain integers (cheaper than a metric per request), read when scraped."""

    def __init__(self) -> None:
        self._help: dict[str, str] = {}
        self._readers: dict[str, Callable[[], float]] = {}

    def add(self, name: str, documentation: str) -> None:
        self._help[name] = documentation

    def read_from(self, name: str, reader: Callable[[], float]) -> None:
        if name not in self._help:
            raise KeyError(f"no counter {name!r} is defined in asyncserve/metrics.py")
        self._readers[name] = reader

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, documentation in self._help.items():
            reader = self._readers.get(name)
            yield CounterMetricFamily(name, documentation, value=reader() if reader is not None else 0.0)


class BatchMetrics:
    """The batcher metrics of one model, with their labels bound once (they are hit per request)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._metrics, self._model = metrics, model
        self.batch_rows = metrics.batch_rows.labels(model)
        self.queue_wait = metrics.batch_queue_wait.labels(model)
        self.worker_wait = metrics.batch_worker_wait.labels(model)
        self.queue_rows = metrics.batch_queue_rows.labels(model)
        self.isolations = metrics.batch_isolations.labels(model)
        self.compute_seconds = metrics.model_compute.labels(model)
        self.running = metrics.batches_running.labels(model)
        self.executor_share = metrics.executor_share.labels(model)
        self._per_row = metrics.batch_cost.labels(model, "per_row")
        self._per_batch = metrics.batch_cost.labels(model, "per_batch")

    def reason(self, reason: str) -> LoopCounterChild:
        return self._metrics.batches.labels(self._model, reason)

    def shed(self, reason: str) -> LoopCounterChild:
        return self._metrics.batch_shed.labels(self._model, reason)

    def observe_cost(self, per_row_s: float, per_batch_s: float) -> None:
        self._per_row.set(per_row_s)
        self._per_batch.set(per_batch_s)


class SourceMetrics:
    """The metrics of one feature source, with their labels bound once."""

    def __init__(self, metrics: Metrics, source: str) -> None:
        self._metrics, self._source = metrics, source
        self.fetch_seconds = metrics.feature_fetch.labels(source)
        self.batch_keys = metrics.feature_batch_keys.labels(source)

    def error(self, kind: str) -> Counter:
        return self._metrics.feature_errors.labels(self._source, kind)

    def cache(self, result: str) -> Counter:
        return self._metrics.feature_cache.labels(self._source, result)


class LoopLagProbe:
    """Sleeps ``interval_s`` again and again and records how late each wake-up was.

    A late wake-up means something held the event loop (a blocking call, a long computation):
    exactly the time no request could be read or answered.
    """

    def __init__(self, histogram: Histogram, interval_s: float) -> None:
        self._histogram = histogram
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.max_lag_s = 0.0
        self.recent_lag_s = 0.0
        """Smoothed lag of the recent wake-ups."""
        self._due = math.inf

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the loop lag probe is already running")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="asyncserve-loop-lag")

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            self._due = started + self._interval_s
            await asyncio.sleep(self._interval_s)
            lag = max(0.0, time.perf_counter() - started - self._interval_s)
            self.max_lag_s = max(self.max_lag_s, lag)
            # Rise at once, decay over a few wake-ups: admission should react to overload quickly.
            self.recent_lag_s = max(lag, 0.7 * self.recent_lag_s + 0.3 * lag)
            self._histogram.observe(lag)

    def current_lag_s(self) -> float:
        """Roughly how long anything new waits for the loop right now.

        The recent wake-ups' lag, or, if the probe is overdue, how long it has been: a loop swamped
        by a burst shows at once, not only when the probe next manages to run.
        """
        return max(self.recent_lag_s, time.perf_counter() - self._due)

    async def aclose(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        self._due = math.inf


class StreamCounts:
    """A streaming model's counters, as ``runtime/streaming.py`` reports to them."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._parts = metrics.stream_parts.labels(model)
        self._metrics, self._model = metrics, model

    def part(self) -> None:
        self._parts.inc()

    def ended(self, how: str) -> None:
        self._metrics.streams.labels(self._model, how).inc()
