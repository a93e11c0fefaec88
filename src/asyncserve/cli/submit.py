"""``asyncserve jobs submit FILE --model M --out FILE``: a file of inputs in, one result line per job out.

The input is JSON Lines (one inputs object per line, as the JSON API takes it) or, for a ``.csv``
file, CSV whose header row names the inputs (see :mod:`asyncserve.cli.inputfiles`). Rows go to
``POST /v1/jobs/batch`` in
chunks of ``--batch-size``, ``--concurrency`` chunks at a time; a chunk the server refuses (a bad
row fails its whole chunk) is sent again row by row, so that only the bad rows are ``rejected``.
``--concurrency`` pollers then follow the jobs in submission order (``GET /v1/jobs/{id}``, backing
off to one poll a second) and each finished job becomes one line of ``--out`` as it is found::

    {"line": 3, "id": "01a2...", "status": "succeeded", "result": {...}}
    {"line": 4, "id": null, "status": "rejected", "error": "..."}

``line`` is the row's line in the input file (a CSV header is line 1). A progress line on stderr
counts submitted and finished jobs; the exit status is 0 if every job succeeded, 1 otherwise. An
existing ``--out`` is never replaced by accident: a new run refuses it unless given ``--overwrite``.

Resuming: a run keeps a journal, ``OUT.jobs``: first the run's id, ``{"run": "<hex>"}``, then each
accepted chunk's job ids before they are followed; a finished run deletes it. ``--resume`` keeps the
lines already in ``--out``, follows the journal's other jobs, and submits only rows in neither file.
Every job carries the idempotency key ``<run>:<line>``, so a chunk the server accepted but the
client died before journaling is found again when resubmitted, not run twice (while the server
still has its jobs: a job's key goes with it when its ``ttl_s`` ends).
Needs ``asyncserve[client]`` (httpx).
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from asyncserve.cli.inputfiles import Row, read_rows
from asyncserve.exceptions import ConfigurationError

if TYPE_CHECKING:
    import httpx

FINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_MAX_POLL_S = 1.0


@dataclass(frozen=True, kw_only=True)
class SubmitOptions:
    """What ``asyncserve jobs submit`` was asked to do."""

    file: Path
    model: str
    out: Path
    url: str = "http://127.0.0.1:8000"
    version: str | None = None
    batch_size: int = 500
    concurrency: int = 4
    max_attempts: int | None = None
    resume: bool = False
    overwrite: bool = False
    """Replace an existing ``--out`` (a new run refuses one otherwise)."""
    unreachable_s: float = 60.0
    """Give up once the server has not answered for this long."""

    @property
    def journal(self) -> Path:
        return self.out.with_name(self.out.name + ".jobs")


class SubmitError(ConfigurationError):
    """The run cannot go on (the server is gone, the input is unreadable); exit status 2."""


# --- resuming ------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines file we wrote (none if it is missing), but for a last line cut short."""
    lines = path.read_bytes().splitlines() if path.exists() else []
    if lines and not _is_json(lines[-1]):
        lines.pop()
    return [orjson.loads(line) for line in lines]


