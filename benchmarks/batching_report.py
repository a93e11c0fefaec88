"""The batching benchmark's results for people: a Markdown page and a PNG plot, from the JSON document."""

# matplotlib is optional (benchmarks/requirements-plot.txt): without it installed, as in CI's
# `make check`, mypy must not call its import an error, and with it the ignore is unused.
# mypy: disable-error-code="import-not-found, unused-ignore"

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from benchmarks import measure, report
from benchmarks.overload import RSS_SETTLE_S

LABELS = {"bare": "bare ASGI, no model (H)", "fastapi": "FastAPI, model per request"}


def markdown(data: dict[str, Any], plot: str = "batching.png") -> str:
    parts = [
        "# Dynamic batching: asyncserve vs FastAPI on a NumPy MLP, one core",
        report.facts_markdown(data["machine"]),
        *([_checkouts_text(data["checkouts"])] if data.get("checkouts") else []),
        _method(data),
        "## Targets\n\n" + _targets_table(data["targets"]),
        "## The model alone and the limit L\n\n" + _raw_table(data) + "\n\n" + _limit_text(data),
        "## Served throughput and latency\n\n" + _served_table(data) + "\n\n" + _served_legend(),
        "## Round by round\n\n" + _rounds_table(data) + "\n\n" + _rounds_legend(data["asyncserve"]),
        "## What asyncserve's batcher did (from its /metrics)\n\n" + _batching_table(data),
        f"## Overload ({data['asyncserve'][0]})\n\n" + _overload_text(data["overload"]),
        f"![throughput and latency against concurrency]({plot})",
    ]
    return "\n\n".join(parts) + "\n"


def _method(data: dict[str, Any]) -> str:
    settings = data["settings"]
    servers = "\n".join(f"- {label}: `{command}`" for label, command in settings["servers"].items())
    env = " ".join(f"{k}={v}" for k, v in settings["thread_env"].items())
    return (
        measure.method_markdown(settings) + f" Every server has `{env}`; each request is one V2 row of 256 FP32 values "
        f"({settings['request_bytes']} bytes of JSON).\n\n{servers}"
    )


def _checkouts_text(checkouts: dict[str, Any]) -> str:
    lines = [
        f"- {label}: commit `{c['commit']}` at `{c['path']}`; its servers import asyncserve from "
        f"`{c['imports']['asyncserve']}` and benchmarks from `{c['imports']['benchmarks']}` (checked before the run)"
        for label, c in checkouts.items()
    ]
    return "asyncserve runs from these checkouts, one server each:\n\n" + "\n".join(lines)


def _targets_table(targets: list[dict[str, Any]]) -> str:
    rows = [
        [t["target"], f"{t['measured']:,.3f}", f"{t['bound']:,.3f}", "PASS" if t["pass"] else "FAIL"] for t in targets
    ]
    return report.markdown_table(["target", "measured", "bound", "result"], rows)


def _raw_table(data: dict[str, Any]) -> str:
    before, after = data["raw"]["timings"][0], data["raw"]["timings"][-1]
    rows = []
    for size, rps in data["raw"]["rows_per_s"].items():
        rows.append(
            [
                f"R{size}",
                f"{rps:,.0f}",
                f"{1e6 / rps:.1f}",
                f"{1e3 * int(size) / rps:.3f}",
                f"{before['rows_per_s'][size]:,.0f}",
                f"{after['rows_per_s'][size]:,.0f}",
            ]
        )
    headers = ["batch", "rows/s (median)", "µs per row", "ms per call", "rows/s before", "rows/s after"]
    return report.markdown_table(headers, rows)


