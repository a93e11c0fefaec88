"""Many models on one server: does a cheap model keep its speed beside a saturated heavy one?

On the demo service (``asyncserve.demo:service``), for each server compared (``--checkout
LABEL=PATH``, say the commit before fair scheduling and after), interleaved round by round:

- ``iris`` alone: 8 connections sending one row each;
- ``minilm`` alone: 32 connections sending 8 texts each (saturating its executor);
- both at once, the same two loads side by side;
- the four-model flood: ``minilm``, ``faq``, ``iris`` and ``churn`` at 16 connections each, with the
  default 30 s deadline: every answer should be a 200.

Reported per server: iris's throughput beside minilm over alone (target >= 0.5), its p50 beside
over alone (target <= 3), minilm's throughput beside over alone (target >= 0.85), and non-200
answers. The servers get both cores (the demo's default executor is one worker per core), wrk
runs beside them. Results: ``benchmarks/results/<name>.{json,md,png}``.

Usage::

    git worktree add ../asyncserve-before <commit before the change>
    .venv/bin/python -m benchmarks.fair_models --checkout after=. before=../asyncserve-before
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import checkouts, harness, report, wrk
from benchmarks.checkouts import Checkout
from benchmarks.harness import Endpoint, Server, ServerSpec, asyncserve_command
from benchmarks.wrk import WrkResult

SERVICE = "asyncserve.demo:service"
TEXTS = ["How does dynamic batching decide when a batch leaves?"] * 8


def _endpoint(model: str, body: object) -> Endpoint:
    return Endpoint(model, "POST", f"/v1/models/{model}/predict", json.dumps(body).encode(), bool)


LOADS = {
    "iris": (_endpoint("iris", {"features": [5.1, 3.5, 1.4, 0.2]}), 8),
    "minilm": (_endpoint("minilm", [{"text": text} for text in TEXTS]), 32),
    "faq": (_endpoint("faq", {"question": "What is batching?"}), 16),
    "churn": (_endpoint("churn", {"customer_id": 17}), 16),
}
"""Each model's request, and its connections when loaded alone or beside one other."""
SCENARIOS: dict[str, tuple[str, ...]] = {
    "iris alone": ("iris",),
    "minilm alone": ("minilm",),
    "both": ("iris", "minilm"),
    "flood": ("minilm", "faq", "iris", "churn"),
}
FLOOD_CONCURRENCY = 16


def run_loads(
    server: Server, models: Sequence[str], scripts: dict[str, Path], duration_s: int, cpu: int
) -> dict[str, WrkResult]:
    """Load every model of ``models`` at once, each with its own wrk, for ``duration_s``."""
    flood = len(models) > 2

    def load(model: str) -> WrkResult:
        endpoint, concurrency = LOADS[model]
        concurrency = FLOOD_CONCURRENCY if flood else concurrency
        return wrk.run_wrk(server.port, endpoint.path, scripts[model], concurrency, duration_s, cpu)

    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        return dict(zip(models, pool.map(load, models), strict=True))


