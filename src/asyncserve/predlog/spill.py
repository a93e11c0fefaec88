"""The spill file: where the records a sink would not take wait, durably, until they are replayed into it.

Several processes (``--workers N``) may share one spill path, and one may append to it while
another replays it, so the file is handed over with a lock and a rename:

* An append holds an exclusive ``flock`` on the file while it writes (and fsyncs), and checks,
  under the lock, that the path still names the file it holds open; if not, the file was claimed
  for replay, and it opens the new one.
* A replay first *claims* the file: under the same lock it renames it to
  ``<name>.replay-<pid>-<random>``, and appends go on in a new file at the path. A claim belongs
  to the process named in it; the claim of a process that died is taken over by the next replay
  (renamed to the taker's own name: a rename is atomic, so only one process takes it).
* A claim is replayed from its end, one chunk at a time, and cut (truncated) before the chunk once
  the chunk is stored; the last cut removes it. The file shrinks as it is replayed, and a replay
  cut short (a crash, a close) repeats at most one chunk, which the sinks store once per
  ``log_id``.

A line that is not a record (a torn last line after a power cut) is logged and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from asyncserve.predlog.records import LogRecord

logger = logging.getLogger(__name__)

T = TypeVar("T")
FIRST_READ_BYTES = 256 * 1024
"""How much of a claim's end the first read of a chunk takes; it doubles until the chunk is whole."""
MAX_CHUNK_BYTES = 16 * 1024 * 1024
"""A replayed chunk stops growing past this size (but holds at least one record)."""


async def in_thread(function: Callable[..., T], *args: object) -> T:
    """Run ``function`` in a worker thread; if cancelled, let the thread finish before re-raising.

    A cancelled ``to_thread`` leaves its thread running: without the wait, a caller could not
    tell whether the file was changed, and the next call could interleave with it.
    """
    task = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved, so that asyncio does not report it as never retrieved
        raise


