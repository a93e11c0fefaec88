"""The event loop's lock-free metrics expose exactly what prometheus_client's own would."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from asyncserve.metrics import LATENCY_BUCKETS_S, LoopCounter, LoopHistogram


def exposition_lines(registry: CollectorRegistry) -> list[str]:
    # prometheus_client's own counter and histogram add a "_created" sample; the loop's do not.
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_loop_histogram_and_counter_match_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = LoopHistogram("h_seconds", "A histogram.", ["route"], buckets=LATENCY_BUCKETS_S, registry=ours)
    reference = Histogram("h_seconds", "A histogram.", ["route"], buckets=LATENCY_BUCKETS_S, registry=theirs)
    counter = LoopCounter("c", "A counter.", ["route", "status"], registry=ours)
    reference_counter = Counter("c", "A counter.", ["route", "status"], registry=theirs)
    rng = random.Random(7)
    # Each bound falls in its own bucket (le: less than or equal).
    values = [*LATENCY_BUCKETS_S, 0.0, 31.0, *(rng.expovariate(20.0) for _ in range(500))]
    for value in values:
        route = rng.choice(["a", "b"])
        histogram.labels(route).observe(value)
        reference.labels(route).observe(value)
        counter.labels(route, "200").inc()
        reference_counter.labels(route, "200").inc()
    assert exposition_lines(ours) == exposition_lines(theirs)
