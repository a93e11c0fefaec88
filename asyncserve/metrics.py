"""Every metric asyncserve publishes, defined once, and the event-loop lag probe that feeds one of them.

Each app owns its own registry, so two apps in one process (as in the tests) never share counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOOP_LAG_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """The server's metrics, exposed in the Prometheus text format at ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "asyncserve_requests", "HTTP requests answered, by route, model and status code.",
            ["route", "model", "status"], registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "asyncserve_request_duration_seconds", "Time from the request's arrival to its response, in seconds.",
            ["route", "model"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "asyncserve_request_errors", "Requests that ended in an error, by route, model and error code.",
            ["route", "model", "code"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "asyncserve_requests_in_flight", "Requests being handled right now.", ["route"], registry=r
        )
        self.disconnects = Counter(
            "asyncserve_client_disconnects",
            "Requests whose client went away before the answer; their work was cancelled.",
            ["route", "model"], registry=r,
        )  # fmt: skip
        self.inference_duration = Histogram(
            "asyncserve_inference_duration_seconds", "Time one predict call took, in seconds.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.inference_rows = Counter("asyncserve_inference_rows", "Rows predicted.", ["model"], registry=r)
        self.model_ready = Gauge(
            "asyncserve_model_ready", "1 when the model is loaded and warm, else 0.", ["model", "version"], registry=r
        )
        self.loop_lag = Histogram(
            "asyncserve_event_loop_lag_seconds",
            "How late the event loop woke a timer, measured continuously: time it could not spend on I/O.",
            buckets=LOOP_LAG_BUCKETS_S, registry=r,
        )  # fmt: skip

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


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

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the loop lag probe is already running")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="asyncserve-loop-lag")

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self._interval_s)
            lag = max(0.0, time.perf_counter() - started - self._interval_s)
            self.max_lag_s = max(self.max_lag_s, lag)
            self._histogram.observe(lag)

    async def aclose(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
