"""Read asyncserve's ``GET /metrics`` around a run, and what the difference says about batching.

Every counter and histogram is cumulative, so a run's share is ``after - before``: the batches it
made, their sizes and why they closed, the requests by status, the ones shed and why, and how long
the server held each request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from benchmarks import harness
from benchmarks.harness import BenchmarkError

Sample = tuple[str, tuple[tuple[str, str], ...]]
"""A sample's name and its sorted labels."""
Samples = dict[Sample, float]


def scrape(port: int) -> Samples:
    """Every sample of ``GET /metrics`` on loopback."""
    status, body = harness.request(port, "GET", "/metrics", None)
    if status != 200:
        raise BenchmarkError(f"GET /metrics answered {status}: {body[:300]!r}")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def delta(before: Samples, after: Samples) -> Samples:
    """What a run added to each sample (gauges too, which then read as a change)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def select(samples: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples called ``name`` whose labels include ``labels``."""
    return {
        key_labels: value
        for (sample_name, key_labels), value in samples.items()
        if sample_name == name and all((k, v) in key_labels for k, v in labels.items())
    }


def by_label(samples: Samples, name: str, label: str, **labels: str) -> dict[str, float]:
    """The samples called ``name`` (filtered by ``labels``), summed by the value of ``label``; zeros left out."""
    return {key: value for key, value in _sum_by(samples, name, label, labels).items() if value}


def _sum_by(samples: Samples, name: str, label: str, labels: Mapping[str, str]) -> dict[str, float]:
    result: dict[str, float] = {}
    for key_labels, value in select(samples, name, **labels).items():
        key = dict(key_labels).get(label, "")
        result[key] = result.get(key, 0.0) + value
    return dict(sorted(result.items()))


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(select(samples, name, **labels).values())


def batching_summary(run: Samples, model: str, duration_s: float) -> dict[str, Any]:
    """What one run's metrics delta says about the batcher of ``model``."""
    batches = total(run, "asyncserve_batch_rows_count", model=model)
    rows = total(run, "asyncserve_batch_rows_sum", model=model)
    predict_s = total(run, "asyncserve_inference_duration_seconds_sum", model=model)
    wait_s = total(run, "asyncserve_batch_queue_wait_seconds_sum", model=model)
    return {
        "batches": int(batches),
        "rows": int(rows),
        "mean_batch_rows": round(rows / batches, 2) if batches else None,
        "batch_rows_buckets": _buckets(run, "asyncserve_batch_rows_bucket", model=model),
        "close_reasons": {
            k: int(v) for k, v in by_label(run, "asyncserve_batches_total", "reason", model=model).items()
        },
        "shed": {
            k: int(v) for k, v in by_label(run, "asyncserve_batch_shed_rows_total", "reason", model=model).items()
        },
        "predict_s_per_batch": round(predict_s / batches, 6) if batches else None,
        "predict_s_per_row": round(predict_s / rows, 7) if rows else None,
        "predict_share_of_wall": round(predict_s / duration_s, 3) if duration_s > 0 else None,
        "mean_queue_wait_ms": round(1000 * wait_s / rows, 3) if rows else None,
    }


def loop_lag_summary(run: Samples) -> dict[str, Any]:
    """How late the event loop woke its lag probe's timer: the time it could not turn to new I/O."""
    wakeups = total(run, "asyncserve_event_loop_lag_seconds_count")
    lag_s = total(run, "asyncserve_event_loop_lag_seconds_sum")
    buckets = _buckets(run, "asyncserve_event_loop_lag_seconds_bucket")
    return {
        "wakeups": int(wakeups),
        "mean_ms": round(1000 * lag_s / wakeups, 3) if wakeups else None,
        "over_5ms": count_above(buckets, 0.005),
        "over_50ms": count_above(buckets, 0.05),
        "buckets": buckets,
    }


def requests_summary(run: Samples, route: str, model: str) -> dict[str, Any]:
    """Requests by status and code, and the server's own request duration histogram (cumulative)."""
    return {
        "by_status": {k: int(v) for k, v in by_label(run, "asyncserve_requests_total", "status", route=route).items()},
        "errors_by_code": {
            k: int(v) for k, v in by_label(run, "asyncserve_request_errors_total", "code", route=route).items()
        },
        "duration_buckets": _buckets(run, "asyncserve_request_duration_seconds_bucket", route=route, model=model),
    }


def _buckets(run: Samples, name: str, **labels: str) -> dict[str, int]:
    """A histogram's cumulative bucket counts, by upper bound, in increasing order."""
    counts = _sum_by(run, name, "le", labels)
    return {le: int(counts[le]) for le in sorted(counts, key=float)}


def count_above(buckets: Mapping[str, int], bound: float) -> int | None:
    """How many observations exceeded ``bound``, which must be one of the histogram's bucket bounds."""
    key = next((le for le in buckets if float(le) == bound), None)
    if key is None or "+Inf" not in buckets:
        return None
    return buckets["+Inf"] - buckets[key]
