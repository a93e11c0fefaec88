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

``line`` is the row's line in the input file (a CSV header is line 1). Progress goes to stderr: a bar
on a terminal (rows done, rate, time left), plain lines otherwise (:mod:`asyncserve.cli.progress`);
the exit status is 0 if every job succeeded, 1 otherwise. An
existing ``--out`` is never replaced by accident: a new run refuses it unless given ``--overwrite``.

Resuming: a run keeps a journal, ``OUT.jobs``: first the run's id, ``{"run": "<hex>"}``, then each
accepted chunk's job ids before they are followed; a finished run deletes it. ``--resume`` keeps the
lines already in ``--out``, follows the journal's other jobs, and submits only rows in neither file.
Every job carries the idempotency key ``<run>:<line>``, so a chunk the server accepted but the
client died before journaling is found again when resubmitted, not run twice (while the server
still has its jobs: a job's key goes with it when its ``ttl_s`` ends).

The requests go through :class:`asyncserve.AsyncClient`: a server that goes away (a restart, say)
or refuses (503, 429) is retried for up to ``unreachable_s`` (60 s) from each request's first
failure, and a submission whose answer was lost is sent again with the same keys, which finds the
jobs it made. Needs ``asyncserve[client]`` (aiohttp, tqdm).
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from asyncserve.cli.inputfiles import Row, read_rows
from asyncserve.cli.progress import Progress
from asyncserve.exceptions import AsyncServeError, ConfigurationError, NotFound

if TYPE_CHECKING:
    from asyncserve.client import AsyncClient

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "expired"})
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
    """Give up on a request once the server has not answered it (or refused it) for this long."""

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


# --- the run -------------------------------------------------------------------------------------


TIMEOUT_S = 30.0
"""The longest one request may take."""
CHECK_PATIENCE_S = 3.0
"""How long the first request (is the model there?) waits for an unreachable server: a wrong --url fails fast."""


def _async_client() -> type[AsyncClient]:
    try:
        from asyncserve.client import AsyncClient
    except ImportError:
        raise ConfigurationError("asyncserve jobs submit needs aiohttp: pip install 'asyncserve[client]'") from None
    return AsyncClient


class Submission:
    """One run: submits chunks and follows jobs over one AsyncClient, writing results as they finish."""

    def __init__(self, options: SubmitOptions, client: AsyncClient, progress: Progress, run: str | None) -> None:
        self.options, self.client, self.progress = options, client, progress
        self.run_id = run or secrets.token_hex(8)
        """The run's id, part of every job's idempotency key."""
        self._journal_run = run is None
        """Whether the id is new: it goes to the journal before any chunk is submitted."""
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
        options = self.options
        try:
            async with asyncio.timeout(CHECK_PATIENCE_S):
                await self.client.model_metadata(options.model, version=options.version)
        except AsyncServeError as exc:
            raise SubmitError(f"{options.url} cannot run model {options.model!r}: {exc.message}") from None
        except (ConnectionError, TimeoutError):
            raise SubmitError(f"{options.url} did not answer within {CHECK_PATIENCE_S:g} s: is the server "
                              "running, and is --url right?") from None  # fmt: skip

    async def submit_all(self, rows: Sequence[Row]) -> None:
        slots, size = asyncio.Semaphore(self.options.concurrency), self.options.batch_size

        async def submit(chunk: Sequence[Row]) -> None:
            async with slots:
                await self.submit_chunk(chunk)

        async with asyncio.TaskGroup() as tasks:
            for start in range(0, len(rows), size):
                tasks.create_task(submit(rows[start : start + size]))

    async def submit_chunk(self, chunk: Sequence[Row]) -> None:
        """Submit the rows as jobs; a chunk refused for a bad row (4xx) is sent again row by row."""
        try:
            jobs = await self.client.submit_many(
                self.options.model, [row.inputs for row in chunk], version=self.options.version,
                max_attempts=self.options.max_attempts, idempotency_keys=[f"{self.run_id}:{row.line}" for row in chunk],
            )  # fmt: skip
        except AsyncServeError as exc:
            if 400 <= exc.status_code < 500 and exc.status_code != 429 and len(chunk) > 1:
                for row in chunk:
                    await self.submit_chunk([row])
            else:
                self.progress.add_submitted(len(chunk))
                rejected = ({"line": row.line, "id": None, "status": "rejected", "error": exc.message} for row in chunk)
                await self.write(*rejected)
            return
        await self.accepted(chunk, [job["id"] for job in jobs])

    async def accepted(self, chunk: Sequence[Row], ids: Sequence[str]) -> None:
        await self.journal.write(*({"line": row.line, "id": job_id} for row, job_id in zip(chunk, ids, strict=True)))
        self.progress.add_submitted(len(chunk))
        for row, job_id in zip(chunk, ids, strict=True):
            self.to_follow.put_nowait((row.line, job_id))

    async def follower(self) -> None:
        while (job := await self.to_follow.get()) is not None:
            await self.follow(*job)

    async def follow(self, line: int, job_id: str) -> None:
        """Poll the job until it is final (or gone), then write its line."""
        delay = 0.05
        while True:
            try:
                job = await self.client.get(job_id)
            except AsyncServeError as exc:  # a job the server no longer has (404), or would not show
                status = "missing" if isinstance(exc, NotFound) else "unknown"
                await self.write({"line": line, "id": job_id, "status": status, "error": exc.message})
                return
            if job["status"] in FINAL_STATUSES:
                await self.write(_outcome(line, job))
                return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, _MAX_POLL_S)

    async def write(self, *records: dict[str, Any]) -> None:
        await self.results.write(*records)
        for record in records:
            self.progress.count(record["status"])


