"""Summaries, ratios and the files under ``benchmarks/results/``: JSON for tools, Markdown for people."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import wrk
from benchmarks.harness import REPO
from benchmarks.wrk import WrkResult

RESULTS_DIR = REPO / "benchmarks" / "results"
_PACKAGES = ("uvicorn", "uvloop", "httptools", "orjson", "numpy", "starlette", "fastapi", "pydantic", "asyncserve")

LEGEND = (
    "req/CPU-s is requests per CPU second of the server (its threads and child processes): its cost per request, "
    "which other processes on the shared core disturb least. server CPU is the share of its core the server "
    "used (about 1.00 when saturated and alone; well below 1 at saturating concurrency means a neighbour took "
    "the core, so trust req/CPU-s over req/s in that row)."
)
LOAD_BOUND_SHARE = 0.9
"""A wrk CPU share above which wrk itself may have limited the throughput."""


def load_warning(load_cpu_shares: Iterable[float]) -> str:
    """A sentence for the table's foot, saying whether wrk had CPU to spare in every run."""
    worst = max(load_cpu_shares, default=0.0)
    if worst > LOAD_BOUND_SHARE:
        return f"WARNING: wrk used up to {worst:.0%} of its core, so it may have limited some rows' req/s."
    return f"wrk used at most {worst:.0%} of its core: the servers, not the load generator, set the pace."


@dataclasses.dataclass(frozen=True)
class Summary:
    """The median of repeated wrk runs of one app, endpoint and concurrency, with the rps spread."""

    rps: float
    p50_ms: float
    p99_ms: float
    rps_min: float
    rps_max: float
    cpu_share: float
    requests_per_cpu_s: float
    load_cpu_share: float
    errors: int

    @classmethod
    def of(cls, runs: Sequence[WrkResult]) -> Summary:
        rps = [run.rps for run in runs]
        return cls(
            rps=round(statistics.median(rps), 1),
            p50_ms=round(statistics.median(run.p50_ms for run in runs), 3),
            p99_ms=round(statistics.median(run.p99_ms for run in runs), 3),
            rps_min=min(rps),
            rps_max=max(rps),
            cpu_share=round(statistics.median(run.cpu_share for run in runs), 3),
            requests_per_cpu_s=round(statistics.median(run.requests_per_cpu_s for run in runs), 1),
            load_cpu_share=round(max(run.load_cpu_share for run in runs), 3),
            errors=sum(run.errors for run in runs),
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ratios(summary: Summary, baseline: Summary) -> dict[str, float]:
    """``summary / baseline``: for rps and requests per CPU second below 1 is slower, for latencies above 1."""
    return {
        "rps": _ratio(summary.rps, baseline.rps),
        "requests_per_cpu_s": _ratio(summary.requests_per_cpu_s, baseline.requests_per_cpu_s),
        "p50": _ratio(summary.p50_ms, baseline.p50_ms),
        "p99": _ratio(summary.p99_ms, baseline.p99_ms),
    }


def _ratio(value: float, baseline: float) -> float:
    return round(value / baseline, 3) if baseline > 0 else float("nan")


def machine_facts(server_cpu: int, load_cpu: int) -> dict[str, Any]:
    """What a reader needs to weigh the numbers: the machine, its load, the versions, the date."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": wrk.version(),
        "versions": {name: _version(name) for name in _PACKAGES},
        "git_commit": _git_commit(),
        "server_cpu": server_cpu,
        "load_cpu": load_cpu,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "?"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str:
    try:
        completed = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return completed.stdout.strip() or "?"


def facts_markdown(facts: dict[str, Any]) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in facts["versions"].items() if version)
    return "\n".join(
        [
            f"- date: {facts['date']}; commit: {facts['git_commit']}",
            *([f"- command: `{facts['command']}`"] if "command" in facts else []),
            f"- machine: nproc {facts['nproc']}, {facts['cpu_model']}, Linux {facts['kernel']}",
            f"- load average at start: {facts['loadavg_start']}, at end: {facts.get('loadavg_end', '?')}",
            f"- server pinned to CPU {facts['server_cpu']}, wrk pinned to CPU {facts['load_cpu']} ({facts['wrk']})",
            f"- Python {facts['python']}; {versions}",
        ]
    )


def ms(value: float) -> str:
    """A latency for a table: three decimals below a millisecond, two above."""
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def record_end(facts: dict[str, Any]) -> None:
    facts["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]


def _without_nan(value: Any) -> Any:
    """The document with every NaN (a quantity that could not be measured) as null, which JSON can carry."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(item) for item in value]
    return value


def relative_paths(text: str, placeholders: Mapping[Path, str] | None = None) -> str:
    """``text`` without this machine's absolute paths: relative to the repository root, or named.

    ``placeholders`` name directories outside the repository (``<old checkout>``); the repository
    itself becomes ``.`` (its files, ``benchmarks/...``), a virtual environment outside it
    ``<venv>``, and anything under the temporary directory ``<tmp>``.
    """
    venv = {} if Path(sys.prefix).is_relative_to(REPO) else {Path(sys.prefix): "<venv>"}
    named = {**(placeholders or {}), **venv, REPO: "."}
    for path, name in sorted(named.items(), key=lambda item: len(str(item[0])), reverse=True):
        # The directory itself becomes its name; a path inside it, NAME/rest (just rest for the repository).
        inside = "" if name == "." else f"{name}/"
        text = re.sub(re.escape(str(path)) + r"/", inside, text)
        text = re.sub(re.escape(str(path)) + r"(?![\w-]|\.\w)", name, text)
    return re.sub(re.escape(tempfile.gettempdir()) + r"/[^\s\"'`:;,)]+", "<tmp>", text)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran this benchmark (``write_results`` makes its paths relative)."""
    return " ".join([sys.executable, "-m", _running_module(), *(sys.argv[1:] if argv is None else argv)])


def _running_module() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def write_results(
    name: str,
    data: dict[str, Any],
    markdown: str,
    directory: Path = RESULTS_DIR,
    placeholders: Mapping[Path, str] | None = None,
) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md``, with paths relative to the repository; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / f"{name}.json", directory / f"{name}.md"
    document = json.dumps(_without_nan(data), indent=2, allow_nan=False) + "\n"
    json_path.write_text(relative_paths(document, placeholders))
    md_path.write_text(relative_paths(markdown, placeholders))
    return json_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.report FILE ...``: rewrite results files written before paths were made relative."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    parser.add_argument("files", type=Path, nargs="+")
    for path in parser.parse_args(argv).files:
        text = path.read_text()
        if relative_paths(text) != text:
            path.write_text(relative_paths(text))
            print(f"rewritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