def _limit_text(data: dict[str, Any]) -> str:
    r32 = data["raw"]["rows_per_s"]["32"]
    return (
        f"H = {data['H']:,.0f} req/s: the bare ASGI app at c=64, decoding each request and answering 16 values "
        f"without the model. L = 1 / (1/R32 + 1/H) = 1 / (1/{r32:,.0f} + 1/{data['H']:,.0f}) = "
        f"**{data['L']:,.0f} req/s**: one core that pays for HTTP and JSON as the bare app does and for the model at "
        "batch 32. Raw rows/s are medians over every timing, before and after the HTTP runs. From requests per CPU "
        f"second instead (steadier on a shared machine): H = {data['H_per_cpu_s']:,.0f} per CPU-s "
        f"({1e6 / data['H_per_cpu_s']:.1f} µs of CPU per request), L = {data['L_per_cpu_s']:,.0f} per CPU-s."
    )


def _served_table(data: dict[str, Any]) -> str:
    headers = ["c", "server", "req/s", "p50 ms", "p99 ms", "÷ L", "÷ L per CPU-s", "mean batch", "÷ FastAPI"]
    headers += ["req/s min-max", "server CPU", "errors"]
    rows = []
    for row in data["rows"]:
        for label in _labels(data):
            summary, served = row[label], label in data["asyncserve"]
            mean_batch = row["batching"][label]["mean_batch_rows"] if served else None
            rows.append([
                str(row["concurrency"]), label, f"{summary['rps']:,.0f}", report.ms(summary["p50_ms"]),
                report.ms(summary["p99_ms"]), _num(row["to_L"].get(label), "{:.2f}"),
                _num(row["to_L_per_cpu_s"].get(label), "{:.2f}"), _num(mean_batch, "{:.1f}"),
                _num(row["to_fastapi"].get(label), "{:.2f}"), f"{summary['rps_min']:,.0f}-{summary['rps_max']:,.0f}",
                f"{summary['cpu_share']:.2f}", str(summary["errors"]),
            ])  # fmt: skip
    return report.markdown_table(headers, rows)


def _labels(data: dict[str, Any]) -> list[str]:
    return [*data["asyncserve"], "fastapi", "bare"]


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _served_legend() -> str:
    return (
        "Each row is the median of the rounds. ÷ L is an asyncserve's req/s over the limit L. ÷ L per CPU-s is the "
        "same ratio computed from requests per CPU second of each server (H's and asyncserve's), which a neighbour "
        "on the shared core disturbs least: where the two differ, a neighbour took part of a server's core. mean "
        "batch is rows per predict call over the row's runs. The bare app's req/s is the HTTP-only ceiling at that "
        "concurrency (its c=64 value is H). server CPU is the share of its core the server used: below about 0.95 "
        "at c >= 8 means a neighbour took part of the core during that row."
    )


def _rounds_table(data: dict[str, Any]) -> str:
    served = data["asyncserve"]
    headers = ["c", "round", *(f"{label} req/s" for label in _labels(data)), "L (this round's H)"]
    headers += [f"{label} ÷ L" for label in served] + [f"{served[0]} ÷ {label}" for label in served[1:]]
    rows = [
        [
            str(row["concurrency"]), str(r["round"]), *(f"{r['rps'][label]:,.0f}" for label in _labels(data)),
            f"{r['L']:,.0f}", *(f"{r['to_L'][label]:.2f}" for label in served),
            *(_num(r["first_to"][label], "{:.2f}") for label in served[1:]),
        ]
        for row in data["rows"]
        for r in row["rounds"]
    ]  # fmt: skip
    return report.markdown_table(headers, rows)


def _rounds_legend(served: list[str]) -> str:
    versus = f" {served[0]} ÷ another asyncserve compares two servers loaded one after the other." if served[1:] else ""
    return (
        "Every run in the order measured: within a round the servers ran back to back (the order rotating from a "
        "round to the next), so ratios within a round see the same machine. L (this round's H) is "
        "1 / (1/R32 + 1/H) with H the bare app's req/s in that round, and ÷ L uses it." + versus
    )