def wait_until_idle(server: Server, timeout_s: float = 120.0) -> float:
    """Wait until the server (its processes too) uses under a tenth of a core: the batches that the last
    load left running have ended, and do not slow the next run. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        before = harness.process_cpu_s(server.pid)
        time.sleep(0.5)
        if harness.process_cpu_s(server.pid) - before < 0.05:
            break
    return time.monotonic() - started


def measure(servers: Sequence[Server], scripts: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for number in range(args.repeats):
        order = list(servers[number % len(servers) :]) + list(servers[: number % len(servers)])
        for scenario, models in SCENARIOS.items():
            for server in order:
                for other in servers:
                    wait_until_idle(other)
                harness.wait_for_quiet(args.quiet_wait_s)
                results = run_loads(server, models, scripts, args.duration_s, args.load_cpu)
                per_model = runs.setdefault(server.spec.label, {}).setdefault(scenario, {})
                for model, result in results.items():
                    per_model.setdefault(model, []).append(result.as_dict())
                brief = ", ".join(f"{m} {r.rps:.0f}/s p50 {r.p50_ms:.1f} ms err {r.errors}" for m, r in results.items())
                print(f"round {number + 1} {scenario} {server.spec.label}: {brief}", file=sys.stderr, flush=True)
    return runs


def summarise(runs: dict[str, Any]) -> dict[str, dict[str, float]]:
    def median(server: str, scenario: str, model: str, key: str) -> float:
        return float(statistics.median(run[key] for run in runs[server][scenario][model]))

    def total(server: str, scenario: str, key: str) -> int:
        return sum(run[key] for model in runs[server][scenario].values() for run in model)

    summary = {}
    for server in runs:
        iris_alone, iris_both = median(server, "iris alone", "iris", "rps"), median(server, "both", "iris", "rps")
        p50_alone, p50_both = median(server, "iris alone", "iris", "p50_ms"), median(server, "both", "iris", "p50_ms")
        minilm_alone = median(server, "minilm alone", "minilm", "rps")
        minilm_both = median(server, "both", "minilm", "rps")
        summary[server] = {
            "iris_alone_rps": iris_alone, "iris_beside_rps": iris_both,
            "iris_alone_p50_ms": p50_alone, "iris_beside_p50_ms": p50_both,
            "minilm_alone_rps": minilm_alone, "minilm_beside_rps": minilm_both,
            "iris_throughput_kept": round(iris_both / iris_alone, 3),
            "iris_p50_factor": round(p50_both / p50_alone, 2),
            "minilm_throughput_kept": round(minilm_both / minilm_alone, 3),
            "errors_beside": total(server, "both", "errors"),
            "errors_flood": total(server, "flood", "errors"),
        }  # fmt: skip
    return summary


def markdown(summary: dict[str, dict[str, float]], facts: dict[str, Any]) -> str:
    rows = [
        [
            server,
            f"{s['iris_alone_rps']:.0f} / {s['iris_beside_rps']:.0f}",
            f"{s['iris_throughput_kept']:.2f}",
            f"{s['iris_alone_p50_ms']:.1f} / {s['iris_beside_p50_ms']:.1f}",
            f"{s['iris_p50_factor']:.1f}",
            f"{s['minilm_alone_rps']:.0f} / {s['minilm_beside_rps']:.0f}",
            f"{s['minilm_throughput_kept']:.2f}",
            str(int(s["errors_beside"])),
            str(int(s["errors_flood"])),
        ]
        for server, s in summary.items()
    ]
    headers = [
        "server", "iris req/s alone / beside", "kept (>= 0.5)", "iris p50 ms alone / beside", "factor (<= 3)",
        "minilm req/s alone / beside", "kept (>= 0.85)", "non-200 beside", "non-200 in the 4-model flood",
    ]  # fmt: skip
    return "\n\n".join(
        [
            "# A cheap model beside a saturated heavy one (demo service)",
            report.markdown_table(headers, rows),
            "Medians over the rounds; the servers interleaved round by round. `minilm` gets 32 connections of 8 "
            "texts, `iris` 8 connections of one row; the flood loads four models at 16 connections each.",
            report.facts_markdown(facts),
        ]
    )


def plot(summary: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = list(summary)
    figure, axes = plt.subplots(1, 3, figsize=(12, 4))
    panels = [
        ("iris req/s", "iris_alone_rps", "iris_beside_rps"),
        ("iris p50 (ms)", "iris_alone_p50_ms", "iris_beside_p50_ms"),
        ("minilm req/s", "minilm_alone_rps", "minilm_beside_rps"),
    ]
    for axis, (title, alone, beside) in zip(axes, panels, strict=True):
        positions = range(len(servers))
        axis.bar([p - 0.2 for p in positions], [summary[s][alone] for s in servers], 0.4, label="alone")
        axis.bar([p + 0.2 for p in positions], [summary[s][beside] for s in servers], 0.4, label="beside the other")
        axis.set_xticks(list(positions), servers)
        axis.set_title(title)
        if title.startswith("iris p50"):
            axis.set_yscale("log")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fair_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Checkout.parse, nargs="+", required=True, metavar="LABEL=PATH")
    parser.add_argument("--duration-s", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet-wait-s", type=float, default=5.0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--name", default="fair-models")
    args = parser.parse_args(argv)
    harness.require_tool("wrk")
    facts = report.machine_facts(server_cpu=-1, load_cpu=args.load_cpu)
    facts["checkouts"] = checkouts.describe(args.checkout)
    specs = [ServerSpec(c.label, asyncserve_command(SERVICE, launcher=c.launcher)) for c in args.checkout]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        scripts = {model: wrk.write_script(endpoint, workdir) for model, (endpoint, _) in LOADS.items()}
        servers = [stack.enter_context(harness.running_server(spec, "0,1", workdir, 120.0)) for spec in specs]
        runs = measure(servers, scripts, args)
    report.record_end(facts)
    summary = summarise(runs)
    text = markdown(summary, facts).replace("server pinned to CPU -1", "servers on both cores (not pinned)")
    data = {"facts": facts, "summary": summary, "runs": runs}
    report.write_results(args.name, data, text, placeholders=checkouts.placeholders(args.checkout))
    plot(summary, report.RESULTS_DIR / f"{args.name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