def _is_json(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


@dataclass
class Plan:
    """What is left to do: rows to submit, (line, id) jobs to follow, and the statuses of lines already out."""

    todo: list[Row]
    follow: list[tuple[int, str]]
    done: dict[int, str]
    run: str | None = None
    """The interrupted run's id, from its journal; None for a new run (or a journal that lost it)."""


def plan(options: SubmitOptions, rows: Sequence[Row]) -> Plan:
    if not options.resume:
        if options.journal.exists():
            raise SubmitError(f"{options.journal} says an earlier run was interrupted: pass --resume to finish it, "
                              "or delete the file to start again")  # fmt: skip
        if options.out.exists() and not options.overwrite:
            raise SubmitError(f"{options.out} exists already: pass --overwrite to replace it, or another --out")
        return Plan(list(rows), [], {})
    done = {record["line"]: record["status"] for record in _read_lines(options.out) if "status" in record}
    records = _read_lines(options.journal)
    journal = {record["line"]: record["id"] for record in records if "line" in record}
    runs = [record["run"] for record in records if "run" in record]
    follow = [(line, job_id) for line, job_id in journal.items() if line not in done]
    todo = [row for row in rows if row.line not in done and row.line not in journal]
    return Plan(todo, follow, done, runs[-1] if runs else None)


# --- writing -------------------------------------------------------------------------------------


class LineWriter:
    """Appends JSON lines to a file from a thread, so the event loop never waits on the disk."""

    def __init__(self, path: Path, *, append: bool) -> None:
        self.path, self.append = path, append
        self._lines: list[bytes] = []
        self._file: IO[bytes] | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._file = await asyncio.to_thread(self.path.open, "ab" if self.append else "wb")

    async def write(self, *records: dict[str, Any]) -> None:
        """Queue the records and write every queued line (one thread hop for what piled up meanwhile)."""
        self._lines += [orjson.dumps(record) + b"\n" for record in records]
        async with self._lock:
            lines, self._lines = self._lines, []
            if lines and self._file is not None:
                await asyncio.to_thread(_write_flushed, self._file, b"".join(lines))

    async def aclose(self) -> None:
        await self.write()
        if self._file is not None:
            await asyncio.to_thread(self._file.close)


def _write_flushed(file: IO[bytes], data: bytes) -> None:
    file.write(data)
    file.flush()


@dataclass
class Progress:
    """Counts by status, and a ``\\r`` line on stderr redrawn at most every ``every_s``."""

    total: int
    submitted: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    stream: IO[str] = field(default_factory=lambda: sys.stderr)
    every_s: float = 0.2
    before: int = 0  # lines written by an earlier run (--resume)
    started: float = field(default_factory=time.monotonic)
    _drawn: float = 0.0

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    @property
    def failed(self) -> int:
        return self.done - self.counts.get("succeeded", 0)

    def count(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        self.draw()

    def draw(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._drawn >= self.every_s:
            self._drawn = now
            rate = (self.done - self.before) / max(now - self.started, 1e-9)
            self.stream.write(f"\rsubmitted {self.submitted}/{self.total}  done {self.done}/{self.total}  "
                              f"failed {self.failed}  {rate:.1f} jobs/s ")  # fmt: skip
            self.stream.flush()

    def end(self) -> None:
        """Draw the final counts and end the line, if a line was started."""
        if self._drawn:
            self.draw(force=True)
            self.stream.write("\n")

    def summary(self, out: Path) -> str:
        parts = ", ".join(f"{n} {status}" for status, n in sorted(self.counts.items()))
        return f"{self.done} jobs in {time.monotonic() - self.started:.1f}s: {parts or 'none'}; results in {out}"


# --- the run -------------------------------------------------------------------------------------


def _import_httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise ConfigurationError("asyncserve jobs submit needs httpx: pip install 'asyncserve[client]'") from None
    return httpx


class Submission:
    """One run: submits chunks and follows jobs over one HTTP client, writing results as they finish."""

    def __init__(self, options: SubmitOptions, client: httpx.AsyncClient, progress: Progress, run: str | None) -> None:
        self.options, self.client, self.progress = options, client, progress
        self.run_id = run or secrets.token_hex(8)
        """The run's id, part of every job's idempotency key."""
        self._journal_run = run is None
        """Whether the id is new: it goes to the journal before any chunk is submitted."""
        self.httpx = _import_httpx()
        self.results = LineWriter(options.out, append=options.resume)
        self.journal = LineWriter(options.journal, append=options.resume)
        self.to_follow: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()

    async def run(self, todo: Sequence[Row], follow: Sequence[tuple[int, str]]) -> None:
        await self.check_model()
        await self.results.open()
        await self.journal.open()
        if self._journal_run:
            await self.journal.write({"run": self.run_id})
        try:
            for job in follow:
                self.to_follow.put_nowait(job)
            async with asyncio.TaskGroup() as tasks:
                followers = [tasks.create_task(self.follower()) for _ in range(self.options.concurrency)]
                await self.submit_all(todo)
                for _ in followers:
                    self.to_follow.put_nowait(None)
        finally:
            await self.results.aclose()
            await self.journal.aclose()

    async def check_model(self) -> None:
        version = f"/versions/{self.options.version}" if self.options.version else ""
        response = await self.request("GET", f"/v2/models/{self.options.model}{version}", patience_s=3.0)
        if response.status_code != 200:
            raise SubmitError(f"{self.options.url} cannot run model {self.options.model!r}: {_error(response)}")

    async def submit_all(self, rows: Sequence[Row]) -> None:
        slots, size = asyncio.Semaphore(self.options.concurrency), self.options.batch_size

        async def submit(chunk: Sequence[Row]) -> None:
            async with slots:
                await self.submit_chunk(chunk)

        async with asyncio.TaskGroup() as tasks:
            for start in range(0, len(rows), size):
                tasks.create_task(submit(rows[start : start + size]))

    async def submit_chunk(self, chunk: Sequence[Row]) -> None:
        response = await self.request("POST", "/v1/jobs/batch", content=orjson.dumps([self.job(r) for r in chunk]),
                                      headers={"content-type": "application/json"})  # fmt: skip
        if response.status_code == 202:
            await self.accepted(chunk, [job["id"] for job in response.json()["jobs"]])
        elif 400 <= response.status_code < 500 and len(chunk) > 1:
            for row in chunk:  # some row is bad: find which, and submit the rest
                await self.submit_chunk([row])
        else:
            self.progress.submitted += len(chunk)
            error = _error(response)
            await self.write(*({"line": row.line, "id": None, "status": "rejected", "error": error} for row in chunk))

    def job(self, row: Row) -> dict[str, Any]:
        options = {"version": self.options.version, "max_attempts": self.options.max_attempts}
        return {
            "model": self.options.model,
            "inputs": row.inputs,
            "idempotency_key": f"{self.run_id}:{row.line}",
            **{k: v for k, v in options.items() if v is not None},
        }

    async def accepted(self, chunk: Sequence[Row], ids: Sequence[str]) -> None:
        await self.journal.write(*({"line": row.line, "id": job_id} for row, job_id in zip(chunk, ids, strict=True)))
        self.progress.submitted += len(chunk)
        self.progress.draw()
        for row, job_id in zip(chunk, ids, strict=True):
            self.to_follow.put_nowait((row.line, job_id))

    async def follower(self) -> None:
        while (job := await self.to_follow.get()) is not None:
            await self.follow(*job)

    async def follow(self, line: int, job_id: str) -> None:
        """Poll the job until it is final (or gone), then write its line."""
        delay = 0.05
        while True:
            response = await self.request("GET", f"/v1/jobs/{job_id}")
            job = response.json() if response.status_code == 200 else None
            if job is None or job["status"] in FINAL:
                await self.write(_outcome(line, job_id, job, response))
                return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, _MAX_POLL_S)

    async def write(self, *records: dict[str, Any]) -> None:
        await self.results.write(*records)
        for record in records:
            self.progress.count(record["status"])

    async def request(
        self, method: str, path: str, *, patience_s: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send, retrying while the server is unreachable or overloaded, for up to ``unreachable_s``.

        A POST is resent only when it never reached the server (a refused connection), never after
        a broken answer: the server may have accepted it.
        """
        patience_s = self.options.unreachable_s if patience_s is None else patience_s
        give_up, delay = time.monotonic() + patience_s, 0.1
        while True:
            response = await self._send(method, path, give_up, **kwargs)
            if response is not None and (response.status_code not in _RETRY_STATUSES or time.monotonic() > give_up):
                return response
            delay = max(delay, _retry_after_s(response))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _send(self, method: str, path: str, give_up: float, **kwargs: Any) -> httpx.Response | None:
        """One try: the response, or None for a failure worth retrying until ``give_up``."""
        retried = self.httpx.ConnectError if method == "POST" else self.httpx.TransportError
        try:
            response: httpx.Response = await self.client.request(method, path, **kwargs)
        except retried as exc:
            if time.monotonic() > give_up:
                raise SubmitError(f"{self.options.url} did not answer {method} {path} ({exc!r}); if jobs were "
                                  "submitted, run again with --resume once it is back") from None  # fmt: skip
            return None
        except self.httpx.TransportError as exc:
            raise SubmitError(f"{method} {path} broke off ({exc!r}), so whether the server took it is unknown: "
                              "run again with --resume, which will not run its jobs twice") from None  # fmt: skip
        return response


def _outcome(line: int, job_id: str, job: dict[str, Any] | None, response: httpx.Response) -> dict[str, Any]:
    """A finished job's line, or that of a job the server no longer has (404) or would not show."""
    if job is None:
        status = "missing" if response.status_code == 404 else "unknown"
        return {"line": line, "id": job_id, "status": status, "error": _error(response)}
    if job["status"] == "succeeded":
        return {"line": line, "id": job_id, "status": "succeeded", "result": job.get("result")}
    return {"line": line, "id": job_id, "status": job["status"], "error": job.get("error") or job["status"]}


def _error(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


def _retry_after_s(response: httpx.Response | None) -> float:
    try:
        return min(float(response.headers.get("retry-after", "0")), 5.0) if response is not None else 0.0
    except ValueError:
        return 0.0


async def submit_file(options: SubmitOptions, *, stream: IO[str] | None = None) -> Progress:
    """Run a submission to the end; the returned progress holds the counts by status."""
    httpx = _import_httpx()
    rows = await asyncio.to_thread(read_rows, options.file)
    left = await asyncio.to_thread(plan, options, rows)
    progress = Progress(total=len(rows), submitted=len(rows) - len(left.todo), stream=stream or sys.stderr)
    for status in left.done.values():
        progress.counts[status] = progress.counts.get(status, 0) + 1
    progress.before = len(left.done)
    limits = httpx.Limits(max_connections=2 * options.concurrency)
    try:
        async with httpx.AsyncClient(base_url=options.url, timeout=30.0, limits=limits) as client:
            await Submission(options, client, progress, left.run).run(left.todo, left.follow)
    except BaseExceptionGroup as group:  # from the task groups: report the first error as it was raised
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        raise error from None
    finally:
        progress.end()
    await asyncio.to_thread(options.journal.unlink, missing_ok=True)
    return progress


def main(options: SubmitOptions) -> int:
    """The command: 0 if every job succeeded, 1 if any did not; SubmitError (exit 2) if the run could not finish."""
    try:
        progress = asyncio.run(submit_file(options))
    except KeyboardInterrupt:
        print(f"\ninterrupted; run again with --resume to finish ({options.journal})", file=sys.stderr)
        return 130
    print(progress.summary(options.out), file=sys.stderr)
    return 0 if progress.failed == 0 else 1
