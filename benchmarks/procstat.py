"""What ``/proc`` says about a server process: its resident memory, and the CPU time of each of its threads."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.harness import BenchmarkError

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """The resident memory of a process, in MiB, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise BenchmarkError(f"process {pid} reports no VmRSS")


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) each thread of ``pid`` has used: ``main`` (the event loop), the others by name.

    Threads of one name are summed; Python does not name OS threads, so a pool's threads carry the process's name.
    """
    totals: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        name = "main" if task.name == str(pid) else stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return totals


def thread_cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: round(seconds - before.get(name, 0.0), 3) for name, seconds in after.items()}