def _batching_table(data: dict[str, Any]) -> str:
    headers = ["c", "server", "batches", "mean rows", "close reasons", "model µs per row", "model share of wall"]
    headers += ["CPU µs/req loop / executor"]
    headers += ["mean queue wait ms", "shed", "loop lag mean ms", "lag > 5 ms / > 50 ms"]
    table = []
    for row in data["rows"]:
        for label in data["asyncserve"]:
            b, lag = row["batching"][label], row["loop_lag"][label]
            table.append([
                str(row["concurrency"]), label, f"{b['batches']:,}", _num(b["mean_batch_rows"], "{:.1f}"),
                _counts(b["close_reasons"]), _num(b["predict_s_per_row"] and 1e6 * b["predict_s_per_row"], "{:.1f}"),
                _num(b["predict_share_of_wall"], "{:.2f}"), _thread_cpu(row["cpu_us_per_request"][label]),
                _num(b["mean_queue_wait_ms"], "{:.3f}"), _counts(b["shed"]) or "0", _lag_mean(lag),
                f"{lag['over_5ms']} / {lag['over_50ms']} of {lag['wakeups']}",
            ])  # fmt: skip
    return report.markdown_table(headers, table) + (
        "\n\nmodel µs per row is the time inside predict (the executor thread) per row; model share of wall is "
        "the part of the run's wall time a predict call was running, on the same core as the event loop. CPU µs/req "
        "is asyncserve's CPU time per request in its event-loop thread (HTTP, JSON, routing, batching, metrics) "
        "and in its other threads, that is its executor thread (the model), from /proc; compare the loop's with "
        "1e6 / H per CPU-s, the bare app's whole cost per request. Loop lag is how late the event loop woke "
        "asyncserve's lag probe (a 50 ms timer): time it could not turn to new I/O."
    )


def _thread_cpu(by_thread: dict[str, float]) -> str:
    # Python does not name OS threads, so every thread but the main one counts as the executor's
    # (the only other thread busy during a run).
    executor = sum(us for name, us in by_thread.items() if name != "main")
    return f"{by_thread.get('main', 0.0):.0f} / {executor:.0f}"


def _lag_mean(lag: dict[str, Any]) -> str:
    return "-" if lag["mean_ms"] is None else f"{lag['mean_ms']:.2f}"