def _outcome(line: int, job: dict[str, Any]) -> dict[str, Any]:
    if job["status"] == "succeeded":
        return {"line": line, "id": job["id"], "status": "succeeded", "result": job.get("result")}
    return {"line": line, "id": job["id"], "status": job["status"], "error": job.get("error") or job["status"]}


async def submit_file(options: SubmitOptions, *, stream: IO[str] | None = None) -> Progress:
    """Run a submission to the end; the returned progress holds the counts by status."""
    client_class = _async_client()
    rows = await asyncio.to_thread(read_rows, options.file)
    left = await asyncio.to_thread(plan, options, rows)
    counts = dict(Counter(left.done.values()))
    progress = Progress(len(rows), stream or sys.stderr, counts=counts, submitted=len(rows) - len(left.todo))
    # Every request is retried while the server cannot be reached or refuses (503, 429), for up to
    # unreachable_s; a submission is safe to resend, since each job carries its idempotency key.
    client = client_class(
        options.url, timeout_s=TIMEOUT_S, max_connections=2 * options.concurrency, retry_budget_s=options.unreachable_s
    )
    try:
        async with client:
            await Submission(options, client, progress, left.run).run(left.todo, left.follow)
    except BaseExceptionGroup as group:  # from the task groups: report the first error as it was raised
        raise _reported(options, _first(group)) from None
    except (ConnectionError, TimeoutError) as exc:
        raise _reported(options, exc) from None
    finally:
        progress.end()
    await asyncio.to_thread(options.journal.unlink, missing_ok=True)
    return progress


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _reported(options: SubmitOptions, error: BaseException) -> BaseException:
    """A server gone for longer than the retry budget (or too slow to answer) as a SubmitError; the rest as it is."""
    if isinstance(error, ConnectionError):
        return SubmitError(f"{options.url} could not be reached for {options.unreachable_s:g} s ({error}); run "
                           "again with --resume once it is back: no job will run twice")  # fmt: skip
    if isinstance(error, TimeoutError):
        return SubmitError(f"{options.url} did not answer within {TIMEOUT_S:g} s; run again with --resume: "
                           "no job will run twice")  # fmt: skip
    return error


def main(options: SubmitOptions) -> int:
    """The command: 0 if every job succeeded, 1 if any did not; SubmitError (exit 2) if the run could not finish."""
    try:
        progress = asyncio.run(submit_file(options))
    except KeyboardInterrupt:
        print(f"\ninterrupted; run again with --resume to finish ({options.journal})", file=sys.stderr)
        return 130
    print(progress.summary(options.out), file=sys.stderr)
    return 0 if progress.failed == 0 else 1
