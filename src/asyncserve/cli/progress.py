"""The progress of ``asyncserve jobs submit``: a bar on a terminal, plain lines elsewhere.

On a terminal, tqdm draws one bar, redrawn in place: rows done of the total, the rate, the time
left, and how many were submitted and how many failed::

    rows:  42%|████▏     | 420/1000 [00:09<00:12, 46.1 rows/s, submitted 500, failed 3]

Anywhere else (a file, a pipe, a CI log) there is no ``\\r`` and no escape code: one plain line each
time another tenth of the rows is done, at least every ``every_s`` while rows are done, and at the end::

    rows 420/1000 (42%): 417 succeeded, 3 failed; submitted 500; 46.1 rows/s; ETA 12 s

tqdm (a small package with no dependencies, kept since 2015) comes with the ``client`` extra that
the command needs anyway; the counts themselves do not depend on it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Never, Protocol

from asyncserve.exceptions import ConfigurationError

if TYPE_CHECKING:
    from tqdm import tqdm


class Display(Protocol):
    def show(self, progress: Progress) -> None: ...

    def close(self, progress: Progress) -> None: ...


class Progress:
    """Counts by status of a run's rows, and its display.

    Args:
        total: Rows in the input.
        stream: Where the display goes (stderr); a bar when it is a terminal, plain lines otherwise.
        counts: Statuses of rows an earlier run finished (``--resume``), not part of this run's rate.
        submitted: Rows already submitted (by an earlier run).
    """

    def __init__(self, total: int, stream: IO[str], *, counts: dict[str, int], submitted: int) -> None:
        self.total = total
        self.counts = dict(counts)
        self.submitted = submitted
        self.before = sum(counts.values())
        self.started = time.monotonic()
        self.stream = stream
        self._display: Display | None = None
        """Made at the first change, so that a run that stops before (a wrong --url, say) shows nothing."""

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    @property
    def failed(self) -> int:
        return self.done - self.counts.get("succeeded", 0)

    def rate_per_s(self) -> float:
        """Rows done per second by this run."""
        return (self.done - self.before) / max(time.monotonic() - self.started, 1e-9)

    def add_submitted(self, rows: int) -> None:
        self.submitted += rows
        self.display().show(self)

    def count(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        self.display().show(self)

    def display(self) -> Display:
        if self._display is None:
            self._display = TerminalBar(self, self.stream) if self.stream.isatty() else PlainLines(self.stream)
        return self._display

    def end(self) -> None:
        """Show the final counts and leave the display, if it was shown."""
        if self._display is not None:
            self._display.close(self)

    def summary(self, out: Path) -> str:
        parts = ", ".join(f"{n} {status}" for status, n in sorted(self.counts.items()))
        return f"{self.done} jobs in {time.monotonic() - self.started:.1f}s: {parts or 'none'}; results in {out}"


class TerminalBar:
    """A tqdm bar of rows done, redrawn at most every 0.2 s."""

    def __init__(self, progress: Progress, stream: IO[str]) -> None:
        # A terminal that gives no width (a pseudo-terminal nobody sized) gets 80 columns, not an empty bar.
        width = {"dynamic_ncols": True} if _columns(stream) else {"ncols": 80, "nrows": 24}
        self.bar: tqdm[Never] = _tqdm()(
            total=progress.total, initial=progress.done, file=stream, desc="rows", unit=" rows",
            mininterval=0.2, smoothing=0.1, **width,
        )  # fmt: skip
        self.bar.set_postfix_str(_postfix(progress), refresh=False)

    def show(self, progress: Progress) -> None:
        self.bar.set_postfix_str(_postfix(progress), refresh=False)
        self.bar.update(progress.done - self.bar.n)

    def close(self, progress: Progress) -> None:
        self.show(progress)
        self.bar.close()


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 0


def _postfix(progress: Progress) -> str:
    return f"submitted {progress.submitted}, failed {progress.failed}"


def _tqdm() -> type[tqdm[Any]]:
    try:
        from tqdm import tqdm
    except ImportError:
        raise ConfigurationError("asyncserve jobs submit needs tqdm: pip install 'asyncserve[client]'") from None
    return tqdm


class PlainLines:
    """A line at each further tenth of the rows done, at least every ``every_s`` while rows are done, and at the end."""

    def __init__(self, stream: IO[str], every_s: float = 30.0) -> None:
        self.stream = stream
        self.every_s = every_s
        self.shown_done = -1
        self.shown_at = time.monotonic()

    def show(self, progress: Progress) -> None:
        tenth = max(progress.total // 10, 1)
        if progress.done // tenth > self.shown_done // tenth or time.monotonic() - self.shown_at >= self.every_s:
            self.write(progress)

    def close(self, progress: Progress) -> None:
        self.write(progress)

    def write(self, progress: Progress) -> None:
        if progress.done == self.shown_done:
            return
        self.shown_done, self.shown_at = progress.done, time.monotonic()
        self.stream.write(plain_line(progress) + "\n")
        self.stream.flush()


def plain_line(progress: Progress) -> str:
    """``rows 420/1000 (42%): 417 succeeded, 3 failed; submitted 500; 46.1 rows/s; ETA 12 s``."""
    done, total, rate = progress.done, progress.total, progress.rate_per_s()
    share = f"{100 * done // total}%" if total else "100%"
    left = total - done
    eta = "done" if left == 0 else f"ETA {left / rate:.0f} s" if rate > 0 else "ETA unknown"
    succeeded = progress.counts.get("succeeded", 0)
    return (
        f"rows {done}/{total} ({share}): {succeeded} succeeded, {progress.failed} failed; "
        f"submitted {progress.submitted}; {rate:.1f} rows/s; {eta}"
    )
