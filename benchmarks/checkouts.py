"""asyncserve from another checkout: how to run it, and proof that a server runs the code meant.

A checkout is a directory holding asyncserve's sources at some commit, most simply a
``git worktree``: ``src/asyncserve`` in the src layout, ``asyncserve/`` at the top in the older
one. A server runs it as ``python -m asyncserve`` with the checkout's package first on
``PYTHONPATH`` and this repository's ``benchmarks`` package beside it, so that every server of a
comparison loads the same benchmark models whatever the commit::

    git worktree add ../asyncserve-old ef40070
    python -m benchmarks.batching --checkout new=. old=../asyncserve-old --concurrency 64
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import REPO, BenchmarkError

_WHERE = "import asyncserve, benchmarks; print(asyncserve.__file__); print(benchmarks.__file__)"


@dataclass(frozen=True)
class Checkout:
    """A label (``new``, ``old``, ...) and the directory of a checkout of asyncserve."""

    label: str
    path: Path

    @classmethod
    def parse(cls, argument: str) -> Checkout:
        """``LABEL=PATH`` from the command line; ``argparse`` reports the error."""
        label, _, path = argument.partition("=")
        checkout = cls(label, Path(path).resolve())
        if not label or not path:
            raise argparse.ArgumentTypeError(f"{argument!r}: give LABEL=PATH, for example old=../asyncserve-old")
        if checkout.package_root is None:
            raise argparse.ArgumentTypeError(
                f"{argument!r}: {path} holds neither src/asyncserve/ (src layout) nor asyncserve/ (older layout)"
            )
        return checkout

    @property
    def package_root(self) -> Path | None:
        """The directory that holds the ``asyncserve`` package: ``src`` in the src layout, else the checkout."""
        for root in (self.path / "src", self.path):
            if (root / "asyncserve" / "__init__.py").is_file():
                return root
        return None

    @property
    def pythonpath(self) -> str:
        # This repository goes first when it holds no top-level asyncserve (the src layout): then
        # `benchmarks` comes from here even when an older checkout's root holds its own copy.
        root = self.package_root or self.path
        entries = [root, REPO] if (REPO / "asyncserve").is_dir() else [REPO, root]
        return os.pathsep.join(dict.fromkeys(map(str, entries)))

    @property
    def launcher(self) -> tuple[str, ...]:
        """The command that starts this checkout's asyncserve (for ``harness.asyncserve_command``)."""
        return ("env", f"PYTHONPATH={self.pythonpath}", "PYTHONSAFEPATH=1", sys.executable, "-m", "asyncserve")

    @property
    def placeholder(self) -> str:
        """How reports name the checkout's directory, which is this machine's business."""
        return f"<{self.label} checkout>"

    def commit(self) -> str:
        """The checkout's commit, with ``-dirty`` when its working tree has changes."""
        command = ["git", "-C", str(self.path), "describe", "--always", "--dirty", "--abbrev=40"]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        return completed.stdout.strip() or "?"

    def check_imports(self) -> dict[str, str]:
        """Where its servers import ``asyncserve`` and ``benchmarks`` from; refuse any other checkout's."""
        command = ["env", f"PYTHONPATH={self.pythonpath}", "PYTHONSAFEPATH=1", sys.executable, "-c", _WHERE]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
        if completed.returncode != 0:
            raise BenchmarkError(f"{self.label}: cannot import asyncserve: {completed.stderr.strip()[-500:]}")
        asyncserve, benchmarks = (Path(line).resolve() for line in completed.stdout.split())
        if not asyncserve.is_relative_to(self.path):
            raise BenchmarkError(f"{self.label} imports asyncserve from {asyncserve}, not from {self.path}")
        if not benchmarks.is_relative_to(REPO / "benchmarks"):
            raise BenchmarkError(f"{self.label} imports benchmarks from {benchmarks}, not from {REPO}")
        return {"asyncserve": str(asyncserve), "benchmarks": str(benchmarks)}


def describe(checkouts: Sequence[Checkout]) -> dict[str, dict[str, object]]:
    """Each checkout's commit and where its servers import from, checked (for a report's JSON)."""
    return {c.label: {"path": c.placeholder, "commit": c.commit(), "imports": c.check_imports()} for c in checkouts}


def placeholders(checkouts: Sequence[Checkout]) -> dict[Path, str]:
    """Each checkout's directory and its name in reports (see ``report.relative_paths``)."""
    return {checkout.path: checkout.placeholder for checkout in checkouts}


def add_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--checkout",
        type=Checkout.parse,
        nargs="+",
        default=[],
        metavar="LABEL=PATH",
        help=f"run {what} from each of these checkouts (a git worktree at some commit), labelled LABEL, "
        "instead of the installed asyncserve, interleaved",
    )