def _counts(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return ", ".join(f"{name} {count:,} ({count / total:.0%})" for name, count in counts.items()) if total else ""


def _overload_text(overload: dict[str, Any]) -> str:
    wrk, deadline, rss = overload["wrk"], overload["deadline"], overload["rss_mib"]
    timeout_ms = 1000 * overload["request_timeout_s"]
    probe = "; ".join(
        f"{status}: {p['count']} answers, p50 {report.ms(p['p50_ms'])} ms, p99 {report.ms(p['p99_ms'])} ms, "
        f"max {report.ms(p['max_ms'])} ms, between {p['first_s']:g} s and {p['last_s']:g} s"
        for status, p in overload["probe"].items()
    )
    lag = overload["loop_lag"]
    wrk_ok = max(0, wrk["requests"] - wrk["errors"])
    return "\n".join(
        [
            f"wrk with {overload['concurrency']} connections for {overload['duration_s']} s, every request with "
            f"`X-Request-Timeout: {overload['request_timeout_s']:g}` ({timeout_ms:g} ms).",
            "",
            f"- answers by status (asyncserve's counters): {_counts(overload['by_status'])}; error codes: "
            f"{_counts(overload['errors_by_code']) or 'none'}",
            f"- served: {overload['answered_200_per_s']:,.0f} req/s answered 200 ({wrk_ok:,} of them to wrk, the "
            f"rest to the probe); rows shed by the batcher: "
            f"{_counts(overload['batching']['shed']) or 'none'}; mean batch "
            f"{overload['batching']['mean_batch_rows']}",
            f"- server-side duration (arrival to response): {deadline['over_deadline']} of {deadline['answered']} "
            f"over {timeout_ms:g} ms; **{deadline['past_deadline_by_margin']} past the deadline by more than "
            f"{1000 * deadline['margin_s']:g} ms** (the resolution of the duration histogram)",
            f"- server CPU: {overload.get('server_cpu_share', '?')} of its core, "
            f"{overload.get('server_cpu_us_per_answer', '?')} µs per answer (any status)",
            f"- client side (wrk, all statuses): {wrk['rps']:,.0f} answers/s, p50 {report.ms(wrk['p50_ms'])} ms, "
            f"p99 {report.ms(wrk['p99_ms'])} ms, max {report.ms(wrk['max_ms'])} ms, {wrk['errors']:,} non-2xx or "
            "socket errors",
            f"- event loop lag: mean {_lag_mean(lag)} ms; {lag['over_50ms']} of {lag['wakeups']} wake-ups "
            "over 50 ms late",
            f"- probe (one more connection, a request every 20 ms from {RSS_SETTLE_S:g} s into the run; times since "
            f"then), by status: {probe or 'no answers'}",
            f"- server memory (VmRSS, MiB): idle before {rss['idle_before']}, after {RSS_SETTLE_S:g} s of overload "
            f"{rss['start']}, middle {rss['middle']}, end {rss['end']}, max {rss['max']}: growth {rss['growth']} MiB, "
            f"{'flat' if rss['flat'] else 'NOT flat'}",
        ]
    )


# The plot


def write_plot(data: dict[str, Any], path: Path) -> Path | None:
    """Throughput and p50/p99 latency against concurrency; None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed, so no plot was drawn (the JSON and Markdown are written); "
            "install it with: .venv/bin/pip install -r benchmarks/requirements-plot.txt",
            file=sys.stderr,
        )
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    _throughput_axes(left, data)
    _latency_axes(right, data)
    machine = data["machine"]
    compared = data.get("checkouts") or {}
    commits = ", ".join(f"{label} {c['commit'][:7]}" for label, c in compared.items()) or machine["git_commit"]
    figure.suptitle(f"asyncserve dynamic batching, NumPy MLP on one core ({machine['date'][:10]}, {commits})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _throughput_axes(axes: Any, data: dict[str, Any]) -> None:
    concurrencies = [row["concurrency"] for row in data["rows"]]
    for label in _labels(data):
        style = ":" if label == "bare" else "-"
        rps = [row[label]["rps"] for row in data["rows"]]
        axes.plot(concurrencies, rps, style, marker="o", label=LABELS.get(label, f"asyncserve ({label})"))
    axes.axhline(data["L"], color="black", linestyle="--", linewidth=1, label=f"L = {data['L']:,.0f}")
    axes.axhline(0.85 * data["L"], color="gray", linestyle="--", linewidth=1, label="0.85 x L")
    _concurrency_axis(axes, concurrencies)
    axes.set_ylabel("requests per second")
    axes.set_ylim(bottom=0)
    axes.set_title("Throughput")
    axes.legend(fontsize=8)


def _latency_axes(axes: Any, data: dict[str, Any]) -> None:
    concurrencies = [row["concurrency"] for row in data["rows"]]
    rows = data["rows"]
    for index, label in enumerate(_labels(data)[:-1]):  # not the bare app: it runs no model
        color, name = f"C{index}", LABELS.get(label, f"asyncserve ({label})")
        axes.plot(concurrencies, [r[label]["p50_ms"] for r in rows], "-", marker="o", color=color, label=f"{name} p50")
        axes.plot(concurrencies, [r[label]["p99_ms"] for r in rows], "--", marker="x", color=color, label=f"{name} p99")
    bound = 1000 / data["raw"]["rows_per_s"]["1"] + 1
    axes.axhline(bound, color="gray", linestyle=":", linewidth=1, label=f"raw single-row latency + 1 ms ({bound:.2f})")
    _concurrency_axis(axes, concurrencies)
    axes.set_yscale("log")
    axes.set_ylabel("latency, ms (log scale)")
    axes.set_title("Latency (wrk)")
    axes.legend(fontsize=8)


def _concurrency_axis(axes: Any, concurrencies: list[int]) -> None:
    axes.set_xscale("log", base=2)
    axes.set_xticks(concurrencies)
    axes.set_xticklabels([str(c) for c in concurrencies])
    axes.set_xlabel("concurrency (open connections)")
    axes.grid(True, which="major", alpha=0.3)