class SpillFile:
    """The spill file at ``path``: ``append`` keeps records durably, ``claims``/``tail``/``cut`` replay them.

    Example::

        spill = SpillFile(Path("var/predlog-spill.jsonl"))
        await spill.append(batch)                      # fsynced before it returns
        for claim in await spill.claims():
            while True:
                offset, records = await spill.tail(claim, 500)
                await sink.write(records)
                if await spill.cut(claim, offset):     # True once the claim is used up
                    break
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._claim_pattern = re.compile(re.escape(path.name) + r"\.replay-(\d+)-[0-9a-f]+")
        # One append at a time in this process; flock serialises them across processes.
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SpillFile({str(self.path)!r})"

    async def append(self, records: Sequence[LogRecord]) -> None:
        """Append ``records``, one JSON line each, fsynced; a failed append leaves the file as it was."""
        data = b"".join(record.json + b"\n" for record in records)
        async with self._lock:
            await in_thread(self._append, data)

    async def claims(self) -> list[Path]:
        """The claims to replay: this process's own, those of dead processes, and the spill file (claimed now)."""
        return await in_thread(self._claims)

    async def tail(self, claim: Path, max_records: int) -> tuple[int, list[LogRecord]]:
        """The last records of ``claim`` (at most ``max_records``), and the offset where they begin."""
        offset, lines = await in_thread(_read_tail, claim, max_records)
        return offset, self._decode(claim, lines)

    async def cut(self, claim: Path, offset: int) -> bool:
        """Truncate ``claim`` to ``offset`` bytes (the records before it); at 0 remove it and return True."""
        return await in_thread(_cut, claim, offset)

    async def aclose(self) -> None:
        async with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                await in_thread(os.close, fd)

    def _decode(self, claim: Path, lines: list[bytes]) -> list[LogRecord]:
        records = []
        for line in lines:
            try:
                records.append(LogRecord.decode(line))
            except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
                logger.error(
                    "prediction log spill %s: skipping a line that is not a record (%s): %.80r", claim, exc, line
                )
        return records

    # Everything below runs in a worker thread.

    def _append(self, data: bytes) -> None:
        fd = self._locked_fd()
        try:
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except BaseException:
                # Cut a partial batch off, so that the file stays whole lines.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _locked_fd(self) -> int:
        """The spill file's descriptor, locked, and still the file the path names."""
        while True:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            if _names(self.path, self._fd):
                return self._fd
            # Claimed for replay since we opened it: appends go to the new file at the path.
            os.close(self._fd)  # closing releases the lock
            self._fd = None

    def _claims(self) -> list[Path]:
        taken = [claim for found in self._existing_claims() if (claim := self._take(found)) is not None]
        fresh = self._claim_spill_file()
        return sorted(taken) + ([fresh] if fresh is not None else [])

    def _existing_claims(self) -> list[Path]:
        try:
            names = os.listdir(self.path.parent)
        except FileNotFoundError:
            return []
        return [self.path.with_name(name) for name in names if self._claim_pattern.fullmatch(name)]

    def _take(self, claim: Path) -> Path | None:
        """``claim`` if it is ours; if it was a dead process's, the name it has now that it is ours; else None."""
        match = self._claim_pattern.fullmatch(claim.name)
        pid = int(match.group(1)) if match else 0
        if pid == os.getpid():
            return claim
        if _alive(pid):
            return None
        taken = self._new_claim_path()
        try:
            os.rename(claim, taken)
        except FileNotFoundError:  # another process took it first
            return None
        logger.info("prediction log spill: took over %s, left by process %d, to replay it", claim, pid)
        return taken

    def _claim_spill_file(self) -> Path | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not _names(self.path, fd) or os.fstat(fd).st_size == 0:
                return None
            claim = self._new_claim_path()
            os.rename(self.path, claim)
            return claim
        finally:
            os.close(fd)

    def _new_claim_path(self) -> Path:
        return self.path.with_name(f"{self.path.name}.replay-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` names the file open at ``fd``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and someone else's
        return True
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_tail(path: Path, max_records: int) -> tuple[int, list[bytes]]:
    """The last ``max_records`` lines of ``path`` and the offset of the first; ``(0, [])`` if it is gone.

    The read starts with the file's last ``FIRST_READ_BYTES`` and doubles until it holds enough
    whole lines, or ``MAX_CHUNK_BYTES`` with at least one whole line, or the whole file.
    """
    try:
        file = open(path, "rb")  # noqa: SIM115 (closed below; the with block would hide the early return)
    except FileNotFoundError:
        return 0, []
    with file:
        end = file.seek(0, os.SEEK_END)
        size = min(end, FIRST_READ_BYTES)
        while True:
            start = end - size
            file.seek(start)
            data = file.read(size)
            if start == 0 or _enough(data, max_records):
                break
            size = min(end, size * 2)
    return _last_lines(data, start, max_records)


def _enough(data: bytes, max_records: int) -> bool:
    # Each newline before the last byte starts a whole line after it.
    whole_lines = data.count(b"\n", 0, len(data) - 1)
    return whole_lines >= max_records or (len(data) >= MAX_CHUNK_BYTES and whole_lines > 0)


def _last_lines(data: bytes, start: int, max_records: int) -> tuple[int, list[bytes]]:
    """Split the end of ``data`` (read from file offset ``start``) into at most ``max_records`` whole lines."""
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    lines: list[bytes] = []
    while len(lines) < max_records and end >= 0:
        newline = data.rfind(b"\n", 0, end)
        if newline < 0 and start > 0:
            break  # the first line read may be the end of a longer one
        lines.append(data[newline + 1 : end])
        end = newline
    lines.reverse()
    offset = start + end + 1 if end >= 0 else 0
    return offset, [line for line in lines if line.strip()]


def _cut(path: Path, offset: int) -> bool:
    if offset > 0:
        os.truncate(path, offset)
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True
